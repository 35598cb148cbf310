"""Evaluate a checkpoint with the config it was trained with, or released weights without a run.

``python -m mnv3.eval ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt [split=val]``

The run's resolved config (``config_resolved.yaml`` in the run folder) rebuilds the data module;
the network comes from the checkpoint's own plain hyperparameters, loaded with weights_only=True.

``python -m mnv3.eval backbone=large backbone.weights=mobilenet_v3_large.IMAGENET1K_V2
data=imagenet data.root=/data/imagenet split=val`` (no ``ckpt_path``): the task is built from the
composed backbone / head / data groups and the weights are loaded into it (``backbone.weights``
for a classifier, ``head.weights`` for a whole detector or segmenter). A known weights name
(:data:`~mnv3.models.checkpoints.KNOWN_WEIGHTS`) brings the preprocessing it was published with,
for every data key the command line leaves unset, and its published metrics, printed beside the
measured ones.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from mnv3.accelerator import resolve_device
from mnv3.cli import (
    build_datamodule,
    command_line_overrides,
    exit_on_user_error,
    print_metrics_table,
    run_tool_main,
    to_plain,
)
from mnv3.errors import ConfigError
from mnv3.run_folder import CSV_DIR
from mnv3.trained_run import TrainedRun
from mnv3.validate import check_evaluated_config, check_values, check_weights_config

log = logging.getLogger("mnv3.eval")


@exit_on_user_error
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run the test (or val) split through the checkpoint and print the metrics.

    Without ``ckpt_path``, the weights named by the config are evaluated instead
    (:func:`evaluate_weights`).
    """
    check_values(cfg)  # split, trainer and data overrides: before anything is read
    if not cfg.get("ckpt_path"):
        return evaluate_weights(cfg, command_line_overrides())
    # Read once, safely: an empty, truncated, unsafe or foreign file is one sentence here.
    run = TrainedRun.open(cfg.ckpt_path, cfg.get("data"))
    check_values(OmegaConf.create({"data": run.data_config}))
    task = run.task
    # Stateful callbacks the checkpoint carries (e.g. the OOD threshold behind test/ood_flagged).
    callbacks = run.task_class.restore_callbacks(run.checkpoint)
    title = f"{run.ckpt_path.name} on {run.data_config.name} {cfg.split}"
    seed = int(run.config.get("seed", 0))
    return _run_split(cfg, task, run.datamodule(), title, seed, callbacks)


def _run_split(
    cfg: DictConfig,
    task: pl.LightningModule,
    datamodule: Any,
    title: str,
    seed: int,
    callbacks: list[pl.Callback] | None = None,
) -> dict[str, float]:
    """Validate or test ``task`` on ``cfg.split``, log to ``<output>/csv``, print the metrics."""
    from pytorch_lightning.loggers import CSVLogger

    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("save_predictions"):
        task.predictions_dir = output_dir  # detection: COCO results json; segmentation: PNGs
    device = resolve_device(cfg, training=False)  # auto: this machine's GPU or CPU, float32
    if device is not None:
        log.info("%s", device.describe())
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        logger=[CSVLogger(save_dir=str(output_dir), name=CSV_DIR, version="")],
        callbacks=callbacks or [],
    )
    pl.seed_everything(seed, workers=True)
    run = trainer.validate if cfg.split == "val" else trainer.test
    results = run(task, datamodule=datamodule)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    print_metrics_table(title, metrics)
    return metrics


# Published metric names (KnownWeights.metrics) -> the names the tasks log after "<split>/".
PUBLISHED_AS = {"acc1": "acc1", "acc5": "acc5", "box_map": "map", "miou": "miou"}
# What evaluation of weights without a run puts in the task's optimizer slot: never stepped.
_NO_OPTIMIZER = {"name": "sgd", "lr": 1.0}


def user_set_keys(overrides: list[str]) -> set[str]:
    """The dotted keys a Hydra command line sets (``data.resize_size=232`` -> ``data.resize_size``)."""
    keys = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        keys.add(key.split("@", 1)[0])
    return keys


def preprocessing_overrides(
    known: Any, task: str, data_cfg: Mapping[str, Any], user_keys: set[str]
) -> dict[str, Any]:
    """The data keys a known checkpoint's preprocessing sets, except those the user set.

    ``known.preprocessing`` holds the published evaluation recipe (resize, crop, interpolation,
    mean/std: torchvision's weights enums). Only keys the data config has or its task's presets
    accept are returned, so a detection dataset gets its square size and mean/std, no resize.
    """
    from mnv3.data.datamodule import TASK_DATA

    pre = known.preprocessing
    wanted = {
        "image_size": int(pre.crop_size),
        "resize_size": int(pre.resize_size),
        "interpolation": str(pre.interpolation),
        "mean": [float(m) for m in pre.mean],
        "std": [float(s) for s in pre.std],
    }
    accepted = set(inspect.signature(TASK_DATA[task].presets).parameters)
    return {
        key: value
        for key, value in wanted.items()
        if (key in accepted or key in data_cfg) and f"data.{key}" not in user_keys
    }


def published_rows(
    metrics: Mapping[str, float], published: Mapping[str, float], split: str
) -> list[tuple[str, float, float]]:
    """(logged metric, measured in %, published in %) for each published number that was measured."""
    rows = []
    for name, value in published.items():
        logged = f"{split}/{PUBLISHED_AS.get(name, name)}"
        if logged in metrics:
            rows.append((logged, 100.0 * float(metrics[logged]), float(value)))
    return rows


def print_published_table(title: str, rows: list[tuple[str, float, float]]) -> None:
    """Measured next to published, in percent, with the difference."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, min_width=max(40, len(title) + 4))
    for column in ("metric", "measured %", "published %", "difference"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, measured, published in rows:
        table.add_row(name, f"{measured:.3f}", f"{published:.3f}", f"{measured - published:+.3f}")
    Console().print(table)


@dataclass
class WeightsTask:
    """Released or local weights loaded into the task of the composed groups.

    Attributes:
        task: the task with the weights loaded, on CPU.
        datamodule: the data module of the ``data`` group, with the weights' preprocessing.
        weights: the weights' name, URL or path as configured.
        known: their :data:`~mnv3.models.checkpoints.KNOWN_WEIGHTS` entry, or None.
    """

    task: pl.LightningModule
    datamodule: Any
    weights: str
    known: Any

    @property
    def name(self) -> str:
        """How titles name the weights: a known name, else the file's name."""
        return self.weights if self.known is not None else Path(self.weights).name


def task_with_weights(
    cfg: DictConfig, overrides: list[str] | None = None, tool: str = "mnv3.eval"
) -> WeightsTask:
    """The task of the composed backbone / head / data groups with the configured weights, the
    data module preprocessing as a known checkpoint was published with (``mnv3.eval`` and
    ``mnv3.predict`` without ``ckpt_path``).

    ``overrides``: the command line's (Hydra's record), which tells the data keys the user set
    from those a known checkpoint's preprocessing may set. ``tool``: names the entry point in
    the error sentence of a config without weights.
    """
    from mnv3.models.checkpoints import KNOWN_WEIGHTS
    from mnv3.tasks import TASKS

    task_name = str(cfg.head.task) if cfg.get("head") else ""
    key = TASKS[task_name].weights_key if task_name in TASKS else "head.weights"
    weights = check_weights_config(cfg, key, tool)
    known = KNOWN_WEIGHTS.get(weights)
    plain = to_plain(cfg)
    if known is not None:
        preset = preprocessing_overrides(
            known, task_name, plain["data"], user_set_keys(overrides or [])
        )
        plain["data"].update(preset)
        if preset:
            log.info("preprocessing of %s: %s", weights, preset)
    check_evaluated_config(OmegaConf.create({k: plain[k] for k in ("data", "backbone", "head")}))
    datamodule = build_datamodule(plain["data"])
    task = _task_with_weights(plain, datamodule, key, weights)
    return WeightsTask(task, datamodule, weights, known)


@exit_on_user_error
def evaluate_weights(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, float]:
    """Evaluate released or local weights with the composed backbone / head / data groups
    (:func:`task_with_weights`); a known checkpoint's published metrics are printed beside."""
    loaded = task_with_weights(cfg, overrides)
    title = f"{loaded.name} on {cfg.data.name} {cfg.split}"
    metrics = _run_split(cfg, loaded.task, loaded.datamodule, title, int(cfg.get("seed", 0)))
    if loaded.known is not None:
        rows = published_rows(metrics, loaded.known.metrics, str(cfg.split))
        print_published_table(f"{loaded.weights}: measured vs published", rows)
    return metrics


def _task_with_weights(
    plain: dict[str, Any], datamodule: Any, key: str, weights: str
) -> pl.LightningModule:
    """The task of the composed config with ``weights`` loaded into it.

    Built without weights and loaded here, so that a checkpoint that does not fit the data's
    classes is an error rather than a silently re-initialised (random) head.
    """
    from mnv3.tasks import TASKS

    task_name = str(plain["head"]["task"])
    section, _, field = key.partition(".")
    plain[section][field] = None
    plain.setdefault("optim", dict(_NO_OPTIMIZER))
    plain.setdefault("scheduler", None)
    task = TASKS[task_name].from_config(plain, datamodule)
    report = task.load_weights(weights)
    if report is not None and report.reinitialized:
        raise ConfigError(
            f"{key}={weights} has no {task_name} layer for the {datamodule.num_classes} classes of "
            f"data={plain['data']['name']} (its {report.reinitialized[0]} does not fit); evaluate "
            "it on the dataset it was trained for"
        )
    return task


main = run_tool_main(evaluate, "eval")


if __name__ == "__main__":
    main()
