"""``python -m mnv3.train resume=<run>``: continue a run in its own folder with its own config.

- :func:`resume_argv`: rewrites the command line before Hydra picks an output folder, so the run
  continues where it was (``hydra.run.dir=<run>``).
- :func:`restore_run_config`: the run's saved ``config_resolved.yaml`` plus plain key overrides.
- :func:`requeued_checkpoint`: a job SLURM requeued continues from ``last.ckpt`` instead of
  starting again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mnv3.errors import ConfigError
from mnv3.run_folder import LAST_CKPT, RUN_CONFIG, RunFolder

# Characters Hydra's override grammar takes unquoted in a value (paths included).
_PLAIN_OVERRIDE_VALUE = re.compile(r"^[\w./:~@+-]+$")


def resume_argv(
    argv: Sequence[str],
    needed: Sequence[str | Path] = (RUN_CONFIG, LAST_CKPT),
    writer: str = "mnv3.train",
) -> list[str]:
    """Command-line arguments with ``resume=<run>`` pointing Hydra's output folder at that run.

    Hydra fixes the output folder before the task runs, so this rewrites ``sys.argv`` first:
    ``hydra.run.dir=<run>`` (unless given) and ``hydra.output_subdir=null`` (so the run's own
    ``.hydra/`` record of how it was started is kept, not replaced by the resume command).

    ``needed``: the files a resumable run folder of ``writer`` holds (a search: its state).

    Raises:
        ConfigError: the folder lacks one of ``needed`` (``config_resolved.yaml``,
            ``checkpoints/last.ckpt``).
    """
    args = list(argv)
    values = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    if not values or values[-1] in ("", "null", "None"):
        return args
    run = Path(values[-1]).expanduser().resolve()
    for name in needed:
        if not (run / name).is_file():
            raise ConfigError(
                f"resume={values[-1]}: {run / name} does not exist; expected a run folder "
                f"written by {writer} (with {' and '.join(map(str, needed))})"
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
    last = RunFolder(output_dir).last_checkpoint
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
    saved = OmegaConf.load(RunFolder(run).config_file)
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
        restored.ckpt_path = str(RunFolder(run).last_checkpoint)
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
