"""Evaluate a checkpoint with the config it was trained with.

``python -m mnv3.eval ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt [split=val]``

The run's resolved config (``config_resolved.yaml`` in the run folder) rebuilds the data module;
the network comes from the checkpoint's own plain hyperparameters, loaded with weights_only=True.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from mnv3.cli import CONFIG_DIR, build_datamodule, exit_on_user_error, print_metrics_table
from mnv3.rundir import find_run_config
from mnv3.validate import check_values, lightning_checkpoint

log = logging.getLogger("mnv3.eval")


@exit_on_user_error
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run the test (or val) split through the checkpoint and print the metrics."""
    from pytorch_lightning.loggers import CSVLogger

    from mnv3.tasks import TASKS

    check_values(cfg)  # split, trainer and data overrides: before anything is read
    ckpt_path = Path(str(cfg.ckpt_path)).expanduser()
    # Read once, safely: an empty, truncated, unsafe or foreign file is one sentence here.
    checkpoint = lightning_checkpoint(ckpt_path, "ckpt_path")
    run_cfg = find_run_config(ckpt_path)
    data_cfg = OmegaConf.merge(run_cfg.data, cfg.get("data") or {})
    check_values(OmegaConf.create({"data": data_cfg}))
    task_cls = TASKS[run_cfg.head.task]
    # The checkpoint holds the trained weights; the pretrained ones the run started from are not
    # needed, and re-reading them would download them again (or fail offline).
    model_hparams = checkpoint["hyper_parameters"].get("model")
    overrides = (
        {"model": {**model_hparams, "weights": None}}
        if isinstance(model_hparams, Mapping) and model_hparams.get("weights")
        else {}
    )
    task = task_cls.load_from_checkpoint(
        ckpt_path, map_location="cpu", weights_only=True, **overrides
    )
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


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
