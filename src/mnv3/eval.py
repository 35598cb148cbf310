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
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from mnv3.cli import (
    CONFIG_DIR,
    ConfigError,
    build_datamodule,
    check_channels,
    check_head_and_data,
    exit_on_user_error,
    open_data_overrides,
    print_metrics_table,
    to_plain,
)
from mnv3.rundir import find_run_config
from mnv3.validate import check_backbone_keys, check_values, lightning_checkpoint

log = logging.getLogger("mnv3.eval")


@exit_on_user_error
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run the test (or val) split through the checkpoint and print the metrics.

    Without ``ckpt_path``, the weights named by the config are evaluated instead
    (:func:`evaluate_weights`).
    """
    from pytorch_lightning.loggers import CSVLogger

    from mnv3.tasks import TASKS

    check_values(cfg)  # split, trainer and data overrides: before anything is read
    if not cfg.get("ckpt_path"):
        return evaluate_weights(cfg, _command_line_overrides())
    ckpt_path = Path(str(cfg.ckpt_path)).expanduser()
    # Read once, safely: an empty, truncated, unsafe or foreign file is one sentence here.
    checkpoint = lightning_checkpoint(ckpt_path, "ckpt_path")
    run_cfg = find_run_config(ckpt_path)
    data_cfg = OmegaConf.merge(run_cfg.data, cfg.get("data") or {})
    check_values(OmegaConf.create({"data": data_cfg}))
    task_cls = TASKS[run_cfg.head.task]
    task = task_cls.load_trained(ckpt_path, checkpoint)
    datamodule = build_datamodule(data_cfg)
    output_dir = Path(cfg.paths.output_dir)
    # Stateful callbacks the checkpoint carries (e.g. the OOD threshold behind test/ood_flagged).
    callbacks = task_cls.restore_callbacks(checkpoint)
    if cfg.get("save_predictions"):
        task.predictions_dir = output_dir  # detection: COCO results json; segmentation: PNGs
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        logger=[CSVLogger(save_dir=str(output_dir), name="csv", version="")],
        callbacks=callbacks,
    )
    pl.seed_everything(int(run_cfg.get("seed", 0)), workers=True)
    if cfg.split == "val":
        results = trainer.validate(task, datamodule=datamodule)
    else:
        results = trainer.test(task, datamodule=datamodule)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    print_metrics_table(f"{ckpt_path.name} on {data_cfg.name} {cfg.split}", metrics)
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


@exit_on_user_error
def evaluate_weights(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, float]:
    """Evaluate released or local weights with the composed backbone / head / data groups.

    ``overrides``: the command line's (Hydra's record), which tells the data keys the user set
    from those a known checkpoint's preprocessing may set.
    """
    from pytorch_lightning.loggers import CSVLogger

    from mnv3.models.checkpoints import KNOWN_WEIGHTS
    from mnv3.tasks import TASKS

    if not cfg.get("backbone") or not cfg.get("data") or "_target_" not in cfg.data:
        raise ConfigError(
            "mnv3.eval needs ckpt_path=<run checkpoint>, or backbone=<name>, data=<dataset> and "
            "the weights (backbone.weights for head=classifier, head.weights otherwise)"
        )
    task_name = str(cfg.head.task)
    key = TASKS[task_name].weights_key
    weights = OmegaConf.select(cfg, key)
    if not weights:
        raise ConfigError(
            f"{key} is not set: without ckpt_path, mnv3.eval evaluates the weights it names "
            "(a known name such as mobilenet_v3_large.IMAGENET1K_V2, a URL or a file path)"
        )
    weights = str(weights)
    known = KNOWN_WEIGHTS.get(weights)
    plain = to_plain(cfg)
    if known is not None:
        preset = preprocessing_overrides(
            known, task_name, plain["data"], user_set_keys(overrides or [])
        )
        plain["data"].update(preset)
        if preset:
            log.info("preprocessing of %s: %s", weights, preset)
    checked = OmegaConf.create({k: plain[k] for k in ("data", "backbone", "head")})
    check_values(checked)
    check_head_and_data(checked)
    check_channels(checked)
    check_backbone_keys(checked)

    datamodule = build_datamodule(plain["data"])
    # The task is built without weights and loaded here, so that a checkpoint that does not fit
    # the data's classes is an error rather than a silently re-initialised (random) head.
    section, _, field = key.partition(".")
    plain[section][field] = None
    plain.setdefault("optim", dict(_NO_OPTIMIZER))
    plain.setdefault("scheduler", None)
    task = TASKS[task_name].from_config(plain, datamodule)
    report = task.load_weights(weights)
    if report is not None and report.reinitialized:
        raise ConfigError(
            f"{key}={weights} has no {task_name} layer for the {datamodule.num_classes} classes of "
            f"data={cfg.data.name} (its {report.reinitialized[0]} does not fit); evaluate it on "
            "the dataset it was trained for"
        )
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("save_predictions"):
        task.predictions_dir = output_dir
    trainer = hydra.utils.instantiate(
        cfg.trainer, logger=[CSVLogger(save_dir=str(output_dir), name="csv", version="")]
    )
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True)
    run = trainer.validate if cfg.split == "val" else trainer.test
    results = run(task, datamodule=datamodule)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    title = f"{Path(weights).name if known is None else weights} on {cfg.data.name} {cfg.split}"
    print_metrics_table(title, metrics)
    if known is not None:
        rows = published_rows(metrics, known.metrics, str(cfg.split))
        print_published_table(f"{weights}: measured vs published", rows)
    return metrics


def _command_line_overrides() -> list[str]:
    """The overrides given on the command line (Hydra's record of them)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    """The command line: plain ``data.<key>=`` overrides apply to the checkpoint run's data."""
    sys.argv = open_data_overrides(sys.argv)
    _hydra_main()


if __name__ == "__main__":
    main()
