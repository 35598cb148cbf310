"""What every task shares: building the network, EMA, compile, channels-last, freezing,
backbone/head parameter groups, batch-scaled lr, optimizer and schedule, the non-finite-loss stop,
skipped-image counting and the model summary.

A task subclass owns only its loss, metrics and pictures, plus :meth:`BaseTask.from_config` (how
it builds itself from the plain config and the data module) and :meth:`BaseTask.callbacks` (the
callbacks that only make sense for it). The entry points never branch on the task.

Hyperparameters are plain Python types (:func:`~mnv3.tasks.common.check_plain`), so every
checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import pytorch_lightning as pl
import torch
from torch import nn

from mnv3.errors import ConfigError
from mnv3.models import build_model, count_madds, count_params
from mnv3.models.backbone import UnsupportedBackbone, check_backbone_limits
from mnv3.models.layers import running_stats_for_single_values
from mnv3.tasks.common import NonFiniteLossError, check_plain
from mnv3.tasks.ema import ModelEma
from mnv3.tasks.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    """The feature-extractor submodules of a network, found by submodule, not by index.

    A detector or segmenter keeps its feature extractor in ``model.backbone``; a classifier
    (:class:`~mnv3.models.MobileNet`) lists its own through ``backbone_modules()`` (stem, blocks
    and last conv: everything but the classification head).
    """
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        return [backbone]
    lister = getattr(model, "backbone_modules", None)
    if callable(lister):
        return list(lister())
    raise TypeError(
        f"{type(model).__name__} has neither a `backbone` submodule nor `backbone_modules()`"
    )


class QATObjective(NamedTuple):
    """Quantization-aware training of a task's network (:func:`mnv3.deploy.qat_finetune`).

    ``network``: the module whose outputs are fake-quantized (a detector's raw outputs, before
    box decoding); ``loss(outputs, targets)``: the task's training loss on them; ``inputs``:
    a data-module batch -> ``(images, targets)``.
    """

    network: nn.Module
    loss: Callable[[Any, Any], torch.Tensor]
    inputs: Callable[[Mapping[str, Any]], tuple[torch.Tensor, Any]]


class BaseTask(pl.LightningModule):
    """A LightningModule around one network built from plain keyword arguments.

    Args:
        model: the network's builder keyword arguments (plain values, :meth:`network_kwargs`);
            :meth:`build_network` turns them into a module.
        num_classes: the dataset's classes (:meth:`network_classes` gives the network's outputs).
        optimizer: ``name`` (rmsprop_tf, sgd, adamw), ``lr``, ``weight_decay``... and optionally
            ``reference_batch_size``: ``lr`` is then scaled linearly to the real global batch.
        scheduler: ``name`` (exponential, cosine, constant), ``warmup_epochs`` and its knobs.
        ema_decay: keep an EMA of the weights (paper: 0.9999) and validate/test with it.
        channels_last: run the network in NHWC memory format (faster convs on CPU and GPU).
        compile: wrap the network's forward in ``torch.compile``.
        freeze_backbone_epochs: fine-tuning: train only the head for this many epochs (backbone
            weights and BatchNorm statistics frozen), then everything.
        backbone_lr_factor: fine-tuning: the backbone's lr is this fraction of the head's.
    """

    #: the metric that picks ``best.ckpt`` and early stopping, and whether higher is better
    monitor = "val/loss"
    monitor_mode = "min"
    #: the config key naming published weights of the whole network (``mnv3.eval`` without a run)
    weights_key = "head.weights"

    #: network builder argument -> the config key it comes from (what decides tensor shapes);
    #: the resume check names these when a checkpoint's architecture differs from the config's
    architecture_keys: ClassVar[dict[str, str]] = {}
    #: the network's kind in mnv3.models.MODELS, and the name built when the config names none
    network_kind: ClassVar[str] = "classifier"
    default_network: ClassVar[str] = "mobilenet_v3_large"
    #: the key of the builder arguments (a checkpoint's ``hyper_parameters["model"]``) that only
    #: this task's networks have: how a checkpoint tells which task wrote it
    model_name_key: ClassVar[str] = "name"

    def __init__(
        self,
        model: dict[str, Any],
        num_classes: int,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        ema_decay: float | None = None,
        channels_last: bool = False,
        compile: bool = False,
        freeze_backbone_epochs: int = 0,
        backbone_lr_factor: float = 1.0,
    ) -> None:
        super().__init__()
        check_plain({"model": model, "optimizer": optimizer, "scheduler": scheduler})
        self.model = self.network(model, num_classes)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = ModelEma(self.model, ema_decay) if ema_decay else None
        self._optimizer_cfg = dict(optimizer)
        self._scheduler_cfg = dict(scheduler) if scheduler else None
        self._channels_last = bool(channels_last)
        self._compile = bool(compile)
        self._freeze_backbone_epochs = int(freeze_backbone_epochs)
        self._backbone_lr_factor = float(backbone_lr_factor)
        self._compiled: Any = None
        self.skipped_images = 0
        # Set by mnv3.eval (save_predictions=true): tasks that can write their predictions
        # (COCO results json, label-map PNGs) write them into this folder.
        self.predictions_dir: Path | None = None

    # -- what a subclass provides ----------------------------------------------------------
    @classmethod
    def network_kwargs(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The network's plain builder arguments from the run config's ``backbone`` and ``head``
        groups: the one translation, used by :meth:`from_config` and the resume check alike."""
        raise NotImplementedError

    @classmethod
    def build_network(cls, model: dict[str, Any]) -> nn.Module:
        """The network from its plain builder arguments (``num_classes`` included): the
        :data:`~mnv3.models.MODELS` builder of kind :attr:`network_kind` that ``model`` names
        under that key (default :attr:`default_network`)."""
        model = dict(model)
        name = model.pop(cls.network_kind, cls.default_network)
        return build_model(cls.network_kind, name, **model)

    @classmethod
    def network_name(cls, model: Mapping[str, Any]) -> str:
        """The network's name from its builder arguments (``ssdlite320_mobilenet_v3_large``)."""
        return f"{model.get(cls.network_kind, cls.default_network)}_{model.get('backbone')}"

    @staticmethod
    def checked_backbone(
        cfg: Mapping[str, Any], limits: Mapping[str, Any], why: str = ""
    ) -> dict[str, Any]:
        """The backbone group, refused in one :class:`ConfigError` sentence where it sets an
        option the head cannot use (``limits``: the head's ``BACKBONE_LIMITS``)."""
        backbone = dict(cfg["backbone"])
        try:
            check_backbone_limits(cfg["head"]["name"], limits, backbone, why)
        except UnsupportedBackbone as exc:
            raise ConfigError(str(exc)) from exc
        return backbone

    @staticmethod
    def network_classes(num_classes: int) -> int:
        """The network's output count for ``num_classes`` dataset classes."""
        return num_classes

    @classmethod
    def network(cls, model: Mapping[str, Any], num_classes: int) -> nn.Module:
        """The task's network for the dataset's ``num_classes``, as the constructor builds it."""
        return cls.build_network({**model, "num_classes": cls.network_classes(num_classes)})

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], datamodule: Any) -> BaseTask:
        """Build the task from the plain (resolved) run config and the data module."""
        raise NotImplementedError

    def callbacks(self, settings: Mapping[str, Any] | None) -> list[pl.Callback]:
        """Callbacks that only make sense for this task (none by default)."""
        return []

    def load_weights(self, weights: str) -> Any:
        """Load published or local weights (path, URL, known name) into the network in place;
        returns the loader's report (which layers were re-initialised)."""
        raise NotImplementedError

    def qat_objective(self, network: nn.Module, example: torch.Tensor) -> QATObjective:
        """What quantization-aware training of ``network`` (this task's trained network, at the
        input size of ``example``) needs: see :class:`QATObjective`."""
        raise NotImplementedError

    @classmethod
    def load_trained(
        cls, ckpt_path: str | Path, checkpoint: Mapping[str, Any] | None = None
    ) -> BaseTask:
        """The task a run saved, for evaluation, export or explanation.

        Loaded with ``weights_only=True``; the pretrained weights the run started from
        (``weights`` / ``backbone_weights`` in its model hparams) are not read again: the
        checkpoint holds the trained ones, and re-reading them would download them or fail
        offline. ``checkpoint``: the already-read file, to avoid a second read of its hparams.
        """
        if checkpoint is None:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model = checkpoint.get("hyper_parameters", {}).get("model")
        overrides: dict[str, Any] = {}
        if isinstance(model, Mapping):
            pretrained = {k: None for k in ("weights", "backbone_weights") if model.get(k)}
            if pretrained:
                overrides["model"] = {**model, **pretrained}
        return cls.load_from_checkpoint(
            ckpt_path, map_location="cpu", weights_only=True, **overrides
        )

    @staticmethod
    def restore_callbacks(checkpoint: Mapping[str, Any]) -> list[pl.Callback]:
        """Callbacks whose saved state evaluation reuses (none by default)."""
        return []

    @staticmethod
    def shared_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor arguments every task reads from the run config the same way."""
        return {
            "optimizer": dict(cfg["optim"]),
            "scheduler": dict(cfg["scheduler"]) if cfg.get("scheduler") else None,
            "ema_decay": cfg.get("ema_decay"),
            "channels_last": bool(cfg.get("channels_last", False)),
            "compile": bool(cfg.get("compile", False)),
            "freeze_backbone_epochs": int(cfg.get("freeze_backbone_epochs", 0)),
            "backbone_lr_factor": float(cfg.get("backbone_lr_factor", 1.0)),
        }

    # -- evaluation: the subclass's _eval_step(batch, batch_idx, stage) and _end_of_eval(stage)
    # serve both the val and the test split ("val" / "test" prefix the logged names).
    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> Any:
        """Update ``stage``'s metrics with one batch (returns what callbacks read, if any)."""
        raise NotImplementedError

    def _end_of_eval(self, stage: str) -> None:
        """Compute, log and reset ``stage``'s metrics at the end of the split."""
        raise NotImplementedError

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        return self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._end_of_eval("val")

    def on_test_epoch_end(self) -> None:
        self._end_of_eval("test")

    # -- the network, as training and evaluation see it ------------------------------------
    @property
    def evaluated_network(self) -> nn.Module:
        """The network validation, test, export and explanation run: the EMA copy of the weights
        when the run keeps one (``ema_decay``; the paper's 0.9999), else ``model``."""
        return self.ema.module if self.ema is not None else self.model

    def net(self, evaluating: bool) -> nn.Module:
        """:attr:`evaluated_network` when evaluating; the compiled network when compiling."""
        network = self.evaluated_network if evaluating else self.model
        if network is self.model and self._compile:
            if self._compiled is None:
                # Kept out of the module tree so state_dict keys stay those of ``self.model``.
                self.__dict__["_compiled"] = torch.compile(self.model)
            return self._compiled
        return network

    def train_forward(self, images: torch.Tensor) -> Any:
        """The training network on ``images`` (memory format applied); a batch of one image
        trains BatchNorm layers that see one value per channel with running statistics (see
        :func:`~mnv3.models.layers.running_stats_for_single_values`) instead of crashing."""
        network = self.net(evaluating=False)
        images = self.prepare_images(images)
        if images.shape[0] != 1:
            return network(images)
        with running_stats_for_single_values(self.model):
            return network(images)

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in the memory format the network runs in."""
        if self._channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, images: torch.Tensor) -> Any:
        return self.net(evaluating=not self.training)(self.prepare_images(images))

    # -- guards shared by every training step ----------------------------------------------
    def count_skipped(self, batch: Mapping[str, Any]) -> None:
        """Add the batch's unreadable images to the run's count (logged as data/skipped_images)."""
        skipped = int(batch.get("skipped", 0))
        if skipped:
            self.skipped_images += skipped
            log.warning("%d unreadable image(s) skipped so far", self.skipped_images)

    def log_skipped(self, batch_size: int) -> None:
        self.log(
            "data/skipped_images",
            float(self.skipped_images),
            on_step=False,
            on_epoch=True,
            reduce_fx="max",
            batch_size=batch_size,
        )

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop the run on a NaN or infinite loss, keeping the last good checkpoint."""
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at step {self.global_step} (epoch "
                f"{self.current_epoch}); stopping so the last good checkpoint is kept (lower "
                "optim.lr or check the data)"
            )

    # -- fine-tuning and EMA -----------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        """Freeze the backbone (weights and BN statistics) for the first fine-tuning epochs."""
        frozen = self.current_epoch < self._freeze_backbone_epochs
        for module in backbone_modules(self.model):
            for p in module.parameters():
                p.requires_grad_(not frozen)
            if frozen:
                module.eval()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None and outputs is not None:
            self.ema.update(self.model)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        opt_cfg = dict(self._optimizer_cfg)
        reference = opt_cfg.pop("reference_batch_size", None)
        if reference:
            opt_cfg["lr"] = opt_cfg["lr"] * self._global_batch_size() / reference
        groups = self.param_groups(opt_cfg["lr"], opt_cfg.get("weight_decay", 0.0))
        optimizer = build_optimizer(self.model, param_groups=groups, **opt_cfg)
        sched_cfg = dict(self._scheduler_cfg or {"name": "constant"})
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(1, self.trainer.max_epochs or 1)
        scheduler = build_scheduler(
            optimizer, total_steps=total, steps_per_epoch=max(1, total // epochs), **sched_cfg
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Backbone and head groups (lr x backbone_lr_factor for the backbone), each split into
        weights that decay and BatchNorm / bias parameters that do not."""
        in_backbone = {id(p) for m in backbone_modules(self.model) for p in m.parameters()}
        groups = []
        for is_backbone in (True, False):
            factor = self._backbone_lr_factor if is_backbone else 1.0
            params = [p for p in self.model.parameters() if (id(p) in in_backbone) == is_backbone]
            for decays in (True, False):
                groups.append(
                    {
                        "params": [p for p in params if (p.ndim > 1) == decays],
                        "weight_decay": weight_decay if decays else 0.0,
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
    def model_summary(self, input_size: int | tuple[int, int] = 224) -> dict[str, float]:
        """Parameters and MAdds of the network at ``input_size`` (an int or (H, W))."""
        return {
            "model/params": count_params(self.model),
            "model/madds": count_madds(self.model, input_size),
        }
