"""Run bookkeeping for ``mnv3.train``: a run folder survives kills, preemption and resumes intact.

- :func:`resume_argv` / :func:`restore_run_config`: ``python -m mnv3.train resume=<run>`` continues
  a run in its own folder with its own saved config (``config_resolved.yaml``).
- :class:`ResumableCSVLogger`: continues ``csv/metrics.csv`` instead of deleting it (Lightning's
  CSVLogger removes an existing file), dropping the rows a resumed run logs again.
- :func:`wandb_run_id`: the W&B run id kept in the run folder, so a resume continues the same run.
- :class:`PreemptionCheckpoint`: on SIGTERM / SIGUSR1, saves ``last.ckpt`` at once and lets the
  entry point exit non-zero (:class:`Preempted`).
- :class:`AtomicCheckpointIO`: checkpoints written to a temporary file next to the target and
  renamed over it, so a kill mid-write never leaves a torn ``last.ckpt``.
- :func:`check_output_dir` / :class:`OutputDirCheck`: an unwritable run folder fails at start.
"""

from __future__ import annotations

import csv
import os
import re
import secrets
import signal
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins import TorchCheckpointIO
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from mnv3.cli import ConfigError

RUN_CONFIG = "config_resolved.yaml"
LAST_CKPT = Path("checkpoints") / "last.ckpt"
WANDB_ID_FILE = "wandb_run_id"
# Characters Hydra's override grammar takes unquoted in a value (paths included).
_PLAIN_OVERRIDE_VALUE = re.compile(r"^[\w./:~@+-]+$")


# ---------------------------------------------------------------------------------------------
# resume=<run>


def resume_argv(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with ``resume=<run>`` pointing Hydra's output folder at that run.

    Hydra fixes the output folder before the task runs, so this rewrites ``sys.argv`` first:
    ``hydra.run.dir=<run>`` (unless given) and ``hydra.output_subdir=null`` (so the run's own
    ``.hydra/`` record of how it was started is kept, not replaced by the resume command).

    Raises:
        ConfigError: the folder lacks ``config_resolved.yaml`` or ``checkpoints/last.ckpt``.
    """
    args = list(argv)
    values = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    if not values or values[-1] in ("", "null", "None"):
        return args
    run = Path(values[-1]).expanduser().resolve()
    for needed in (RUN_CONFIG, LAST_CKPT):
        if not (run / needed).is_file():
            raise ConfigError(
                f"resume={values[-1]}: {run / needed} does not exist; expected a run folder "
                f"written by mnv3.train (with {RUN_CONFIG} and {LAST_CKPT})"
            )
    if not any(a.startswith(("hydra.run.dir=", "-m", "--multirun")) for a in args):
        args.append(f"hydra.run.dir={_override_value(str(run))}")
    if not any(a.startswith("hydra.output_subdir=") for a in args):
        args.append("hydra.output_subdir=null")
    return args


def requeued_checkpoint(output_dir: Path) -> Path | None:
    """``<run>/checkpoints/last.ckpt`` when SLURM requeued this job (``SLURM_RESTART_COUNT`` > 0).

    A requeued job runs the same command again, in the same run folder; without this it would
    start from scratch and its CSV log would be rewritten. None for a first start.
    """
    try:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return None
    last = output_dir / LAST_CKPT
    return last if restarts > 0 and last.is_file() else None


def _override_value(value: str) -> str:
    """A value quoted for Hydra's override grammar when it holds characters the grammar parses."""
    if _PLAIN_OVERRIDE_VALUE.match(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def restore_run_config(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The config ``resume=<run>`` continues: the run's saved config plus plain key overrides.

    ``overrides`` are the command line's (Hydra's ``overrides.task``); each dotted ``key=value``
    other than ``resume``/``hydra.*`` is copied from ``cfg`` (where Hydra parsed it) onto the saved
    config, e.g. ``trainer.max_epochs=20``. A group choice that differs from the run's
    (``backbone=large`` on a Small run) would make another run, not continue this one, and is
    refused; repeating the run's own choices (its original command line) is fine. Paths under the run's old folder are moved to
    where it is now, so a run folder can be moved and still resumed.

    Raises:
        ConfigError: a config group is overridden.
    """
    run = Path(str(cfg.resume)).expanduser().resolve()
    saved = OmegaConf.load(run / RUN_CONFIG)
    assert isinstance(saved, DictConfig)
    explicit_ckpt = False
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+")
        if key == "resume" or key.startswith("hydra.") or key == "hydra":
            continue
        if key == "ckpt_path":
            explicit_ckpt = True
        if OmegaConf.is_dict(saved.get(key)) and _same_group(cfg, saved, key):
            continue  # the run's own choice, repeated (e.g. the original command line again)
        if key.startswith("~") or "=" not in override or OmegaConf.is_dict(saved.get(key)):
            raise ConfigError(
                f"resume={cfg.resume} continues that run's own config, so '{override}' cannot "
                "change a config group there; give key=value overrides such as trainer.max_epochs=20"
            )
        value = OmegaConf.select(cfg, key)
        OmegaConf.update(
            saved,
            key,
            OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value,
            force_add=True,
        )
    old_dir, new_dir = str(saved.paths.output_dir), str(run)
    plain = _replace_prefix(OmegaConf.to_container(saved, resolve=True), old_dir, new_dir)
    restored = OmegaConf.create(plain)
    restored.resume = str(run)
    if not explicit_ckpt:
        restored.ckpt_path = str(run / LAST_CKPT)
    return restored


def _same_group(cfg: DictConfig, saved: DictConfig, key: str) -> bool:
    """Whether a group chosen on the command line resolves to what the run saved."""
    if not OmegaConf.is_dict(cfg.get(key)):
        return False
    old = str(OmegaConf.select(saved, "paths.output_dir"))
    new = str(OmegaConf.select(cfg, "paths.output_dir"))
    mine = OmegaConf.to_container(cfg[key], resolve=True)
    theirs = _replace_prefix(OmegaConf.to_container(saved[key], resolve=True), old, new)
    return bool(mine == theirs)


def _replace_prefix(node: Any, old: str, new: str) -> Any:
    """``node`` with every string under the folder ``old`` moved under ``new``."""
    if isinstance(node, dict):
        return {k: _replace_prefix(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_prefix(v, old, new) for v in node]
    if isinstance(node, str) and old != new and (node == old or node.startswith(old + os.sep)):
        return new + node[len(old) :]
    return node


# ---------------------------------------------------------------------------------------------
# CSV and W&B continuity


def _row_step(row: dict[str, Any]) -> int:
    return int(float(row["step"]))


def _row_keys(row: dict[str, Any]) -> frozenset[str]:
    """The metrics a row holds (its non-empty columns), which identify it within a step."""
    return frozenset(k for k, v in row.items() if k != "step" and v not in ("", None))


class ResumableExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer that continues an existing ``metrics.csv`` and writes every row at once.

    Rows are appended as they are logged (Lightning buffers up to ``flush_logs_every_n_steps``,
    which a SIGKILL would lose). On resume, the previous attempt's rows stay, except those the
    resumed run logs again: it replays every step from the first one it logs (``s``), so rows of
    the old attempt after ``s`` are dropped, and a row at ``s`` is replaced by a new row with the
    same metrics. The file then holds the rows an uninterrupted run writes.
    """

    def __init__(self, log_dir: str, resume: bool) -> None:
        self._resume = resume
        super().__init__(log_dir=log_dir)
        self._previous: list[dict[str, str]] | None = None
        self._new_rows: list[dict[str, Any]] = []
        if resume and os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self._previous = list(reader)
                self.metrics_keys = list(reader.fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        if not self._resume:  # a fresh run in a used folder starts a fresh file, as Lightning does
            super()._check_log_dir_exists()

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        """Record one row and write it to the file at once."""
        super().log_metrics(metrics_dict, step)
        self.save()

    def save(self) -> None:
        """Append the pending rows, first dropping the previous attempt's rows they replace."""
        if self._previous is None or not self.metrics:
            super().save()
            return
        # The resumed run's first step: rewrite the file as the previous rows it does not
        # replay plus the new rows (a few rows, at one step), until the run moves past it.
        self._record_new_keys()
        self._new_rows += self.metrics
        self.metrics = []
        start = min(int(m["step"]) for m in self._new_rows)
        replayed = {_row_keys(m) for m in self._new_rows if int(m["step"]) == start}
        kept = [
            row
            for row in self._previous
            if _row_step(row) < start
            or (_row_step(row) == start and _row_keys(row) not in replayed)
        ]
        self._rewrite([*kept, *self._new_rows])
        if any(int(m["step"]) > start for m in self._new_rows):
            self._previous, self._new_rows = None, []

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        tmp = f"{self.metrics_file_path}.tmp-{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose file survives a resume (``resume=True``) and loses no row to a kill."""

    def __init__(self, *args: Any, resume: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume = resume

    @property
    @rank_zero_experiment
    def experiment(self) -> ResumableExperimentWriter:
        """The writer, created on first use (rank zero only, as Lightning's)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableExperimentWriter(self.log_dir, resume=self._resume)
        return self._experiment


def wandb_run_id(output_dir: Path, resume: bool) -> str:
    """The W&B run id of this run folder: the saved one when resuming, else a new one (saved).

    ``WandbLogger`` passes ``resume="allow"`` to ``wandb.init``, so the same id continues the
    same W&B run online; offline (wandb 0.31), each attempt writes another
    ``wandb/offline-run-*-<id>`` folder under the same id, and ``wandb sync`` of all of them
    uploads them into that one run.
    """
    path = output_dir / WANDB_ID_FILE
    if resume and path.is_file():
        saved = path.read_text().strip()
        if saved:
            return saved
    alphabet = string.ascii_lowercase + string.digits  # W&B's own id alphabet
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    path.write_text(run_id + "\n")
    return run_id


# ---------------------------------------------------------------------------------------------
# Preemption


class Preempted(Exception):
    """The run was stopped by a signal after saving a resumable ``last.ckpt``."""

    def __init__(self, signum: int, step: int, checkpoint_step: int | None, run_dir: Path) -> None:
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention for a process ended by a signal
        name = signal.Signals(signum).name
        if checkpoint_step is None:
            message = f"interrupted by {name} at step {step}, before any checkpoint; run it again"
        else:
            message = (
                f"interrupted by {name} at step {step}; {run_dir / LAST_CKPT} holds step "
                f"{checkpoint_step}; resume with python -m mnv3.train resume={run_dir}"
            )
        super().__init__(message)


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM (or SIGUSR1), save ``last.ckpt`` at once; the fit then stops (Lightning).

    Lightning 2.6 turns SIGTERM into ``SIGTERMException`` at the next batch end but saves
    nothing. This saves ``last.ckpt`` at the first training-batch end after the signal: the point
    where the periodic last-every-N-steps checkpoint is taken, so it resumes mid-epoch. A signal
    during validation is not saved there: Lightning 2.6 resumes a checkpoint taken inside the
    epoch-end validation as if that validation had run (it is skipped, its metrics never logged),
    so the newest checkpoint before it stands (``checkpoint_step``: the epoch-end one, or the
    periodic one, up to ``last_every_n_steps`` back) and the resumed run replays from there.
    SIGUSR1 (SLURM's ``--signal``) is treated as SIGTERM, except under SLURM where Lightning's own
    auto-requeue handler owns it.
    """

    def __init__(self, last_path: Path) -> None:
        self.last_path = Path(last_path)
        self.signum: int | None = None
        self.saved_at_step: int | None = None
        self.checkpoint_step: int | None = None
        self._previous_usr1: Any = None
        self._installed = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Listen for SIGUSR1 during the fit, outside SLURM (where Lightning requeues with it)."""
        if stage == "fit" and not SLURMEnvironment.detect() and _in_main_thread():
            self._previous_usr1 = signal.signal(signal.SIGUSR1, self._on_sigusr1)
            self._installed = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give SIGUSR1 back to whoever had it."""
        if self._installed and _in_main_thread():
            signal.signal(signal.SIGUSR1, self._previous_usr1 or signal.SIG_DFL)
            self._installed = False

    def _on_sigusr1(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        lightning_sigterm = signal.getsignal(signal.SIGTERM)
        if callable(lightning_sigterm):  # Lightning's handler: sets trainer.received_sigterm
            lightning_sigterm(signum, frame)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Save as soon as a batch ends after the signal."""
        if trainer.received_sigterm and self.saved_at_step is None:
            self._save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep ``last.ckpt`` current at each epoch end of a fit.

        Lightning 2.6's ``ModelCheckpoint`` refreshes ``last.ckpt`` after validation only when it
        also saved a best checkpoint there; otherwise the newest ``last.ckpt`` is the periodic one,
        up to ``last_every_n_steps`` behind, even at the end of the run.
        """
        if (
            trainer.state.fn == "fit"
            and not trainer.sanity_checking
            and not trainer.received_sigterm
            and self.checkpoint_step != trainer.global_step
        ):
            trainer.save_checkpoint(self.last_path, weights_only=False)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Remember the step of the newest checkpoint (``last.ckpt`` is saved with every one)."""
        self.checkpoint_step = int(checkpoint["global_step"])

    def _save(self, trainer: pl.Trainer) -> None:
        if self.signum is None:
            self.signum = int(signal.SIGTERM)
        trainer.save_checkpoint(self.last_path, weights_only=False)  # full state, resumable
        self.saved_at_step = trainer.global_step


class PeriodicLastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every N training steps, except at an epoch's last batch.

    Lightning 2.6 resumes a checkpoint taken at the last batch of an epoch as if that epoch's
    validation had run: it is skipped, its metrics never logged, its best checkpoint never
    chosen. The epoch-end checkpoint taken after validation (:class:`PreemptionCheckpoint`)
    covers that step instead.
    """

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Save every N steps, unless this batch ends the epoch."""
        if not trainer.is_last_batch:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------
# Atomic checkpoints


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to ``.<name>.tmp-<pid>`` in the target's folder, then renamed over it.

    Lightning's default goes through an fsspec transaction whose temporary file sits in the
    system temp folder; on another filesystem (NFS, Lustre, a tmpfs /tmp) the final move is a
    copy, and a kill during it leaves a torn file. A rename within one folder is atomic (POSIX
    ``rename``), so ``last.ckpt`` is always either the previous checkpoint or the new one.
    Remote URLs (``s3://`` ...) keep Lightning's path.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` through a temporary file in the same folder."""
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        import torch

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX: the directory entry lives in the folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Output folder


def check_output_dir(path: Path, key: str = "hydra.run.dir") -> None:
    """Refuse a run folder that cannot be created or written, before any work is done.

    Checks that no existing part of the path is a file, that the nearest existing folder is
    writable, and, when ``path`` exists, that a file can really be created in it and in
    ``checkpoints/`` (a write probe catches read-only mounts, which ``os.access`` may miss).

    Raises:
        ConfigError: one sentence naming ``key``, the path and what is wrong.
    """
    path = Path(path).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.is_symlink() or probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(
            f"{key}={path} cannot be created: {probe} is a file, not a folder; "
            "choose a run folder on a writable path"
        )
    if probe != path and probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key}={path} cannot be created: {probe} is not writable; "
            "choose a run folder on a writable path"
        )
    if not path.is_dir():
        return
    ckpt_dir = path / "checkpoints"
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise ConfigError(
            f"{ckpt_dir} is a file, but the run needs a checkpoints folder there; "
            "move the file away or choose another run folder"
        )
    for folder in (path, ckpt_dir):
        try:
            folder.mkdir(exist_ok=True)
            fd, name = _probe_file(folder)
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            raise ConfigError(
                f"the run folder {folder} is not writable ({exc.strerror or exc}); "
                f"choose a writable {key}"
            ) from None


def _probe_file(folder: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix=".write-probe-", dir=folder)


class OutputDirCheck:
    """Hydra callback: check the run (or sweep) folder before Hydra creates it.

    Hydra makes its output folder before the task runs, and a folder it cannot make ends in a
    traceback; this runs first (``hydra.callbacks``) and exits 1 with one sentence instead.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Single run: ``hydra.run.dir``."""
        _exit_if_unwritable(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Sweep: ``hydra.sweep.dir`` (each job's subfolder is checked again by the job)."""
        _exit_if_unwritable(str(config.hydra.sweep.dir), "hydra.sweep.dir")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Nothing to do."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Nothing to do."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Nothing to do."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Nothing to do."""


def _exit_if_unwritable(path: str, key: str) -> None:
    try:
        check_output_dir(Path(path), key)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
