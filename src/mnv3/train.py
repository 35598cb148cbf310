"""Train a model: ``python -m mnv3.train [backbone=large] [data=imagenet] [experiment=...] [-m ...]``.

Kept short on purpose: the config (conf/train.yaml) says what to build; this file builds it in
order, checks what can be checked before reading data, and prints the final metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from mnv3.cli import (
    CONFIG_DIR,
    ConfigError,
    build_datamodule,
    check_channels,
    check_head_and_data,
    default_wandb_offline,
    exit_on_user_error,
    model_kwargs,
    print_config_tree,
    print_metrics_table,
    to_plain,
)

log = logging.getLogger("mnv3.train")


def build_task(cfg: DictConfig, datamodule: Any) -> pl.LightningModule:
    """The task the head asks for, built from plain-typed arguments only."""
    from mnv3.tasks import TASKS

    task_cls = TASKS[cfg.head.task]
    label_type = getattr(datamodule, "label_type", "multiclass")
    return task_cls(
        model=model_kwargs(cfg),
        num_classes=datamodule.num_classes,
        class_names=list(datamodule.class_names),
        optimizer=to_plain(cfg.optim),
        scheduler=to_plain(cfg.scheduler),
        label_smoothing=float(cfg.head.get("label_smoothing", 0.0)),
        ema_decay=cfg.ema_decay,
        channels_last=bool(cfg.channels_last),
        compile=bool(cfg.compile),
        label_type=label_type,
        class_weights=class_weights(
            to_plain(cfg.head.get("class_weights")), datamodule, label_type
        ),
        freeze_backbone_epochs=int(cfg.get("freeze_backbone_epochs", 0)),
        backbone_lr_factor=float(cfg.get("backbone_lr_factor", 1.0)),
    )


def class_weights(setting: Any, datamodule: Any, label_type: str) -> list[float] | None:
    """None, an explicit list, or "balanced": weights from the training split's label counts.

    Multiclass: n / (k * count_c) per class (cross-entropy weights). Multilabel: negatives /
    positives per label (BCE pos_weight), uncertain (NaN) labels left out of both counts.
    """
    if setting is None or isinstance(setting, list):
        return setting
    if setting != "balanced":
        raise ConfigError(f"head.class_weights must be null, a list or 'balanced', got {setting!r}")
    import torch

    train = datamodule.get_dataset("train")
    if label_type == "multilabel":
        labels = torch.as_tensor(train.label_matrix, dtype=torch.float32)
        positives = (labels == 1).sum(0).clamp(min=1)
        negatives = (labels == 0).sum(0)
        return (negatives / positives).tolist()
    counts = torch.bincount(torch.as_tensor(train.targets), minlength=datamodule.num_classes).clamp(
        min=1
    )
    return (counts.sum() / (len(counts) * counts.float())).tolist()


def build_loggers(cfg: DictConfig, output_dir: Path) -> list[Any]:
    """The always-on CSV logger plus the chosen ones (W&B offline by default)."""
    from pytorch_lightning.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(output_dir), name="csv", version="")]
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if logger_cfg is None or "_target_" not in logger_cfg:
            continue
        if name == "wandb":
            default_wandb_offline()
        loggers.append(hydra.utils.instantiate(logger_cfg, _convert_="all"))
    return loggers


def build_callbacks(
    cfg: DictConfig, task: pl.LightningModule, output_dir: Path
) -> list[pl.Callback]:
    """best.ckpt by the task's metric; last.ckpt every N steps and every epoch; progress; lr."""
    from pytorch_lightning.callbacks import (
        EarlyStopping,
        LearningRateMonitor,
        ModelCheckpoint,
        RichModelSummary,
        RichProgressBar,
        TQDMProgressBar,
    )

    cb = cfg.callbacks
    ckpt_dir = output_dir / "checkpoints"
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best",
            monitor=task.monitor,
            mode=task.monitor_mode,
            save_top_k=1,
            save_last=True,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        # Mid-epoch last.ckpt, so a killed run loses at most N steps.
        ModelCheckpoint(
            dirpath=ckpt_dir,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=int(cb.last_every_n_steps),
            enable_version_counter=False,
        ),
    ]
    if cfg.head.task == "classification":
        from mnv3.tasks.callbacks import GradCamImages, OODCalibration

        if cb.get("ood_quantile"):
            callbacks.append(OODCalibration(quantile=float(cb.ood_quantile)))
        if cb.get("gradcam_images"):
            callbacks.append(
                GradCamImages(
                    num_images=int(cb.gradcam_images),
                    every_n_epochs=int(cb.get("gradcam_every_n_epochs", 1)),
                )
            )
    if cb.get("lr_monitor", True):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cb.progress_bar == "rich":
        callbacks.append(RichProgressBar())
    elif cb.progress_bar == "tqdm":
        callbacks.append(TQDMProgressBar())
    if cb.get("model_summary_depth"):
        callbacks.append(RichModelSummary(max_depth=int(cb.model_summary_depth)))
    if cb.get("early_stopping"):
        callbacks.append(
            EarlyStopping(
                monitor=task.monitor, mode=task.monitor_mode, **to_plain(cb.early_stopping)
            )
        )
    return callbacks


@exit_on_user_error
def train(cfg: DictConfig) -> float | None:
    """Fit, then test the best checkpoint; returns ``cfg.optimized_metric`` for sweepers."""
    output_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_resolved.yaml")
    check_head_and_data(cfg)
    check_channels(cfg)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg.data)
    task = build_task(cfg, datamodule)
    loggers = build_loggers(cfg, output_dir)
    callbacks = build_callbacks(cfg, task, output_dir)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=cfg.callbacks.progress_bar != "none",
    )

    summary = task.model_summary(int(cfg.data.get("image_size", 224)))
    for logger in loggers:
        logger.log_hyperparams({**to_plain(cfg), **summary})
    log.info(
        "model: %s params, %.1fM MAdds",
        f"{summary['model/params']:,}",
        summary["model/madds"] / 1e6,
    )

    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    metrics = {k: v for k, v in trainer.callback_metrics.items()}

    fast = bool(cfg.trainer.get("fast_dev_run", False))
    if cfg.test and getattr(datamodule, "has_test", False) and not trainer.interrupted:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(
            task,
            datamodule=datamodule,
            ckpt_path=None if fast or not best else "best",
            weights_only=True,
        )
        metrics.update(trainer.callback_metrics)

    best_cb = trainer.checkpoint_callback
    if best_cb is not None and best_cb.best_model_score is not None:
        metrics[f"best {task.monitor}"] = best_cb.best_model_score
    print_metrics_table(f"{cfg.run_name}: final metrics", metrics)
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path:
        log.info("best checkpoint: %s", trainer.checkpoint_callback.best_model_path)
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()  # a multirun starts the next job's W&B run cleanly
    value = metrics.get(cfg.optimized_metric or task.monitor)
    return float(value) if value is not None else None


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
