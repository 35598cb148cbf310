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
from mnv3.tasks.image_predictions import TOP_K, top_k_probabilities, write_top_k_csv
from mnv3.tasks.xray_metrics import (
    binary_logits,
    confusion_counts,
    fit_temperature,
    threshold_for_sensitivity,
    youden_threshold,
)
from mnv3.tasks.xray_report import (
    FindingsReport,
    evaluate_findings,
    evaluation_settings,
    plot_reliability,
    print_intervals,
    write_predictions,
    write_report,
)

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
        evaluation: dict[str, Any] | None = None,
        **shared: Any,
    ) -> None:
        if label_type not in ("multiclass", "multilabel"):
            raise ValueError(f"label_type must be multiclass or multilabel, got {label_type!r}")
        super().__init__(model, num_classes, optimizer, **shared)
        check_plain(
            {"class_names": class_names, "class_weights": class_weights, "evaluation": evaluation}
        )
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
        self.evaluation = evaluation_settings(evaluation)
        if self.binary or self.multilabel:
            self._register_evaluation_buffers()
        self.val_metrics = self._metrics(num_classes)
        self.test_metrics = nn.ModuleDict({k: m.clone() for k, m in self.val_metrics.items()})
        # Per image, for mnv3.eval's predictions CSV of a multi-class problem (only filled while
        # predictions_dir is set): the top-k probabilities, their classes and the true label.
        self.image_top_k = nn.ModuleDict(
            {
                key: torchmetrics.CatMetric(nan_strategy="disable")
                for key in ("probabilities", "classes", "labels")
            }
        )
        if not self.multilabel:
            mc = {"task": "multiclass", "num_classes": num_classes}
            self.train_acc1 = torchmetrics.Accuracy(**mc, top_k=1)

    def _metrics(self, num_classes: int) -> nn.ModuleDict:
        """Validation metrics: AUROC per label (multi-label), else top-1/top-5, per-class
        accuracy and the confusion matrix, plus the probabilities a binary ROC needs."""
        if self.multilabel:
            # One logit and one label (-1: unknown) per finding and image, in split order.
            return nn.ModuleDict(
                {
                    "logits": torchmetrics.CatMetric(nan_strategy="disable"),
                    "targets": torchmetrics.CatMetric(nan_strategy="disable"),
                }
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
            metrics["logits"] = torchmetrics.CatMetric(nan_strategy="disable")
            metrics["targets"] = torchmetrics.CatMetric(nan_strategy="disable")
        return metrics

    def _register_evaluation_buffers(self) -> None:
        """What validation chooses and test reuses, kept in checkpoints as buffers (plain tensors:
        ``weights_only=True`` loading keeps working): the temperature, the per-finding Youden
        thresholds (multi-label; binary keeps ``decision_threshold``) and the thresholds of the
        fixed-sensitivity operating points, one row per ``evaluation.sensitivities`` entry."""
        findings = self.num_classes if self.multilabel else 1
        self.register_buffer("temperature", torch.tensor(1.0))
        if self.multilabel:
            self.register_buffer("finding_thresholds", torch.full((findings,), 0.5))
        sensitivities = len(self.evaluation["sensitivities"])
        self.register_buffer("sensitivity_thresholds", torch.full((sensitivities, findings), 0.5))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Let checkpoints written before the evaluation buffers existed load: the missing ones
        keep their defaults (temperature 1, thresholds 0.5)."""
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            return
        for name in ("temperature", "finding_thresholds", "sensitivity_thresholds"):
            buffer = self._buffers.get(name)
            if buffer is not None and name not in state:
                state[name] = buffer.detach().clone()

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
            evaluation=dict(head["evaluation"]) if head.get("evaluation") else None,
            **cls.shared_kwargs(cfg),
        )

    def callbacks(self, settings: Mapping[str, Any] | None) -> list[pl.Callback]:
        """Out-of-distribution calibration and Grad-CAM overlays (``head.callbacks``)."""
        from mnv3.tasks.classifier_callbacks import (
            GradCamImages,
            MahalanobisCalibration,
            OODCalibration,
        )

        settings = settings or {}
        found: list[pl.Callback] = []
        if settings.get("ood_quantile"):
            found.append(OODCalibration(quantile=float(settings["ood_quantile"])))
        if settings.get("mahalanobis_quantile"):
            found.append(
                MahalanobisCalibration(
                    quantile=float(settings["mahalanobis_quantile"]),
                    max_train_images=int(settings.get("mahalanobis_max_images", 10_000)),
                )
            )
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
        """Callbacks whose state a checkpoint carries and evaluation reuses (the OOD thresholds:
        ``test/ood_flagged`` and ``test/ood_flagged_mahalanobis`` count test images below the
        validation thresholds)."""
        from mnv3.tasks.classifier_callbacks import MahalanobisCalibration, OODCalibration

        found: list[pl.Callback] = []
        state = OODCalibration.state_from_checkpoint(checkpoint)
        if state is not None:
            ood = OODCalibration(quantile=float(state.get("quantile", 0.05)))
            ood.load_state_dict(state)
            found.append(ood)
        mahalanobis = MahalanobisCalibration.from_checkpoint(checkpoint)
        if mahalanobis is not None:
            found.append(mahalanobis)
        return found

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
            metrics["logits"].update(logits.detach().float())
            metrics["targets"].update(torch.nan_to_num(labels.float(), nan=-1.0))
            return out
        for name in ("acc1", "acc5", "per_class", "confusion"):
            metrics[name].update(logits, labels)
        if self.predictions_dir is not None and not self.binary:
            probabilities, classes = top_k_probabilities(logits.detach(), TOP_K)
            self.image_top_k["probabilities"].update(probabilities)
            self.image_top_k["classes"].update(classes.float())  # CatMetric keeps floats
            self.image_top_k["labels"].update(labels.float())
        if self.binary:
            metrics["logits"].update(binary_logits(logits.detach()))  # sigmoid: P(class 1)
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
        elif self.predictions_dir is not None and not self.trainer.sanity_checking:
            self._write_top_k(stage)
        if self.trainer.sanity_checking or self.num_classes > self.hparams.max_classes_for_plots:
            return
        for name, acc in zip(self.class_names, per_class.tolist(), strict=True):
            self.log(f"{stage}/acc1_class/{name}", acc)
        if self.global_rank == 0:
            path = self._plot_confusion(confusion, stage)
            log_images(self.loggers, f"{stage}/confusion_matrix", [path], step=self.global_step)

    def _end_of_eval_multilabel(self, stage: str, metrics: nn.ModuleDict) -> None:
        """Per-finding AUROC / AUPRC and their means (findings with one class only in the split
        are NaN), ECE and the operating points: :meth:`_evaluate_findings`."""
        logits, labels = self._collected(metrics)
        if logits.numel():
            self._evaluate_findings(stage, logits, labels)

    def _end_of_eval_binary(self, stage: str, metrics: nn.ModuleDict) -> torch.Tensor:
        """AUROC, AUPRC, ECE; accuracy, F1, sensitivity, specificity at the Youden threshold of
        validation and at its fixed-sensitivity thresholds (:meth:`_evaluate_findings`)."""
        from torchmetrics.functional.classification import binary_roc

        logits, labels = self._collected(metrics)
        if logits.numel() == 0 or labels.unique().numel() < 2:
            return torch.zeros(2, 2, dtype=torch.long)
        report = self._evaluate_findings(stage, logits[:, None], labels[:, None])
        targets = labels.long()
        tp, fp, fn, tn = confusion_counts(report.decisions["youden"][:, 0], targets)
        if self.global_rank == 0 and not self.trainer.sanity_checking:
            fpr, tpr, _ = binary_roc(report.probs[:, 0], targets)
            path = self._plot_roc(fpr, tpr, report.values, stage)
            log_images(self.loggers, f"{stage}/roc_curve", [path], step=self.global_step)
        return torch.tensor([[tn, fp], [fn, tp]])

    def _write_top_k(self, stage: str) -> None:
        """``predictions_<split>.csv`` of a multi-class evaluation (``mnv3.eval``): per image its
        path, true label and top-k classes with their probabilities (:func:`write_top_k_csv`)."""
        probabilities, classes, labels = self._collected(
            self.image_top_k, ("probabilities", "classes", "labels")
        )
        if self.global_rank != 0 or self.predictions_dir is None:
            return
        path = self.predictions_dir / f"predictions_{stage}.csv"
        paths = self._split_paths(stage, int(labels.shape[0]))
        write_top_k_csv(path, paths, probabilities, classes.long(), self.class_names, labels.long())
        log.info("per-image predictions written to %s", path)

    @staticmethod
    def _collected(
        metrics: nn.ModuleDict, names: tuple[str, ...] = ("logits", "targets")
    ) -> tuple[torch.Tensor, ...]:
        """The split's collected states (all ranks, split order), by default its logits and
        labels; the states are emptied."""
        found = []
        for name in names:
            value = metrics[name].compute()
            metrics[name].reset()
            found.append(value.float() if isinstance(value, torch.Tensor) else torch.empty(0))
        return tuple(found)

    @property
    def findings(self) -> list[str]:
        """What a binary or multi-label classifier reports on: every label (multi-label), or a
        binary problem's one finding, its positive class (class 1)."""
        return list(self.class_names) if self.multilabel else [self.class_names[1]]

    def finding_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` logits of the :attr:`findings` from the network's ``(N, C)`` logits: the
        labels' own, or a binary problem's ``l1 - l0`` (its sigmoid is the softmax's P(class 1))."""
        return logits.float() if self.multilabel else binary_logits(logits.float())[:, None]

    def report_findings(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        groups: list[str] | None = None,
        bootstrap: bool = False,
    ) -> FindingsReport:
        """:func:`evaluate_findings` of ``(N, K)`` :meth:`finding_logits` against labels (-1:
        unknown) with what this checkpoint chose on validation: its temperature, Youden and
        fixed-sensitivity thresholds. ``groups``: patients for the bootstrap (``bootstrap``)."""
        youden = self.finding_thresholds if self.multilabel else self.decision_threshold.reshape(1)
        return evaluate_findings(
            logits.cpu(),
            labels.cpu(),
            self.findings,
            float(self.temperature),
            youden.cpu(),
            self.sensitivity_thresholds.cpu(),
            self.evaluation,
            flat=not self.multilabel,
            groups=groups,
            bootstrap=bootstrap,
        )

    def _evaluate_findings(
        self, stage: str, logits: torch.Tensor, labels: torch.Tensor
    ) -> FindingsReport:
        """Choose on validation, report on any split: see :mod:`mnv3.tasks.xray_report`.

        On validation (not the sanity check) the temperature, the Youden and the
        fixed-sensitivity thresholds are fitted and kept in buffers; every split is then judged
        with them. A final evaluation (test, or ``mnv3.eval split=val``) adds the bootstrap
        intervals (patients resampled where the dataset knows them), prints them, and writes
        ``evaluation_<split>.json`` and, for ``mnv3.eval``, ``predictions_<split>.csv``.
        """
        sanity = self.trainer.sanity_checking
        if stage == "val" and not sanity:
            self._choose_on_validation(logits, labels)
        final = not sanity and (stage == "test" or self.trainer.state.fn == "validate")
        paths, patients = self._split_identities(stage, logits.shape[0]) if final else (None, None)
        report = self.report_findings(logits, labels, groups=patients, bootstrap=final)
        for name, value in report.values.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "auroc")
        if self.global_rank != 0 or sanity:
            return report
        root = Path(self.trainer.default_root_dir)
        path = plot_reliability(
            report.probs,
            labels.cpu(),
            int(self.evaluation["calibration_bins"]),
            report.values["ece"],
            f"{stage} reliability, T={float(self.temperature):.2f}",
            root / "plots" / f"{stage}_reliability_epoch{self.current_epoch:03d}.png",
        )
        log_images(self.loggers, f"{stage}/reliability", [path], step=self.global_step)
        if final:
            out = self.predictions_dir if self.predictions_dir is not None else root
            print_intervals(stage, report, self.findings)
            write_report(out / f"evaluation_{stage}.json", report, self.evaluation)
            if self.predictions_dir is not None:
                csv_path = out / f"predictions_{stage}.csv"
                write_predictions(csv_path, report, labels.cpu(), self.findings, paths, patients)
                log.info("per-image predictions written to %s", csv_path)
        return report

    def _choose_on_validation(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Fit the temperature, then the Youden and fixed-sensitivity thresholds of every finding
        on the calibrated validation probabilities (a finding with one class keeps its old ones)."""
        if self.evaluation["temperature_scaling"]:
            self.temperature.fill_(fit_temperature(logits, labels))
        probs = torch.sigmoid(logits.float() / float(self.temperature))
        if probs.ndim == 1:
            probs, labels = probs[:, None], labels[:, None]
        for k in range(probs.shape[1]):
            known = labels[:, k] >= 0
            p, y = probs[known, k], labels[known, k].long()
            if y.unique().numel() < 2:
                continue
            youden = youden_threshold(p, y)
            if self.multilabel:
                self.finding_thresholds[k] = youden
            else:
                self.decision_threshold.fill_(youden)
            for s, sensitivity in enumerate(self.evaluation["sensitivities"]):
                self.sensitivity_thresholds[s, k] = threshold_for_sensitivity(p, y, sensitivity)

    def _split_dataset(self, stage: str, count: int) -> Any:
        """The evaluated split's dataset when its images match the ``count`` predictions one to
        one, in order; None when the data module cannot tell or images were skipped."""
        datamodule = getattr(self.trainer, "datamodule", None)
        getter = getattr(datamodule, "get_dataset", None)
        dataset = getter(stage) if getter is not None else None
        if dataset is not None and len(dataset) != count:
            log.warning(
                "%d of %d %s images were scored (unreadable ones skipped): per-image predictions "
                "are written without paths (and a bootstrap resamples images)",
                count,
                len(dataset),
                stage,
            )
            return None
        return dataset

    def _split_paths(self, stage: str, count: int) -> list[str] | None:
        """Image paths of the evaluated split in prediction order (:meth:`_split_dataset`)."""
        return _paths_of(self._split_dataset(stage, count), count)

    def _split_identities(
        self, stage: str, count: int
    ) -> tuple[list[str] | None, list[str] | None]:
        """Image paths and patient ids of the evaluated split, in prediction order; None when the
        data module cannot tell them or images were skipped (the order no longer matches)."""
        dataset = self._split_dataset(stage, count)
        if dataset is None:
            return None, None
        paths = _paths_of(dataset, count)
        patients = getattr(dataset, "patient_ids", None)
        if patients is None:
            log.warning("the %s split has no patient ids: the bootstrap resamples images", stage)
        return paths, (list(patients) if patients is not None else None)

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


def _paths_of(dataset: Any, count: int) -> list[str] | None:
    """The image paths of a split's first ``count`` samples; None without a dataset that tells."""
    if dataset is None or not hasattr(dataset, "path"):
        return None
    return [dataset.path(i) for i in range(count)]


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
