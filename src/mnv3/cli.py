"""The Hydra plumbing the entry points share: command lines, error exits, printing, building.

Only the entry points (``mnv3.train``, ``mnv3.eval``, ...) and this module know Hydra/OmegaConf;
everything they hand to tasks and data modules is converted to plain Python types first. The
config checks are :mod:`mnv3.validate`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf, open_dict

import mnv3.conf
from mnv3.errors import ConfigError

log = logging.getLogger("mnv3")

# The Hydra configs: the top-level conf/ folder, installed as the package mnv3.conf (pyproject.toml
# package-dir), so an editable install and a wheel both find them from any working folder.
CONFIG_DIR = Path(mnv3.conf.__file__).resolve().parent
# Keys of a data config that describe it rather than configure the data module.
DATA_META_KEYS = ("_target_", "name", "provides")

F = TypeVar("F", bound=Callable[..., Any])


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's input, reported as one sentence and a non-zero exit."""
    from mnv3.data.errors import DatasetError, UnreadableImageError
    from mnv3.errors import StorageError
    from mnv3.models.checkpoints import CheckpointError
    from mnv3.tasks.common import NonFiniteLossError

    return (
        ConfigError,
        DatasetError,
        CheckpointError,
        NonFiniteLossError,
        FileNotFoundError,
        UnreadableImageError,
        StorageError,
    )


def user_message(exc: BaseException) -> str:
    """The one sentence of a user error, also when a DataLoader worker raised it.

    torch re-raises a worker's exception in the main process as "Caught DatasetError in
    DataLoader worker process 0." followed by the worker's traceback, whose last line is
    ``module.Class: <the sentence>``.
    """
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and "worker" in lines[0]:
        last = lines[-1]
        name = type(exc).__name__
        return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return lines[0] if lines else type(exc).__name__


# Optional packages and the pyproject.toml extra that installs each (make install has them all).
EXTRA_OF_MODULE = {
    "onnx": "deploy",
    "onnxscript": "deploy",
    "onnxruntime": "deploy",
    "torchao": "deploy",
    "executorch": "deploy",
    "pydicom": "medical",
    "submitit": "slurm",
    "hydra_plugins.hydra_submitit_launcher": "slurm",
    "optuna": "sweep",
    "hydra_plugins.hydra_optuna_sweeper": "sweep",
}


def missing_extra(exc: BaseException) -> str | None:
    """The one sentence for an optional package that is not installed, or None for any other
    error: which package, what installs it (``pip install 'mnv3[deploy]'``)."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    for module, extra in EXTRA_OF_MODULE.items():
        if exc.name == module or exc.name.startswith(f"{module}."):
            return (
                f"this needs the optional package {module.split('.')[-1]!r}, which is not "
                f"installed: pip install 'mnv3[{extra}]' (make install includes every extra)"
            )
    return None


def exit_on_user_error(fn: F) -> F:
    """Turn user errors (and a missing optional extra, :func:`missing_extra`) into one logged
    sentence and exit status 1 instead of a traceback.

    With ``HYDRA_FULL_ERROR=1`` (Hydra's own switch for full tracebacks) the traceback is
    printed above the sentence; the exit status stays 1 either way.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except user_errors() as exc:
            error, message = exc, user_message(exc)
        except ModuleNotFoundError as exc:
            found = missing_extra(exc)
            if found is None:
                raise
            error, message = exc, found
        log.error("%s", message)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exception(error, file=sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)

    return wrapper  # type: ignore[return-value]


def open_data_overrides(argv: list[str]) -> list[str]:
    """Let ``data.<key>=value`` override a checkpoint run's data config without Hydra's ``+``.

    ``mnv3.eval`` / ``mnv3.export`` with ``ckpt_path`` start from an empty ``data: {}`` (the
    run's own data config is merged in later), so Hydra would refuse every ``data.root=...`` as
    a key "not in struct". Without a ``data=<group>`` choice on the command line, such
    overrides become ``++data.<key>=value`` (add or override); with one, they are left as they
    are and Hydra still names a mistyped key.
    """
    if any(a.startswith(("data=", "+data=", "++data=")) for a in argv[1:]):
        return list(argv)
    return [argv[0], *(f"++{a}" if a.startswith("data.") else a for a in argv[1:])]


def command_line_overrides() -> list[str]:
    """The overrides given on the command line (Hydra's record of them; none outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def run_tool_main(tool: Callable[[DictConfig], Any], config_name: str) -> Callable[[], None]:
    """The ``main()`` of a tool that opens a finished run (``mnv3.eval``, ``mnv3.export``):
    ``tool`` under Hydra with ``conf/<config_name>.yaml``, plain ``data.<key>=`` overrides
    applying to the run's data (:func:`open_data_overrides`)."""
    import hydra

    hydra_main = hydra.main(
        version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name
    )

    @functools.wraps(tool)
    @exit_on_user_error
    def sized_tool(cfg: DictConfig) -> Any:
        size_cpus(cfg)
        return tool(cfg)

    entry = hydra_main(sized_tool)

    def main() -> None:
        """The command line: plain ``data.<key>=`` overrides apply to the checkpoint run's data."""
        sys.argv = open_data_overrides(sys.argv)
        entry()

    return main


def to_plain(cfg: Any) -> Any:
    """A resolved, plain-Python copy of a config node (dicts, lists, scalars)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


# The key size_cpus adds to the cpu group: a resumed run's saved config carries it.
CPU_PLAN_KEY = "resolved"


def size_cpus(cfg: DictConfig) -> Any:
    """Size torch's threads and the DataLoader workers to the usable CPUs (``cfg.cpu``,
    ``data.num_workers``); the numbers go into ``cfg.cpu.resolved`` and the log.

    Returns the :class:`mnv3.cpus.CpuPlan`.
    """
    from mnv3.cpus import AUTO, apply_cpu_plan, cpu_plan, processes_per_node

    requests = to_plain(cfg.get("cpu")) or {}
    data = cfg.get("data") or {}
    try:
        plan = cpu_plan(
            threads=requests.get("threads", AUTO),
            interop_threads=requests.get("interop_threads", AUTO),
            num_workers=data.get("num_workers", AUTO),
            processes=processes_per_node(to_plain(cfg.get("trainer")) or {}),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    apply_cpu_plan(plan)
    with open_dict(cfg):
        cfg.cpu = {**requests, CPU_PLAN_KEY: plan.as_config()}
    logging.getLogger("mnv3").info("%s", plan.describe())
    return plan


def build_datamodule(data_cfg: Mapping[str, Any], **overrides: Any) -> Any:
    """Instantiate the data config's ``_target_`` with its plain arguments (and ``overrides``)."""
    import importlib

    plain = {**to_plain(data_cfg), **overrides}
    module_name, _, cls_name = plain["_target_"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    kwargs = {k: v for k, v in plain.items() if k not in DATA_META_KEYS}
    return cls(**kwargs)


def model_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Builder arguments of the configured task's network: the task's own translation of the
    backbone and head groups (:meth:`mnv3.tasks.base.BaseTask.network_kwargs`)."""
    from mnv3.tasks import TASKS

    return TASKS[str(cfg.head.task)].network_kwargs(to_plain(cfg))


def print_config_tree(cfg: DictConfig, save_to: Path | None = None) -> None:
    """Print the resolved config as a rich tree (groups first) and save it as YAML."""
    from rich import print as rprint
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    order = [
        k
        for k in (
            "data",
            "backbone",
            "head",
            "optim",
            "scheduler",
            "trainer",
            "callbacks",
            "logger",
        )
        if k in cfg
    ]
    order += [k for k in cfg if k not in order and k != "hydra"]
    for key in order:
        branch = tree.add(f"[bold]{key}")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if OmegaConf.is_config(node) else str(node)
        branch.add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    rprint(tree)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        save_to.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def print_metrics_table(title: str, metrics: Mapping[str, Any]) -> None:
    """The final metrics of a run as one table (scalars only, per-class entries left out)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, min_width=max(40, len(title) + 4))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        if "_class/" in key:
            continue
        value = metrics[key]
        value = float(value.item()) if hasattr(value, "item") else value
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def default_wandb_offline() -> None:
    """W&B stays offline unless the user set WANDB_MODE (runs are synced later with `wandb sync`)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
