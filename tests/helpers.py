"""Shared helpers for the entry-point tests: tiny generated data and config composition."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from mnv3.cli import CONFIG_DIR

REPO = CONFIG_DIR.parent

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


def compose_train(tmp: Path, overrides: list[str], data_dir: Path | None = None) -> DictConfig:
    """The train config as ``python -m mnv3.train`` would build it, with paths under ``tmp``."""
    GlobalHydra.instance().clear()
    data_dir = data_dir or tmp / "data"
    paths = [
        f"paths.root_dir={tmp}",
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp}/logs",
        f"paths.output_dir={tmp}/run",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=paths + overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_cli(
    module: str, args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <module> args`` as a user would, capturing its output."""
    # HYDRA_FULL_ERROR=0: a user's one-sentence errors (conftest turns tracebacks on in-process).
    full_env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "0",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(
    module: str, args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``python -m <module> args`` in the background (to signal it), output captured."""
    # HYDRA_FULL_ERROR=0: a user's one-sentence errors (conftest turns tracebacks on in-process).
    full_env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "0",
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
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
