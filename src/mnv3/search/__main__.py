"""Search: ``python -m mnv3.search experiment=netadapt_small_quick [platform=...] [key=value]``.

Kept short like ``mnv3.train``: the config (conf/search.yaml) says which search
(``search.algorithm``, a :data:`SEARCHES` entry), from which network (``backbone``), on which data
and for which platform; this file checks it, runs the search in its run folder and prints the
result and the one ``python -m mnv3.train`` command that trains it. ``resume=<run>`` continues a
search that was stopped; ``debug=fast_dev_run`` makes any search a tiny one.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from mnv3.cli import (
    CONFIG_DIR,
    command_line_overrides,
    exit_on_user_error,
    print_config_tree,
    print_metrics_table,
    size_cpus,
    to_plain,
)
from mnv3.errors import ConfigError
from mnv3.output_dir_check import check_output_dir
from mnv3.preemption import Preempted, exit_preempted
from mnv3.resume import restore_run_config, resume_argv
from mnv3.run_folder import RUN_CONFIG, RunFolder
from mnv3.search.nas import run_nas
from mnv3.search.netadapt import SEARCH_DIR, STATE_FILE, TABLE_FILE, run_netadapt
from mnv3.search.platform import Platform
from mnv3.validate import check_accelerator

log = logging.getLogger("mnv3.search")

# search.algorithm -> (plain config, run folder, loggers) -> summary
SEARCHES: dict[str, Callable[[dict[str, Any], Path, list[Any]], dict[str, Any]]] = {
    "netadapt": run_netadapt,
    "nas": run_nas,
}


def _checked_config(cfg: DictConfig) -> DictConfig:
    """The config to run: a resumed search's own, the tiny one under ``debug=fast_dev_run``."""
    if cfg.get("resume"):
        cfg = restore_run_config(cfg, command_line_overrides())
    algorithm = cfg.search.get("algorithm")
    if algorithm not in SEARCHES:
        raise ConfigError(
            f"search.algorithm={algorithm!r} is unknown; expected one of {', '.join(SEARCHES)}"
        )
    check_accelerator(cfg)  # a GPU recipe on a CPU machine: one sentence, before any data
    if cfg.get("trainer", {}).get("fast_dev_run") and cfg.search.get("fast_dev_run"):
        tiny = cfg.search.fast_dev_run
        with open_dict(cfg):
            cfg.platform = OmegaConf.merge(cfg.platform, tiny.get("platform") or {})
            cfg.search = OmegaConf.merge(
                cfg.search, {k: v for k, v in tiny.items() if k != "platform"}
            )
            for key, part in cfg.search.items():  # a nested search's own (NAS's refine)
                if isinstance(part, DictConfig) and part.get("fast_dev_run"):
                    own = {k: v for k, v in part.fast_dev_run.items() if k != "platform"}
                    cfg.search[key] = OmegaConf.merge(part, own)
    size_cpus(cfg)
    output_dir = Path(cfg.paths.output_dir)
    check_output_dir(output_dir, "paths.output_dir")
    _check_resumed_platform(cfg, output_dir / SEARCH_DIR / STATE_FILE)
    print_config_tree(cfg, save_to=RunFolder(output_dir).config_file)
    return cfg


def _check_resumed_platform(cfg: DictConfig, state_file: Path) -> None:
    """A resumed search whose platform settings changed is refused before its saved config is
    replaced by this run's (a later ``resume=<run>`` would restore the refused settings); the
    search checks the calibrated unit itself when it starts."""
    try:
        saved = json.loads(state_file.read_text()).get("platform")
    except (OSError, ValueError, AttributeError):
        return  # no search here yet, or a state the search itself will refuse
    platform = Platform.from_config(to_plain(cfg.platform))
    platform.check_resumed(saved, state_file, calibrated=False)


@exit_on_user_error
def search(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) the configured search; returns its summary."""
    from mnv3.train import build_loggers

    cfg = _checked_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    resuming = (output_dir / SEARCH_DIR / STATE_FILE).is_file()
    loggers = build_loggers(cfg, output_dir, resuming=resuming)
    for logger in loggers:
        logger.log_hyperparams(to_plain(cfg))
    try:
        summary = SEARCHES[cfg.search.algorithm](to_plain(cfg), output_dir, loggers)
    except Preempted as stopped:  # SIGTERM during the supernet's training: saved, exit 143
        exit_preempted(stopped, loggers)
    commands = summary.pop("commands", [])  # (what, command line): printed after the table
    for logger in loggers:
        logger.finalize("success")
    print_metrics_table(f"{cfg.run_name}: search result", summary)
    table = output_dir / TABLE_FILE
    command = ["python", "-m", "mnv3.train", f"backbone={table}", *cfg.search.train_overrides]
    log.info("table: %s", table)
    print(f"train it:\n  {shlex.join(command)}")
    for what, line in commands:
        print(f"{what}:\n  {line}")
    return summary


def _resume_argv() -> None:
    """``resume=<run>``: continue a search in its own folder (before Hydra picks one)."""
    try:
        needed = (RUN_CONFIG, Path(SEARCH_DIR) / STATE_FILE)
        sys.argv[1:] = resume_argv(sys.argv[1:], needed, writer="mnv3.search")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="search")
def _hydra_main(cfg: DictConfig) -> dict[str, Any]:
    return search(cfg)


def main() -> dict[str, Any]:
    """``python -m mnv3.search [overrides]``; ``resume=<run>`` continues that search."""
    _resume_argv()
    return _hydra_main()


if __name__ == "__main__":
    main()
