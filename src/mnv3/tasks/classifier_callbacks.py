"""The callbacks a classifier asks for (``head.callbacks``): OOD threshold calibration, Grad-CAM.

- :class:`OODCalibration` turns each validation epoch into an out-of-distribution threshold (the
  low quantile of in-distribution confidence) and saves it in every checkpoint, so ``mnv3.explain``
  can flag an image the network was not trained for without re-reading the validation set.
- :class:`MahalanobisCalibration` fits the feature-space detector (class means and shared
  covariance of pooled features on training images) and its threshold, saved the same way.
- :class:`GradCamImages` writes Grad-CAM overlays of a few fixed validation images every epoch, so
  one can watch *where* the network looks while it learns.

Both run the task's evaluated network (:attr:`~mnv3.tasks.base.BaseTask.evaluated_network`) and
expect batches ``{"image": (N, 3, H, W), ...}`` as the classification data modules produce. The
callbacks that keep a run folder resumable (last.ckpt on preemption) are :mod:`mnv3.preemption`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from mnv3.models.gradcam import grad_cam, overlay_heatmap
from mnv3.models.mobilenet import MobileNet
from mnv3.models.ood import (
    calibrate_threshold,
    confidence_score,
    fit_class_gaussians,
    mahalanobis_score,
    pooled_features,
)
from mnv3.tasks.common import log_images, save_png

log = logging.getLogger(__name__)

__all__ = ["GradCamImages", "MahalanobisCalibration", "OODCalibration", "is_multilabel"]


def is_multilabel(task: Any, datamodule: Any) -> bool:
    """Whether labels are independent findings (sigmoid) rather than one class (softmax).

    Asks the task first (a ``label_type`` attribute or hyperparameter), then the data module.
    """
    label_type = getattr(task, "label_type", None) or task.hparams.get("label_type")
    if label_type is None:
        label_type = getattr(datamodule, "label_type", None)
    return label_type == "multilabel"


class OODCalibration(pl.Callback):
    """Calibrate an out-of-distribution threshold on every validation epoch and checkpoint it.

    At each validation epoch (not the sanity check) the confidence of every validation image is
    collected: the maximum softmax probability (Hendrycks & Gimpel 2017), or the maximum sigmoid
    for a multi-label task. The ``quantile`` of those scores becomes the threshold: an image scoring
    below it is less confident than all but ``quantile`` of in-distribution images. It is logged as
    ``log_key`` and kept in :meth:`state_dict`, which Lightning saves in every checkpoint under
    ``checkpoint["callbacks"]["OODCalibration"]``; read it back with
    :meth:`state_from_checkpoint`.

    Logits come from the step's output when ``validation_step`` returns a mapping with a
    ``"logits"`` entry; otherwise the task is run once more on the batch (eval mode, no grad).

    Args:
        quantile: fraction of in-distribution validation images allowed below the threshold
            (the false-alarm rate).
        log_key: the metric name of the threshold.
    """

    def __init__(self, quantile: float = 0.05, log_key: str = "val/ood_threshold") -> None:
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        self.quantile = float(quantile)
        self.log_key = log_key
        self.threshold: float | None = None
        self.num_scores = 0
        self._scores: list[torch.Tensor] = []

    # -- collection ----------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._scores = []

    def _collect(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any
    ) -> None:
        """Append the confidence scores of one batch (from the step's logits, or a new forward)."""
        if isinstance(outputs, Mapping) and outputs.get("logits") is not None:
            logits = outputs["logits"]
        else:
            images = batch["image"]
            if images.shape[0] == 0:  # every image of the batch was unreadable
                return
            with torch.no_grad():
                logits = pl_module(images)
        multilabel = is_multilabel(pl_module, getattr(trainer, "datamodule", None))
        self._scores.append(confidence_score(logits.detach(), multilabel).float().cpu())

    def _epoch_scores(self, pl_module: pl.LightningModule) -> torch.Tensor:
        """This epoch's finite scores from every rank; the buffer is emptied."""
        local = torch.cat(self._scores) if self._scores else torch.empty(0)
        self._scores = []
        scores = self._gather(pl_module, local)
        return scores[torch.isfinite(scores)]

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        if not trainer.sanity_checking:
            self._collect(trainer, pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        scores = self._epoch_scores(pl_module)
        if scores.numel() == 0:
            log.warning("OODCalibration: no finite validation score this epoch; threshold kept")
            return
        self.threshold = calibrate_threshold(scores, self.quantile)
        self.num_scores = int(scores.numel())
        pl_module.log(self.log_key, self.threshold, batch_size=self.num_scores)

    # -- test: how many test images fall below the calibrated threshold -----------------------
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._scores = []

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        if self.threshold is not None:
            self._collect(trainer, pl_module, outputs, batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``test/ood_flagged``: the share of test images below the validation threshold."""
        scores = self._epoch_scores(pl_module)
        if self.threshold is None or scores.numel() == 0:
            return
        flagged = float((scores < self.threshold).float().mean())
        pl_module.log("test/ood_flagged", flagged, batch_size=int(scores.numel()))
        pl_module.log("test/ood_threshold", self.threshold, batch_size=int(scores.numel()))

    @staticmethod
    def _gather(pl_module: pl.LightningModule, scores: torch.Tensor) -> torch.Tensor:
        """All ranks' scores (ranks may hold different counts: pad with NaN, gather, drop NaN)."""
        if pl_module.trainer.world_size <= 1:
            return scores
        device = pl_module.device
        counts = pl_module.all_gather(torch.tensor([scores.numel()], device=device)).flatten()
        padded = torch.full((max(1, int(counts.max())),), math.nan, device=device)
        padded[: scores.numel()] = scores.to(device)
        gathered = pl_module.all_gather(padded).flatten().cpu()
        return gathered[torch.isfinite(gathered)]

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain values only, so checkpoints keep loading with ``torch.load(weights_only=True)``."""
        return {
            "threshold": self.threshold,
            "quantile": self.quantile,
            "num_scores": self.num_scores,
            "score": "max_softmax (max_sigmoid for multi-label tasks)",
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        threshold = state_dict.get("threshold")
        self.threshold = float(threshold) if threshold is not None else None
        self.num_scores = int(state_dict.get("num_scores", 0))

    @classmethod
    def state_from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
        """The saved state (``threshold``, ``quantile``...) of this callback in a loaded
        checkpoint dict, or None when the run did not use it or never finished a validation."""
        state = _callback_state(checkpoint, cls.__qualname__)
        return state if state is not None and state.get("threshold") is not None else None


class MahalanobisCalibration(pl.Callback):
    """Fit the Mahalanobis OOD detector on training features every validation epoch; checkpoint it.

    At each validation epoch (not the sanity check): the pooled C5 features of up to
    ``max_train_images`` training images, read through the evaluation transform
    (``datamodule.train_eval_dataloader``), give the class means and the precision of the
    Ledoit-Wolf shrunk tied covariance (:func:`~mnv3.models.ood.fit_class_gaussians`; one
    Gaussian for a multi-label task). The validation images' scores
    (:func:`~mnv3.models.ood.mahalanobis_score`: minus the squared distance to the nearest class
    mean) then give the threshold, their ``quantile``, as :class:`OODCalibration` does for the
    softmax. The fit is redone every validation epoch because any of them may save the best
    checkpoint, and the statistics must belong to that checkpoint's weights; the cost is one
    forward pass over at most ``max_train_images`` images. Everything is kept in
    :meth:`state_dict` as plain tensors and numbers (``torch.load(weights_only=True)`` reads it).

    Args:
        quantile: fraction of in-distribution validation images allowed below the threshold.
        max_train_images: cap of the training pass (a seeded random subset beyond it).
        log_key: the metric name of the threshold.
    """

    def __init__(
        self,
        quantile: float = 0.05,
        max_train_images: int = 10_000,
        log_key: str = "val/mahalanobis_threshold",
    ) -> None:
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        if max_train_images < 2:
            raise ValueError(f"max_train_images must be at least 2, got {max_train_images}")
        self.quantile = float(quantile)
        self.max_train_images = int(max_train_images)
        self.log_key = log_key
        self.means: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None
        self.shrinkage: float | None = None
        self.threshold: float | None = None
        self.num_train = 0
        self.num_scores = 0
        self._features: list[torch.Tensor] = []

    @property
    def fitted(self) -> bool:
        return self.means is not None and self.precision is not None

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """The Mahalanobis confidence of pooled features with the fitted statistics."""
        if self.means is None or self.precision is None:
            raise RuntimeError("MahalanobisCalibration has not been fitted")
        return mahalanobis_score(features, self.means, self.precision)

    # -- collection ----------------------------------------------------------------------------
    @staticmethod
    def _features_of(pl_module: pl.LightningModule, images: torch.Tensor) -> torch.Tensor:
        network = getattr(pl_module, "evaluated_network", pl_module)
        prepare = getattr(pl_module, "prepare_images", lambda x: x)
        with torch.no_grad():
            return pooled_features(network, prepare(images)).cpu()

    def _collect(self, pl_module: pl.LightningModule, batch: Any) -> None:
        images = batch["image"]
        if images.shape[0]:  # every image of the batch may have been unreadable
            self._features.append(self._features_of(pl_module, images))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._features = []

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        if not trainer.sanity_checking:
            self._collect(pl_module, batch)

    def _fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Fit means and precision on the training pass; False (and a warning) when impossible."""
        datamodule = getattr(trainer, "datamodule", None)
        if not hasattr(datamodule, "train_eval_dataloader"):
            log.warning("MahalanobisCalibration: the data module has no train_eval_dataloader")
            return False
        multilabel = is_multilabel(pl_module, datamodule)
        seed = int(getattr(datamodule, "seed", 0))
        loader = datamodule.train_eval_dataloader(self.max_train_images, seed)
        device = pl_module.device
        features, labels = [], []
        for batch in loader:
            if batch["image"].shape[0] == 0:
                continue
            features.append(self._features_of(pl_module, batch["image"].to(device)))
            labels.append(batch["label"].cpu())
        if sum(len(f) for f in features) < 2:
            log.warning("MahalanobisCalibration: fewer than 2 training images; not fitted")
            return False
        found = fit_class_gaussians(
            torch.cat(features), None if multilabel else torch.cat(labels).long()
        )
        self.means, self.precision = found["means"], found["precision"]
        self.shrinkage = float(found["shrinkage"])
        self.num_train = sum(len(f) for f in features)
        return True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        features, self._features = self._features, []
        if not self._fit(trainer, pl_module):
            return
        local = self.scores(torch.cat(features)).float() if features else torch.empty(0)
        scores = OODCalibration._gather(pl_module, local)
        scores = scores[torch.isfinite(scores)]
        if scores.numel() == 0:
            log.warning("MahalanobisCalibration: no finite validation score; threshold kept")
            return
        self.threshold = calibrate_threshold(scores, self.quantile)
        self.num_scores = int(scores.numel())
        pl_module.log(self.log_key, self.threshold, batch_size=self.num_scores)

    # -- test: how many test images fall below the calibrated threshold -----------------------
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._features = []

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        if self.fitted and self.threshold is not None:
            self._collect(pl_module, batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``test/ood_flagged_mahalanobis``: the share of test images below the threshold."""
        features, self._features = self._features, []
        if not features or self.threshold is None:
            return
        scores = OODCalibration._gather(pl_module, self.scores(torch.cat(features)).float())
        if scores.numel() == 0:
            return
        flagged = float((scores < self.threshold).float().mean())
        size = int(scores.numel())
        pl_module.log("test/ood_flagged_mahalanobis", flagged, batch_size=size)
        pl_module.log("test/mahalanobis_threshold", self.threshold, batch_size=size)

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers, so checkpoints keep loading with ``weights_only=True``."""
        return {
            "means": self.means,
            "precision": self.precision,
            "shrinkage": self.shrinkage,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "max_train_images": self.max_train_images,
            "num_train": self.num_train,
            "num_scores": self.num_scores,
            "score": "-min_k squared Mahalanobis distance of pooled C5 features (tied covariance)",
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.means = state_dict.get("means")
        self.precision = state_dict.get("precision")
        shrinkage, threshold = state_dict.get("shrinkage"), state_dict.get("threshold")
        self.shrinkage = float(shrinkage) if shrinkage is not None else None
        self.threshold = float(threshold) if threshold is not None else None
        self.num_train = int(state_dict.get("num_train", 0))
        self.num_scores = int(state_dict.get("num_scores", 0))

    @classmethod
    def state_from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
        """This callback's saved state (means, precision, threshold...) in a loaded checkpoint
        dict, or None when the run did not use it or never fitted it."""
        state = _callback_state(checkpoint, cls.__qualname__)
        if state is None or state.get("means") is None or state.get("threshold") is None:
            return None
        return state

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> MahalanobisCalibration | None:
        """The fitted callback a checkpoint carries (for evaluation and ``mnv3.explain``)."""
        state = cls.state_from_checkpoint(checkpoint)
        if state is None:
            return None
        found = cls(
            quantile=float(state.get("quantile", 0.05)),
            max_train_images=int(state.get("max_train_images", 10_000)),
        )
        found.load_state_dict(state)
        return found


def _callback_state(checkpoint: Mapping[str, Any], qualname: str) -> dict[str, Any] | None:
    """The state a checkpoint keeps for the callback class named ``qualname`` (Lightning keys
    stateful callbacks by class name, with ``{...}`` appended when a state key is customised)."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        name = key if isinstance(key, str) else getattr(key, "__qualname__", "")
        if name.split("{")[0] == qualname and isinstance(state, Mapping):
            return dict(state)
    return None


class GradCamImages(pl.Callback):
    """Write Grad-CAM overlays of the first validation images at the end of validation epochs.

    The first ``num_images`` images of validation batch 0 are kept (the same images every epoch
    when the validation loader does not shuffle), explained for their predicted class (the top
    logit for a multi-label task) with :func:`mnv3.models.gradcam.grad_cam` on the task's eval
    network, and written as ``<default_root_dir>/plots/gradcam_epochNNN_<i>.png``; the files are
    also sent to image-taking loggers under ``val/gradcam``. Only global rank 0 writes.

    Args:
        num_images: how many images to explain.
        tap: the feature tap explained (C5: the map the classifier pools).
        alpha: weight of the heat-map colour in the overlay.
        every_n_epochs: write every this many epochs.
    """

    def __init__(
        self, num_images: int = 4, tap: str = "C5", alpha: float = 0.5, every_n_epochs: int = 1
    ) -> None:
        if num_images < 1 or every_n_epochs < 1:
            raise ValueError("num_images and every_n_epochs must be at least 1")
        self.num_images = int(num_images)
        self.tap = tap
        self.alpha = float(alpha)
        self.every_n_epochs = int(every_n_epochs)
        self._images: torch.Tensor | None = None
        self.last_paths: list[Path] = []

    def _due(self, trainer: pl.Trainer) -> bool:
        return (
            not trainer.sanity_checking
            and trainer.is_global_zero
            and trainer.current_epoch % self.every_n_epochs == 0
        )

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and self._due(trainer):
            self._images = batch["image"][: self.num_images].detach().clone()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        images, self._images = self._images, None
        if images is None or images.shape[0] == 0 or not self._due(trainer):
            return
        network = pl_module.evaluated_network
        if not isinstance(network, MobileNet):
            log.warning("GradCamImages: %s is not a MobileNet; skipped", type(network).__name__)
            return
        heat = grad_cam(network, images, tap=self.tap)
        display = self._to_uint8(trainer, images)
        folder = Path(trainer.default_root_dir) / "plots"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (image, cam) in enumerate(zip(display, heat, strict=True)):
            path = folder / f"gradcam_epoch{trainer.current_epoch:03d}_{i}.png"
            save_png(overlay_heatmap(image, cam, self.alpha), path)
            paths.append(path)
        self.last_paths = paths
        log_images(trainer.loggers, "val/gradcam", paths, step=trainer.global_step)

    @staticmethod
    def _to_uint8(trainer: pl.Trainer, images: torch.Tensor) -> torch.Tensor:
        """Undo the data module's normalisation (per-image min-max when it has no mean/std)."""
        images = images.detach().float().cpu()
        datamodule = getattr(trainer, "datamodule", None)
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if mean is not None and std is not None:
            pixels = images * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        else:
            low = images.amin(dim=(1, 2, 3), keepdim=True)
            high = images.amax(dim=(1, 2, 3), keepdim=True)
            pixels = (images - low) / (high - low).clamp_min(1e-12)
        return (pixels.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
