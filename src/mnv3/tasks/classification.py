"""Image classification as a LightningModule: loss, metrics, optimisation, EMA and logging.

The network is built from plain keyword arguments (``model={"name": "mobilenet_v3_small", ...}``)
so the hyperparameters Lightning saves in every checkpoint are plain Python types and the
checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from mnv3.models import build_model, count_madds, count_params
from mnv3.tasks.common import NonFiniteLossError, check_plain, log_images, save_figure
from mnv3.tasks.ema import ModelEma
from mnv3.tasks.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class ClassificationTask(pl.LightningModule):
    """Softmax classification with label smoothing, top-1/top-5, per-class accuracy, confusion matrix.

    Args:
        model: builder kwargs, ``name`` plus e.g. ``width_mult``, ``dropout``, ``weights``.
        num_classes: number of classes of the dataset.
        optimizer: ``name`` (rmsprop_tf, sgd, adamw), ``lr``, ``weight_decay``... and optionally
            ``reference_batch_size``: ``lr`` is then scaled linearly to the real global batch.
        scheduler: ``name`` (exponential, cosine, constant), ``warmup_epochs`` and its knobs.
        label_smoothing: cross-entropy label smoothing.
        ema_decay: keep an EMA of the weights (paper: 0.9999) and validate/test with it.
        channels_last: run the network in NHWC memory format (faster convs on CPU and GPU).
        compile: wrap the forward in ``torch.compile``.
        class_names: for per-class metrics and the confusion matrix.
        max_classes_for_plots: per-class logs and confusion images only up to this many classes.
        label_type: "multiclass" (softmax, one label per image) or "multilabel" (sigmoid and BCE
            per label, NaN labels ignored: CheXpert's uncertain labels under policy "ignore").
        class_weights: multiclass: cross-entropy weight per class; multilabel: BCE pos_weight per
            label (class imbalance).
        freeze_backbone_epochs: fine-tuning: train only the classifier for this many epochs
            (backbone weights and BatchNorm statistics frozen), then everything.
        backbone_lr_factor: fine-tuning: the backbone's lr is this fraction of the head's.

    Binary problems (2 classes) and multi-label ones are judged by AUROC (``val/auroc``, the
    monitored metric); binary ones also by accuracy, F1, sensitivity and specificity at the
    threshold that maximises Youden's J on validation, kept in the checkpoint and used on test.
    """

    monitor = "val/acc1"
    monitor_mode = "max"

    def __init__(
        self,
        model: dict[str, Any],
        num_classes: int,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        label_smoothing: float = 0.1,
        ema_decay: float | None = None,
        channels_last: bool = False,
        compile: bool = False,
        class_names: list[str] | None = None,
        max_classes_for_plots: int = 50,
        label_type: str = "multiclass",
        class_weights: list[float] | None = None,
        freeze_backbone_epochs: int = 0,
        backbone_lr_factor: float = 1.0,
    ) -> None:
        super().__init__()
        check_plain(
            {
                "model": model,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "class_names": class_names,
                "class_weights": class_weights,
            }
        )
        if label_type not in ("multiclass", "multilabel"):
            raise ValueError(f"label_type must be multiclass or multilabel, got {label_type!r}")
        self.save_hyperparameters()
        self.model = build_model(**model, num_classes=num_classes)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = ModelEma(self.model, ema_decay) if ema_decay else None
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
        self._compiled: Any = None
        self.skipped_images = 0

        if self.multilabel:
            ml = {"num_labels": num_classes, "ignore_index": -1}
            self.val_metrics = nn.ModuleDict(
                {"auroc": torchmetrics.classification.MultilabelAUROC(**ml, average=None)}
            )
            self.test_metrics = nn.ModuleDict({k: m.clone() for k, m in self.val_metrics.items()})
            return
        top5 = min(5, num_classes)
        mc = {"task": "multiclass", "num_classes": num_classes}
        self.train_acc1 = torchmetrics.Accuracy(**mc, top_k=1)
        self.val_metrics = nn.ModuleDict(
            {
                "acc1": torchmetrics.Accuracy(**mc, top_k=1),
                "acc5": torchmetrics.Accuracy(**mc, top_k=top5),
                "per_class": torchmetrics.Accuracy(**mc, average=None),
                "confusion": torchmetrics.ConfusionMatrix(**mc),
            }
        )
        if self.binary:
            self.val_metrics["probs"] = torchmetrics.CatMetric()
            self.val_metrics["targets"] = torchmetrics.CatMetric()
        self.test_metrics = nn.ModuleDict({k: m.clone() for k, m in self.val_metrics.items()})

    # -- forward ---------------------------------------------------------------------------
    def _net(self, evaluating: bool) -> nn.Module:
        if evaluating and self.ema is not None:
            return self.ema.module
        if self.hparams.compile:
            if self._compiled is None:
                # Kept out of the module tree so state_dict keys stay those of ``self.model``.
                self.__dict__["_compiled"] = torch.compile(self.model)
            return self._compiled
        return self.model

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._net(evaluating=not self.training)(self._prepare(images))

    # -- steps -----------------------------------------------------------------------------
    def _count_skipped(self, batch: dict[str, Any]) -> None:
        skipped = int(batch.get("skipped", 0))
        if skipped:
            self.skipped_images += skipped
            log.warning("%d unreadable image(s) skipped so far", self.skipped_images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self._count_skipped(batch)
        images, labels = batch["image"], batch["label"]
        if images.shape[0] == 0:  # every image of the batch was unreadable
            return None
        logits = self._net(evaluating=False)(self._prepare(images))
        loss = self._loss(logits, labels)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                "stopping so the last good checkpoint is kept (lower optim.lr or check the data)"
            )
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
        self.log(
            "data/skipped_images",
            float(self.skipped_images),
            on_step=False,
            on_epoch=True,
            reduce_fx="max",
            batch_size=bs,
        )
        return loss

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

    def on_train_epoch_start(self) -> None:
        """Freeze the backbone (weights and BN statistics) for the first fine-tuning epochs."""
        frozen = self.current_epoch < self.hparams.freeze_backbone_epochs
        for module in (self.model.stem, self.model.blocks, self.model.last_conv):
            for p in module.parameters():
                p.requires_grad_(not frozen)
            if frozen:
                module.eval()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None and outputs is not None:
            self.ema.update(self.model)

    def _eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor] | None:
        self._count_skipped(batch)
        images, labels = batch["image"], batch["label"]
        if images.shape[0] == 0:
            return None
        logits = self._net(evaluating=True)(self._prepare(images))
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

    def validation_step(
        self, batch: dict[str, Any], batch_idx: int
    ) -> dict[str, torch.Tensor] | None:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor] | None:
        return self._eval_step(batch, "test")

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

    def on_validation_epoch_end(self) -> None:
        self._end_of_eval("val")

    def on_test_epoch_end(self) -> None:
        self._end_of_eval("test")

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

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        opt_cfg = dict(self.hparams.optimizer)
        reference = opt_cfg.pop("reference_batch_size", None)
        if reference:
            opt_cfg["lr"] = opt_cfg["lr"] * self._global_batch_size() / reference
        groups = self._param_groups(opt_cfg["lr"], opt_cfg.get("weight_decay", 0.0))
        optimizer = build_optimizer(self.model, param_groups=groups, **opt_cfg)
        sched_cfg = dict(self.hparams.scheduler or {"name": "constant"})
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(1, self.trainer.max_epochs or 1)
        scheduler = build_scheduler(
            optimizer, total_steps=total, steps_per_epoch=max(1, total // epochs), **sched_cfg
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Backbone and head groups (lr x backbone_lr_factor for the backbone), each split into
        weights that decay and BatchNorm / bias parameters that do not."""
        head = (
            {id(p) for p in self.model.classifier.parameters()} if self.model.classifier else set()
        )
        groups = []
        for is_head in (False, True):
            factor = 1.0 if is_head else float(self.hparams.backbone_lr_factor)
            params = [p for p in self.model.parameters() if (id(p) in head) == is_head]
            groups.append(
                {
                    "params": [p for p in params if p.ndim > 1],
                    "weight_decay": weight_decay,
                    "lr": lr * factor,
                }
            )
            groups.append(
                {
                    "params": [p for p in params if p.ndim <= 1],
                    "weight_decay": 0.0,
                    "lr": lr * factor,
                }
            )
        return [g for g in groups if g["params"]]

    def _global_batch_size(self) -> int:
        datamodule = getattr(self.trainer, "datamodule", None)
        per_device = getattr(datamodule, "batch_size", None)
        if per_device is None:
            raise ValueError("optimizer.reference_batch_size needs a datamodule with a batch_size")
        return int(per_device) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    # -- reporting -------------------------------------------------------------------------
    def model_summary(self, image_size: int = 224) -> dict[str, float]:
        """Parameters and MAdds of the network at ``image_size`` (logged at the start of a run)."""
        return {
            "model/params": count_params(self.model),
            "model/madds": count_madds(self.model, image_size),
        }
