"""What ``trainer.accelerator: auto`` and ``trainer.precision: auto`` mean on this machine.

``trainer=default`` (conf/trainer/default.yaml) trains on what the machine has, so a GPU user is
not silently trained on the CPU, while the CPU demos pick ``trainer=cpu`` themselves. The choice
is made here, before the trainer is built, rather than left to Lightning's own ``auto``: the CPU
sizing (:mod:`mnv3.cpus`, :mod:`mnv3.thread_tuner`) and :func:`mnv3.validate.check_accelerator`
then see the accelerator the run really uses, the start-up log says it, and the run's
``config_resolved.yaml`` records it. Lightning has no ``precision: auto``; this module gives it
one. Nothing here imports Hydra or Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, open_dict

AUTO = "auto"
CPU_PRECISION = "32-true"


def visible_accelerator() -> str:
    """``gpu`` when a CUDA device is visible, ``mps`` on Apple silicon, else ``cpu``.

    Lightning's ``auto`` picks in the same order (TPUs aside, which mnv3 does not target).
    """
    import torch

    if torch.cuda.is_available():
        return "gpu"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def auto_precision(accelerator: str, training: bool = True) -> str:
    """The precision ``auto`` stands for on ``accelerator``.

    Training on a CUDA GPU: bf16 autocast where the GPU has bfloat16 (Ampere and newer: no loss
    scaling needed), else fp16 autocast with Lightning's loss scaling. The CPU, MPS and every
    evaluation (``training=False``) stay in float32: the published accuracies are float32 numbers,
    and CPU autocast is slower than float32 for these convolutions.
    """
    if not training or accelerator not in ("gpu", "cuda"):
        return CPU_PRECISION
    import torch

    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


@dataclass(frozen=True)
class DeviceChoice:
    """The accelerator and precision a run uses, and whether mnv3 picked them (``auto``)."""

    accelerator: str
    precision: Any
    devices: Any
    picked: bool  # the config said auto for the accelerator or the precision

    def describe(self) -> str:
        """The start-up log line, e.g. ``accelerator: gpu x1, precision bf16-mixed (auto: ...)``."""
        how = f" (auto: {_machine(self.accelerator)})" if self.picked else ""
        return f"accelerator: {self.accelerator} x{self.devices}, precision {self.precision}{how}"


def _machine(accelerator: str) -> str:
    return {
        "gpu": "a CUDA GPU is visible",
        "mps": "Apple MPS is available",
        "cpu": "no GPU visible",
    }.get(accelerator, accelerator)


def resolve_device(cfg: DictConfig, training: bool = True) -> DeviceChoice | None:
    """Replace ``auto`` in ``cfg.trainer.accelerator`` and ``cfg.trainer.precision`` by what this
    machine has (:func:`visible_accelerator`, :func:`auto_precision`), in place.

    Other values are kept as given (``trainer=gpu`` on a CPU machine is refused by
    :func:`mnv3.validate.check_accelerator`, not moved to the CPU). Returns the choice, or None
    for a config without a trainer section.
    """
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig):
        return None
    accelerator = str(trainer.get("accelerator", AUTO))  # Lightning's default is auto too
    precision = trainer.get("precision", CPU_PRECISION)
    picked = AUTO in (accelerator, precision)
    if accelerator == AUTO:
        accelerator = visible_accelerator()
    if precision == AUTO:
        precision = auto_precision(accelerator, training)
    with open_dict(cfg):
        cfg.trainer.accelerator = accelerator
        if "precision" in trainer:
            cfg.trainer.precision = precision
    return DeviceChoice(accelerator, precision, trainer.get("devices", 1), picked)
