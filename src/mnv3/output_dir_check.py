"""An unwritable run folder fails at start with one sentence, not after the first epoch.

:func:`check_output_dir` checks a folder; :class:`OutputDirCheck` is the Hydra callback
(``conf/train.yaml``, ``hydra.callbacks``) that runs it before Hydra creates the folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mnv3.errors import ConfigError
from mnv3.run_folder import RunFolder


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
    ckpt_dir = RunFolder(path).checkpoint_dir
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
        _exit_if_unwritable(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Sweep: ``hydra.sweep.dir`` (each job's subfolder is checked again by the job)."""
        _exit_if_unwritable(config, "hydra.sweep.dir")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Nothing to do."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Nothing to do."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Nothing to do."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Nothing to do."""


def _exit_if_unwritable(config: DictConfig, key: str) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    # The default folder interpolates ${hydra:runtime.cwd}, which resolves only once Hydra's
    # config is registered; Hydra registers it after the run-start callbacks, so do it here
    # as Hydra's run_job does (without it every default run printed a 5-line UserWarning and
    # the folder went unchecked).
    HydraConfig.instance().set_config(config)
    path = str(OmegaConf.select(config, key))
    try:
        check_output_dir(Path(path), key)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
