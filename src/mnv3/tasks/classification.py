"""Image classification: softmax (or per-label sigmoid) loss, top-1/top-5, per-class accuracy,
confusion matrix, binary and multi-label AUROC; everything else comes from :class:`BaseTask`.

The network is built from plain keyword arguments (``model={"name": "mobilenet_v3_small", ...}``)
so the hyperparameters Lightning saves in every checkpoint are plain Python types and the
checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from mnv3.errors import ConfigError
from mnv3.models.backbone import SHAPE_OPTIONS, build_backbone
from mnv3.tasks.base import BaseTask, QATObjective
from mnv3.tasks.common import check_plain, log_images, save_figure

log = logging.getLogger(__name__)


class ClassificationTask(BaseTask):
    """Softmax classification with label smoothing, top-1/top-5, per-class accuracy, confusion matrix.

    Args:
        model: builder kwargs, ``name`` plus e.g. ``width_mult``, ``dropout``, ``weights``.
        num_classes: number of classes of the dataset.
        optimizer, scheduler, ema_decay, channels_last, compile, freeze_backbone_epochs,
        backbone_lr_factor: see :class:`~mnv3.tasks.base.BaseTask`.
        label_smoothing: cross-entropy label smoothing.
        class_names: for per-class metrics and the confusion matrix.
        max_classes_for_plots: per-class logs and confusion images only up to this many classes.
        label_type: "multiclass" (softmax, one label per image) or "multilabel" (sigmoid and BCE
            per label, NaN labels ignored: CheXpert's uncertain labels under policy "ignore").
        class_weights: multiclass: cross-entropy weight per class; multilabel: BCE pos_weight per
            label (class imbalance).

    Binary problems (2 classes) and multi-label ones are judged by AUROC (``val/auroc``, the
    monitored metric); binary ones also by accuracy, F1, sensitivity and specificity at the
    threshold that maximises Youden's J on validation, kept in the checkpoint and used on test.
    """

    monitor = "val/acc1"
    monitor_mode = "max"
    weights_key = "backbone.weights"  # the classifier is the backbone group's whole network

    def __init__(
        self,
        model: dict[str, Any],
        num_classes: int,
        optimizer: dict[str, Any],
        label_smoothing: float = 0.1,
        class_names: list[str] | None = None,
        max_classes_for_plots: int = 50,
        label_type: str = "multiclass",
        class_weights: list[float] | None = None,
        **shared: Any,
    ) -> None:
        if label_type not in ("multiclass", "multilabel"):
            raise ValueError(f"label_type must be multiclass or multilabel, got {label_type!r}")
        super().__init__(model, num_classes, optimizer, **shared)
        check_plain({"class_names": class_names, "class_weights": class_weights})
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.multilabel = label_type == "multilabel"
        self.binary = not self.multilabel and num_classes == 2
        self.monitor = "val/auroc" if self.multilabel or self.binary else "val/acc1"
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weight", weight)
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        # Binary decision threshold on P(class 1), chosen on validation (Youden's J).
        self.register_buffer("decision_threshold", torch.tensor(0.5))
        self.val_metrics = self._metrics(num_classes)
        self.test_metrics = nn.ModuleDict({k: m.clone() for k, m in self.val_metrics.items()})
        if not self.multilabel:
            mc = {"task": "multiclass", "num_classes": num_classes}
            self.train_acc1 = torchmetrics.Accuracy(**mc, top_k=1)

    def _metrics(self, num_classes: int) -> nn.ModuleDict:
        """Validation metrics: AUROC per label (multi-label), else top-1/top-5, per-class
        accuracy and the confusion matrix, plus the probabilities a binary ROC needs."""
        if self.multilabel:
            ml = {"num_labels": num_classes, "ignore_index": -1}
            return nn.ModuleDict(
                {"auroc": torchmetrics.classification.MultilabelAUROC(**ml, average=None)}
            )
        mc = {"task": "multiclass", "num_classes": num_classes}
        metrics = nn.ModuleDict(
            {
                "acc1": torchmetrics.Accuracy(**mc, top_k=1),
                "acc5": torchmetrics.Accuracy(**mc, top_k=min(5, num_classes)),
                "per_class": torchmetrics.Accuracy(**mc, average=None),
                "confusion": torchmetrics.ConfusionMatrix(**mc),
            }
        )
        if self.binary:
            metrics["probs"] = torchmetrics.CatMetric()
            metrics["targets"] = torchmetrics.CatMetric()
        return metrics

    architecture_keys: ClassVar[dict[str, str]] = {
        key: f"backbone.{key}" for key in ("name", *SHAPE_OPTIONS)
    }

    @classmethod
    def network_kwargs(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The classifier's builder arguments: the backbone group plus the head's dropout."""
        return {**cfg["backbone"], "dropout": cfg["head"].get("dropout", 0.2)}

    @classmethod
    def build_network(cls, model: dict[str, Any]) -> nn.Module:
        return build_backbone(**model)

    @classmethod
    def network_name(cls, model: Mapping[str, Any]) -> str:
        return str(model.get("name"))

    def load_weights(self, weights: str) -> Any:
        from mnv3.models.checkpoints import load_weights

        return load_weights(self.model, weights)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], datamodule: Any) -> ClassificationTask:
        """The task for ``head=classifier``: the backbone group plus the head's dropout, and the
        class list, label type and class weights the data module reports."""
        head = cfg["head"]
        label_type = getattr(datamodule, "label_type", "multiclass")
        return cls(
            model=cls.network_kwargs(cfg),
            num_classes=datamodule.num_classes,
            class_names=list(datamodule.class_names),
            label_smoothing=float(head.get("label_smoothing", 0.0)),
            label_type=label_type,
            class_weights=class_weights(head.get("class_weights"), datamodule, label_type),
            **cls.shared_kwargs(cfg),
        )

    def callbacks(self, settings: Mapping[str, Any] | None) -> list[pl.Callback]:
        """Out-of-distribution calibration and Grad-CAM overlays (``head.callbacks``)."""
        from mnv3.tasks.classifier_callbacks import GradCamImages, OODCalibration

        settings = settings or {}
        found: list[pl.Callback] = []
        if settings.get("ood_quantile"):
            found.append(OODCalibration(quantile=float(settings["ood_quantile"])))
        if settings.get("gradcam_images"):
            found.append(
                GradCamImages(
                    num_images=int(settings["gradcam_images"]),
                    every_n_epochs=int(settings.get("gradcam_every_n_epochs", 1)),
                )
            )
        return found

    @staticmethod
    def restore_callbacks(checkpoint: Mapping[str, Any]) -> list[pl.Callback]:
        """Callbacks whose state a checkpoint carries and evaluation reuses (the OOD threshold:
        ``test/ood_flagged`` counts test images below the validation threshold)."""
        from mnv3.tasks.classifier_callbacks import OODCalibration

        state = OODCalibration.state_from_checkpoint(checkpoint)
        if state is None:
            return []
        ood = OODCalibration(quantile=float(state.get("quantile", 0.05)))
        ood.load_state_dict(state)
        return [ood]

    # -- steps -----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self.count_skipped(batch)
        images, labels = batch["image"], batch["label"]
        if images.shape[0] == 0:  # every image of the batch was unreadable
            return None
        logits = self.train_forward(images)
        loss = self._loss(logits, labels)
        self.check_finite(loss)
        bs = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        if not self.multilabel:
            self.train_acc1(logits.detach(), labels)
            self.log(
                "train/acc1",
                self.train_acc1,
                prog_bar=True,
                on_step=True,
                on_epoch=True,
                batch_size=bs,
            )
        self.log_skipped(bs)
        return loss

    def qat_objective(self, network: nn.Module, example: torch.Tensor) -> QATObjective:
        """The classifier itself, trained on its own loss (label smoothing, class weights)."""
        return QATObjective(network, self._loss, lambda b: (b["image"], b["label"]))

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.multilabel:
            return self.criterion(logits, labels)
        known = ~torch.isnan(labels)
        per_label = F.binary_cross_entropy_with_logits(
            logits,
            torch.nan_to_num(labels, nan=0.0),
            pos_weight=self.class_weight,
            reduction="none",
        )
        return (per_label * known).sum() / known.sum().clamp(min=1)

    def _eval_step(
        self, batch: dict[str, Any], batch_idx: int, stage: str
    ) -> dict[str, torch.Tensor] | None:
        self.count_skipped(batch)
        images, labels = batch["image"], batch["label"]
        if images.shape[0] == 0:
            return None
        logits = self.net(evaluating=True)(self.prepare_images(images))
        out = {"logits": logits.detach()}  # callbacks (OOD calibration) reuse them
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        bs = images.shape[0]
        self.log(
            f"{stage}/loss",
            self._loss(logits, labels),
            prog_bar=stage == "val",
            batch_size=bs,
            sync_dist=True,
        )
        if self.multilabel:
            targets = torch.nan_to_num(labels, nan=-1.0).long()
            metrics["auroc"].update(torch.sigmoid(logits), targets)
            return out
        for name in ("acc1", "acc5", "per_class", "confusion"):
            metrics[name].update(logits, labels)
        if self.binary:
            metrics["probs"].update(torch.softmax(logits.float(), dim=1)[:, 1])
            metrics["targets"].update(labels.float())
        self.log(f"{stage}/acc1", metrics["acc1"], prog_bar=stage == "val", batch_size=bs)
        self.log(f"{stage}/acc5", metrics["acc5"], batch_size=bs)
        return out

    def _end_of_eval(self, stage: str) -> None:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        if self.multilabel:
            self._end_of_eval_multilabel(stage, metrics)
            return
        per_class = metrics["per_class"].compute()
        confusion = metrics["confusion"].compute()
        metrics["per_class"].reset()
        metrics["confusion"].reset()
        if self.binary:
            confusion = self._end_of_eval_binary(stage, metrics)
        if self.trainer.sanity_checking or self.num_classes > self.hparams.max_classes_for_plots:
            return
        for name, acc in zip(self.class_names, per_class.tolist(), strict=True):
            self.log(f"{stage}/acc1_class/{name}", acc)
        if self.global_rank == 0:
            path = self._plot_confusion(confusion, stage)
            log_images(self.loggers, f"{stage}/confusion_matrix", [path], step=self.global_step)

    def _end_of_eval_multilabel(self, stage: str, metrics: nn.ModuleDict) -> None:
        """Per-finding AUROC and their mean (findings with one class only in the split are NaN)."""
        per_label = metrics["auroc"].compute().float()
        metrics["auroc"].reset()
        self.log(f"{stage}/auroc", per_label.nanmean(), prog_bar=True)
        for name, value in zip(self.class_names, per_label.tolist(), strict=True):
            self.log(f"{stage}/auroc/{name}", value)

    def _end_of_eval_binary(self, stage: str, metrics: nn.ModuleDict) -> torch.Tensor:
        """AUROC; accuracy, F1, sensitivity, specificity at the Youden threshold of validation."""
        from torchmetrics.functional.classification import binary_auroc, binary_roc

        probs = metrics["probs"].compute()
        targets = metrics["targets"].compute().long()
        metrics["probs"].reset()
        metrics["targets"].reset()
        if probs.numel() == 0 or targets.unique().numel() < 2:
            return torch.zeros(2, 2, dtype=torch.long)
        fpr, tpr, thresholds = binary_roc(probs, targets)
        if stage == "val" and not self.trainer.sanity_checking:
            best = int(torch.argmax(tpr - fpr))
            self.decision_threshold.fill_(float(thresholds[best].clamp(0.0, 1.0)))
        predicted = (probs >= self.decision_threshold).long()
        tp = int(((predicted == 1) & (targets == 1)).sum())
        tn = int(((predicted == 0) & (targets == 0)).sum())
        fp = int(((predicted == 1) & (targets == 0)).sum())
        fn = int(((predicted == 0) & (targets == 1)).sum())
        sensitivity = tp / max(1, tp + fn)
        specificity = tn / max(1, tn + fp)
        values = {
            "auroc": float(binary_auroc(probs, targets)),
            "accuracy_at_threshold": (tp + tn) / max(1, tp + tn + fp + fn),
            "f1": 2 * tp / max(1, 2 * tp + fp + fn),
            "sensitivity": sensitivity,
            "specificity": specificity,
            "threshold": float(self.decision_threshold),
        }
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "auroc")
        if self.global_rank == 0 and not self.trainer.sanity_checking:
            path = self._plot_roc(fpr, tpr, values, stage)
            log_images(self.loggers, f"{stage}/roc_curve", [path], step=self.global_step)
        return torch.tensor([[tn, fp], [fn, tp]])

    def _plot_confusion(self, confusion: torch.Tensor, stage: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = confusion.shape[0]
        fig, ax = plt.subplots(figsize=(2 + 0.45 * n, 1.5 + 0.45 * n))
        ax.imshow(confusion.cpu().numpy(), cmap="Blues")
        ax.set_xticks(range(n), self.class_names, rotation=60, ha="right")
        ax.set_yticks(range(n), self.class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8)
        ax.set_title(f"{stage} confusion matrix, epoch {self.current_epoch}")
        fig.tight_layout()
        root = Path(self.trainer.default_root_dir) / "plots"
        return save_figure(fig, root / f"{stage}_confusion_epoch{self.current_epoch:03d}.png")

    def _plot_roc(
        self, fpr: torch.Tensor, tpr: torch.Tensor, values: dict[str, float], stage: str
    ) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(fpr.cpu().numpy(), tpr.cpu().numpy(), label=f"AUROC {values['auroc']:.3f}")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
        ax.scatter(
            [1 - values["specificity"]],
            [values["sensitivity"]],
            color="red",
            zorder=3,
            label=f"threshold {values['threshold']:.3f}",
        )
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"{stage} ROC, epoch {self.current_epoch}")
        ax.legend(loc="lower right")
        fig.tight_layout()
        root = Path(self.trainer.default_root_dir) / "plots"
        return save_figure(fig, root / f"{stage}_roc_epoch{self.current_epoch:03d}.png")


def class_weights(setting: Any, datamodule: Any, label_type: str) -> list[float] | None:
    """None, an explicit list, or "balanced": weights from the training split's label counts.

    Multiclass: n / (k * count_c) per class (cross-entropy weights). Multilabel: negatives /
    positives per label (BCE pos_weight), uncertain (NaN) labels left out of both counts.
    """
    if setting is None or isinstance(setting, list):
        return setting
    if setting != "balanced":
        raise ConfigError(f"head.class_weights must be null, a list or 'balanced', got {setting!r}")
    train = datamodule.get_dataset("train")
    if label_type == "multilabel":
        labels = torch.as_tensor(train.label_matrix, dtype=torch.float32)
        positives = (labels == 1).sum(0).clamp(min=1)
        negatives = (labels == 0).sum(0)
        return (negatives / positives).tolist()
    counts = torch.bincount(torch.as_tensor(train.targets), minlength=datamodule.num_classes)
    counts = counts.clamp(min=1)
    return (counts.sum() / (len(counts) * counts.float())).tolist()
