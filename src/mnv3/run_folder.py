"""The run folder ``mnv3.train`` writes: the one place its layout is spelled.

::

    <run>/config_resolved.yaml            RUN_CONFIG: the resolved config the run was started with
    <run>/checkpoints/best.ckpt           BEST_CKPT: best by the task's monitored metric
    <run>/checkpoints/last.ckpt           LAST_CKPT: newest, resumable (full trainer state)
    <run>/csv/metrics.csv, hparams.yaml   CSV_DIR: the always-on CSV log
    <run>/wandb_run_id                    WANDB_ID_FILE: the W&B run a resume continues
    <run>/wandb/offline-run-*             WANDB_OFFLINE_RUNS: W&B offline records
    <run>/export/<ckpt>[_int8].<format>   EXPORT_DIR: ``mnv3.export``'s default output
    <run>/latency.json                    LATENCY_FILE: ``mnv3.report``'s cached latency
    <run>/.hydra/overrides.yaml           HYDRA_OVERRIDES: how the run was started

Plain paths only (no torch, no Lightning), so the resume code, the report and the tools that open
a finished run (:mod:`mnv3.trained_run`) share it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

RUN_CONFIG = "config_resolved.yaml"
CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best"  # ModelCheckpoint's filename for the best checkpoint
BEST_CKPT = Path(CHECKPOINT_DIR) / f"{BEST_NAME}.ckpt"
LAST_CKPT = Path(CHECKPOINT_DIR) / "last.ckpt"  # Lightning's save_last name
CSV_DIR = "csv"
METRICS_CSV = Path(CSV_DIR) / "metrics.csv"
HPARAMS_YAML = Path(CSV_DIR) / "hparams.yaml"
WANDB_ID_FILE = "wandb_run_id"
WANDB_OFFLINE_RUNS = "offline-run-*"
EXPORT_DIR = "export"
LATENCY_FILE = "latency.json"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"


@dataclass(frozen=True)
class RunFolder:
    """A run folder and where each file of :mod:`the layout <mnv3.run_folder>` lives in it."""

    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / RUN_CONFIG

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def last_checkpoint(self) -> Path:
        return self.path / LAST_CKPT

    @property
    def trained_checkpoint(self) -> Path | None:
        """``checkpoints/best.ckpt``, else ``last.ckpt``, else None (a run that saved none)."""
        for name in (BEST_CKPT, LAST_CKPT):
            if (self.path / name).is_file():
                return self.path / name
        return None

    def export_path(self, ckpt_path: Path, fmt: str, quantize: str | None) -> Path:
        """``export/<checkpoint stem>[_int8|_bf16].<fmt>``: where ``mnv3.export`` writes by default."""
        suffix = f"_{quantize}" if quantize else ""
        return self.path / EXPORT_DIR / f"{ckpt_path.stem}{suffix}.{fmt}"

    @classmethod
    def of_checkpoint(cls, ckpt_path: Path) -> RunFolder:
        """The run folder of ``<run>/checkpoints/<name>.ckpt`` (``<run>``)."""
        return cls(Path(ckpt_path).parent.parent)


def find_run_config(ckpt_path: Path) -> DictConfig:
    """The resolved config saved by ``mnv3.train`` in the run folder holding the checkpoint.

    Looked for next to the checkpoint, then one folder up (``<run>/checkpoints/<name>.ckpt``).

    Raises:
        FileNotFoundError: neither folder holds ``config_resolved.yaml``.
    """
    for folder in (ckpt_path.parent, ckpt_path.parent.parent):
        candidate = folder / RUN_CONFIG
        if candidate.is_file():
            config = OmegaConf.load(candidate)
            assert isinstance(config, DictConfig)
            return config
    raise FileNotFoundError(
        f"no {RUN_CONFIG} next to {ckpt_path} or in its run folder; "
        f"expected the layout <run>/{CHECKPOINT_DIR}/<name>.ckpt with <run>/{RUN_CONFIG}"
    )
