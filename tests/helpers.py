"""Shared helpers for the entry-point tests: tiny generated data and config composition."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from mnv3.cli import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]  # the checkout: bench/, notebooks/

# Small enough for seconds per run on 2 CPU cores; 6 classes x 8 train images, 32x32 pixels.
TINY_DATA = [
    "data.generate.train_per_class=8",
    "data.generate.val_per_class=4",
    "data.generate.test_per_class=4",
    "data.generate.image_size=32",
    "data.image_size=32",
    "data.resize_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
]
QUIET = ["logger=none", "callbacks.progress_bar=none", "callbacks.model_summary_depth=0"]
# Generated street scenes at 32x64: 2 training frames, 1 validation frame.
TINY_SHAPES_CITYSCAPES = (
    "data.generate.train_images=2",
    "data.generate.val_images=1",
    "data.generate.height=32",
    "data.generate.width=64",
    "data.crop_size=[32,64]",
    "data.frame_size=[32,64]",
)


def quiet_trainer(root: Path, **options: Any) -> pl.Trainer:
    """A CPU Lightning Trainer under ``root`` with no logger, checkpoints, progress bar or
    model summary: what tests that drive a task directly fit or validate with."""
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{"accelerator": "cpu", "default_root_dir": root, **quiet, **options})


def compose_train(tmp: Path, overrides: list[str], data_dir: Path | None = None) -> DictConfig:
    """The train config as ``python -m mnv3.train`` would build it, with paths under ``tmp``."""
    return compose_config("train", tmp, overrides, data_dir)


def entry_point_of(experiment: str) -> str:
    """The entry point an experiment file is for: ``search`` when it picks a search
    (``override /search: ...`` in its defaults), else ``train``."""
    import yaml

    text = (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text()
    defaults = yaml.safe_load(text).get("defaults") or []
    picks = [next(iter(d)) for d in defaults if isinstance(d, dict)]
    return "search" if "override /search" in picks else "train"


def compose_config(
    name: str, tmp: Path, overrides: list[str], data_dir: Path | None = None
) -> DictConfig:
    """Entry point ``name``'s config (``train``, ``search``) as its CLI builds it, paths in ``tmp``."""
    GlobalHydra.instance().clear()
    data_dir = data_dir or tmp / "data"
    paths = [
        f"paths.root_dir={tmp}",
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp}/logs",
        f"paths.output_dir={tmp}/run",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(name, overrides=paths + overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def train_for_epochs(tmp: Path, overrides: list[str], epochs: int = 3) -> Path:
    """Train quietly for ``epochs`` epochs, logging to CSV, into ``tmp/run``; returns ``tmp``."""
    from mnv3.train import train

    train(compose_train(tmp, [*overrides, *QUIET, f"trainer.max_epochs={epochs}", "logger=csv"]))
    return tmp


def _cli_env(env: dict[str, str] | None) -> dict[str, str]:
    """The environment of a CLI run: offline W&B, unbuffered output, ``env`` on top."""
    # HYDRA_FULL_ERROR=0: a user's one-sentence errors (conftest turns tracebacks on in-process).
    return {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "0",
        **(env or {}),
    }


def run_cli(
    module: str, args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <module> args`` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=_cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(
    module: str, args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``python -m <module> args`` in the background (to signal it), output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=_cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    """Poll until ``path`` exists (or ``proc`` ends, or the timeout passes)."""
    import time

    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)


def metrics_rows(run: Path) -> list[dict[str, str]]:
    """The rows of a run's ``csv/metrics.csv``, as ``csv.DictReader`` reads them."""
    import csv

    with open(run / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def last_metric(rows: list[dict[str, str]], key: str) -> float:
    """The last logged value of ``key`` in :func:`metrics_rows` (rows without it are skipped)."""
    return float([r for r in rows if r.get(key)][-1][key])


def epoch_losses(rows: list[dict[str, str]]) -> list[float]:
    """The logged ``train/loss_epoch`` values of :func:`metrics_rows`, epoch by epoch."""
    return [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]


def eval_one_process_and_ddp(ckpt: Path, cwd: Path, overrides: Sequence[str] = ()) -> list[Path]:
    """Evaluate ``ckpt`` on val with one process, then with DDP over 2 CPU processes.

    ``overrides`` (e.g. ``data.*``) apply to both runs. Returns the two run folders
    (``cwd/eval_one``, ``cwd/eval_ddp``), each with its metrics CSV.
    """
    outs = []
    for name, trainer in (("one", []), ("ddp", ["trainer=ddp", "trainer.devices=2"])):
        out = cwd / f"eval_{name}"
        args = [f"ckpt_path={ckpt}", "split=val", *overrides, *trainer, f"hydra.run.dir={out}"]
        result = run_cli("mnv3.eval", args, cwd=cwd, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        outs.append(out)
    return outs
