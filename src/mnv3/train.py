"""Train a model: ``python -m mnv3.train [backbone=large] [data=imagenet] [experiment=...] [-m ...]``.

Kept short on purpose: the config (conf/train.yaml) says what to build; this file builds it in
order, checks what can be checked before reading data, and prints the final metrics.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mnv3.accelerator import resolve_device
from mnv3.cli import (
    CONFIG_DIR,
    build_datamodule,
    command_line_overrides,
    default_wandb_offline,
    exit_on_user_error,
    print_config_tree,
    print_metrics_table,
    size_cpus,
    to_plain,
)
from mnv3.errors import ConfigError
from mnv3.output_dir_check import check_output_dir
from mnv3.preemption import (
    AtomicCheckpointIO,
    PeriodicLastCheckpoint,
    Preempted,
    PreemptionCheckpoint,
    exit_preempted,
)
from mnv3.resumable_logs import ResumableCSVLogger, wandb_run_id
from mnv3.resume import requeued_checkpoint, restore_run_config, resume_argv
from mnv3.run_folder import BEST_NAME, CSV_DIR, RunFolder
from mnv3.thread_tuner import thread_tuner
from mnv3.validate import (
    check_checkpoint_fits,
    check_groups_fit,
    check_train_config,
)

log = logging.getLogger("mnv3.train")


def build_task(cfg: DictConfig, datamodule: Any) -> pl.LightningModule:
    """The task the head asks for (``head.task``), built by the task class from the plain config."""
    from mnv3.tasks import TASKS

    return TASKS[cfg.head.task].from_config(to_plain(cfg), datamodule)


def build_loggers(cfg: DictConfig, output_dir: Path, resuming: bool | None = None) -> list[Any]:
    """The always-on CSV logger plus the chosen ones (W&B offline by default).

    ``resuming`` (default: the config has a ``ckpt_path``) continues the run folder's CSV file
    and W&B run instead of starting new ones."""
    if resuming is None:
        resuming = bool(cfg.get("ckpt_path"))
    loggers: list[Any] = [
        ResumableCSVLogger(save_dir=str(output_dir), name=CSV_DIR, version="", resume=resuming)
    ]
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if logger_cfg is None or "_target_" not in logger_cfg:
            continue
        extra: dict[str, Any] = {}
        if name == "wandb":
            default_wandb_offline()
            if not logger_cfg.get("id") and not logger_cfg.get("version"):
                extra["id"] = wandb_run_id(output_dir, resume=resuming)
        loggers.append(hydra.utils.instantiate(logger_cfg, _convert_="all", **extra))
    return loggers


def build_callbacks(
    cfg: DictConfig,
    task: pl.LightningModule,
    output_dir: Path,
    summary: dict[str, float] | None = None,
    input_size: tuple[int, int] | None = None,
) -> list[pl.Callback]:
    """best.ckpt by the task's metric; last.ckpt every N steps and every epoch; progress; lr;
    the model summary with ``summary``'s MAdds (:meth:`BaseTask.model_summary`) at ``input_size``."""
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    from mnv3.progress import MAddsSummary, progress_bar

    cb = cfg.callbacks
    ckpt_dir = RunFolder(output_dir).checkpoint_dir
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename=BEST_NAME,
            monitor=task.monitor,
            mode=task.monitor_mode,
            save_top_k=1,
            save_last=True,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        # Mid-epoch last.ckpt, so a killed run loses at most N steps.
        PeriodicLastCheckpoint(
            dirpath=ckpt_dir,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=int(cb.last_every_n_steps),
            enable_version_counter=False,
        ),
    ]
    # Callbacks that only make sense for this task, as its head config asks (head.callbacks).
    callbacks += task.callbacks(to_plain(cfg.head.get("callbacks")))
    tuner = thread_tuner(to_plain(cfg.get("cpu")) or {}, str(cfg.trainer.get("accelerator")))
    if tuner is not None:
        callbacks.append(tuner)
    if cb.get("lr_monitor", True):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    progress = progress_bar(str(cb.progress_bar), int(cb.get("progress_every_n_steps", 50)))
    if progress is not None:
        callbacks.append(progress)
    if summary is not None and input_size is not None:
        params, madds = int(summary["model/params"]), float(summary["model/madds"])
        depth = int(cb.get("model_summary_depth") or 0)
        callbacks.append(MAddsSummary(depth, params, madds, input_size))
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
    cfg = _checked_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg.data, num_workers=cfg.cpu.resolved.num_workers)
    task = build_task(cfg, datamodule)
    check_checkpoint_fits(cfg.ckpt_path, task)  # class count, EMA: not Lightning's ~150 lines
    loggers = build_loggers(cfg, output_dir)
    input_size = datamodule.input_size
    summary = task.model_summary(input_size)  # params and MAdds at the data's input size
    callbacks = build_callbacks(cfg, task, output_dir, summary, input_size)
    preemption = PreemptionCheckpoint(RunFolder(output_dir).last_checkpoint)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        logger=loggers,
        callbacks=[*callbacks, preemption],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=cfg.callbacks.progress_bar != "none",
    )

    for logger in loggers:
        logger.log_hyperparams({**to_plain(cfg), **summary})

    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    except SIGTERMException:  # Lightning stops the fit on SIGTERM (and SIGUSR1, preemption.py)
        signum = preemption.signum or int(signal.SIGTERM)
        stopped = Preempted(signum, trainer.global_step, preemption.checkpoint_step, output_dir)
        exit_preempted(stopped, loggers)
    metrics = _test_and_report(cfg, trainer, task, datamodule)
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()  # a multirun starts the next job's W&B run cleanly
    value = metrics.get(cfg.optimized_metric or task.monitor)
    return float(value) if value is not None else None


def _checked_config(cfg: DictConfig) -> DictConfig:
    """The config to run (a resumed or requeued run's own), checked before any data is read;
    saved as the run's ``config_resolved.yaml``."""
    if cfg.get("resume"):
        cfg = restore_run_config(cfg, command_line_overrides())
    requeued = requeued_checkpoint(Path(cfg.paths.output_dir))
    if requeued is not None and not cfg.get("ckpt_path"):
        with open_dict(cfg):
            cfg.ckpt_path = str(requeued)  # SLURM requeued this job: continue, don't restart
    # trainer.accelerator/precision auto -> what this machine has, before the checks see them
    device = resolve_device(cfg)
    check_train_config(cfg)  # values, backbone.weights, ckpt_path: one sentence before any data
    if device is not None:
        log.info("%s", device.describe())
    size_cpus(cfg)  # threads and workers for the usable CPUs, saved under cpu.resolved
    output_dir = Path(cfg.paths.output_dir)
    check_output_dir(output_dir, "paths.output_dir")
    print_config_tree(cfg, save_to=RunFolder(output_dir).config_file)
    check_groups_fit(cfg)
    return cfg


def _test_and_report(
    cfg: DictConfig, trainer: pl.Trainer, task: pl.LightningModule, datamodule: Any
) -> dict[str, Any]:
    """Test the best checkpoint (when the data has a test split) and print the final metrics."""
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
    return metrics


def _resume_argv() -> None:
    """``resume=<run>``: point Hydra's output folder at the run before Hydra picks one;
    ``backbone=<file.yaml>``: a block-table file anywhere, as overrides Hydra can compose."""
    from mnv3.models.block_table import BlockTableError, backbone_file_overrides

    try:
        sys.argv[1:] = backbone_file_overrides(resume_argv(sys.argv[1:]))
    # Logging is not configured yet: the sentence goes to stderr only.
    except (ConfigError, BlockTableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return train(cfg)


def main() -> float | None:
    """``python -m mnv3.train [overrides]``; ``resume=<run>`` continues that run in its folder."""
    _resume_argv()
    return _hydra_main()


if __name__ == "__main__":
    main()
