"""A run that survives kills and preemption: ``last.ckpt`` is always whole and recent.

- :class:`PreemptionCheckpoint`: on SIGTERM / SIGUSR1, saves ``last.ckpt`` at once and lets the
  entry point exit non-zero (:class:`Preempted`).
- :class:`PeriodicLastCheckpoint`: ``last.ckpt`` every N steps, so a SIGKILL loses at most N.
- :class:`AtomicCheckpointIO`: checkpoints written to a temporary file next to the target and
  renamed over it, so a kill mid-write never leaves a torn ``last.ckpt``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins import TorchCheckpointIO
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import ModelCheckpoint

from mnv3.errors import StorageError
from mnv3.run_folder import LAST_CKPT


class Preempted(Exception):
    """The run was stopped by a signal after saving a resumable ``last.ckpt``."""

    def __init__(
        self,
        signum: int,
        step: int,
        checkpoint_step: int | None,
        run_dir: Path,
        command: str = "mnv3.train",
        checkpoint: Path | None = None,
    ) -> None:
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention for a process ended by a signal
        name = signal.Signals(signum).name
        if checkpoint_step is None:
            message = f"interrupted by {name} at step {step}, before any checkpoint; run it again"
        else:
            message = (
                f"interrupted by {name} at step {step}; {checkpoint or run_dir / LAST_CKPT} "
                f"holds step {checkpoint_step}; resume with python -m {command} "
                f"resume={run_dir}"
            )
        super().__init__(message)


def exit_preempted(preempted: Preempted, loggers: list[Any]) -> None:
    """One sentence and exit 128 + signal (143 for SIGTERM): a preempted job is not a success."""
    import logging
    import sys

    logging.getLogger("mnv3").error("%s", preempted)
    print(f"error: {preempted}", file=sys.stderr)
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish(exit_code=preempted.exit_code)
    sys.exit(preempted.exit_code)


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

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
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

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        """Save every N steps, unless this batch ends the epoch."""
        if not trainer.is_last_batch:
            super().on_train_batch_end(trainer, *args)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


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
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            cause = _os_error(exc)
            if cause is None:
                raise
            raise StorageError(_write_failed(target, cause)) from exc
        _fsync_dir(target.parent)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: torch's zip writer reports a failed write as a RuntimeError
    (``unexpected pos ...``) whose context is the file's OSError (ENOSPC, EFBIG, EDQUOT...)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _write_failed(target: Path, cause: OSError) -> str:
    """One sentence: which checkpoint, why, the space left, what was kept, how to go on."""
    import shutil

    try:
        free = f"{shutil.disk_usage(target.parent).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    kept = (
        f"the previous {target.name} is kept unchanged"
        if target.exists()
        else f"no {target.name} was written"
    )
    return (
        f"could not write checkpoint {target} ({cause.strerror or cause}; {free}): {kept}; "
        f"free space, or move the run folder to a larger disk, then resume with "
        f"resume={target.parent.parent}"
    )


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
