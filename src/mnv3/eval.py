"""Evaluate a checkpoint with the config it was trained with.

``python -m mnv3.eval ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt [split=val]``

The run's resolved config (``config_resolved.yaml`` in the run folder) rebuilds the data module;
the network comes from the checkpoint's own plain hyperparameters, loaded with weights_only=True.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from mnv3.cli import CONFIG_DIR, build_datamodule, exit_on_user_error, print_metrics_table

log = logging.getLogger("mnv3.eval")


def find_run_config(ckpt_path: Path) -> DictConfig:
    """The resolved config saved by ``mnv3.train`` in the run folder holding the checkpoint."""
    for folder in (ckpt_path.parent, *ckpt_path.parents):
        candidate = folder / "config_resolved.yaml"
        if candidate.is_file():
            return OmegaConf.load(candidate)
        if folder == ckpt_path.parent.parent:
            break
    raise FileNotFoundError(
        f"no config_resolved.yaml next to {ckpt_path} or in its run folder; "
        "expected the layout <run>/checkpoints/<name>.ckpt with <run>/config_resolved.yaml"
    )


@exit_on_user_error
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run the test (or val) split through the checkpoint and print the metrics."""
    from pytorch_lightning.loggers import CSVLogger

    from mnv3.tasks import TASKS

    ckpt_path = Path(cfg.ckpt_path).expanduser()
    if not ckpt_path.is_file():
        raise FileNotFoundError(
            f"checkpoint {ckpt_path} does not exist (expected a .ckpt written by mnv3.train)"
        )
    if cfg.split not in ("val", "test"):
        raise ValueError(f"split must be val or test, got {cfg.split!r}")
    run_cfg = find_run_config(ckpt_path)
    data_cfg = OmegaConf.merge(run_cfg.data, cfg.get("data") or {})
    task_cls = TASKS[run_cfg.head.task]
    task = task_cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    datamodule = build_datamodule(data_cfg)
    output_dir = Path(cfg.paths.output_dir)
    callbacks = []
    if run_cfg.head.task == "classification":
        import torch

        from mnv3.tasks.callbacks import OODCalibration

        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        ood_state = OODCalibration.state_from_checkpoint(checkpoint)
        if ood_state is not None:  # reports test/ood_flagged: test images below the val threshold
            ood = OODCalibration(quantile=float(ood_state.get("quantile", 0.05)))
            ood.load_state_dict(ood_state)
            callbacks.append(ood)
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
