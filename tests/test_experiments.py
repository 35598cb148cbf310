"""Every ``conf/experiment/`` file composes and trains one step under ``debug=fast_dev_run``.

A recipe nobody runs rots: a renamed key, a head that no longer fits its data, an optimizer option
its builder stopped taking. Each file is run here as a user would start it, shrunk only where it
must be: tiny datasets in the real on-disk layouts (``tests/data_writers.py``) under small images
and batches of 2, no pretrained weights (nothing can be downloaded here), and the GPU recipes on
the CPU after checking that they refuse a GPU-less machine in one sentence. Everything else the
file sets (backbone, head, optimizer, schedule, EMA, freezing, its own values) is checked to have
survived the shrinking, so the step that ran is the recipe's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from data_writers import (
    write_kaggle_pneumonia,
    write_nih_chestxray14,
    write_tiny_cityscapes,
    write_tiny_coco,
    write_tiny_imagenet,
)
from helpers import (
    QUIET,
    TINY_SHAPES_CITYSCAPES,
    compose_config,
    compose_train,
    entry_point_of,
)
from mnv3.cli import CONFIG_DIR
from mnv3.errors import ConfigError
from mnv3.validate import check_train_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))

# Each data option's tiny stand-in: the writer of its on-disk layout (None: the data module
# generates it) and the overrides that shrink it to a batch of 2 small images.
TINY: dict[str, tuple[Callable[[Path], Path] | None, tuple[str, ...]]] = {
    "textures": (None, ("data.generate.image_size=32", "data.image_size=32")),
    "shapes": (None, ("data.generate.image_size=32", "data.image_size=32")),
    "imagenet": (write_tiny_imagenet, ("data.image_size=32",)),
    "chest_xray_pneumonia": (write_kaggle_pneumonia, ("data.image_size=32",)),
    "chestxray14": (write_nih_chestxray14, ("data.image_size=32",)),
    "xray_generated": (
        None,
        (
            "data.generate.image_size=32",
            "data.image_size=32",
            "data.generate.train_patients=10",
            "data.generate.val_patients=2",
            "data.generate.test_patients=4",
        ),
    ),
    "coco": (write_tiny_coco, ("data.image_size=64",)),
    "shapes_coco": (
        None,
        (
            "data.generate.train_images=2",
            "data.generate.val_images=1",
            "data.generate.empty_val_images=0",
            "data.generate.image_size=64",
            "data.image_size=64",
        ),
    ),
    "cityscapes": (write_tiny_cityscapes, ("data.crop_size=[32,64]", "data.frame_size=[32,64]")),
    "shapes_cityscapes": (None, TINY_SHAPES_CITYSCAPES),
}
# The generated classification sets: 6 classes, 2 train / 1 val / 1 test image each.
GENERATED_COUNTS = (
    "data.generate.train_per_class=2",
    "data.generate.val_per_class=1",
    "data.generate.test_per_class=1",
)

# Which optimizer class each optim option builds (mnv3.tasks.optim.build_optimizer).
OPTIMIZERS = {"adamw": "AdamW", "sgd": "SGD", "rmsprop_tf": "RMSpropTF"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder holding every tiny dataset, each written once for all the experiments."""
    root = tmp_path_factory.mktemp("data")
    for name, (write, _) in TINY.items():
        if write is not None:
            write(root / name)
    return root


def data_overrides(cfg: DictConfig, data_dir: Path) -> list[str]:
    """The overrides that point ``cfg``'s data at its tiny stand-in and shrink it."""
    name = str(cfg.data.name)
    write, overrides = TINY[name]
    out = [*overrides, "data.batch_size=2", "data.num_workers=0"]
    if write is not None:
        out.append(f"data.root={data_dir / name}")
    if "train_per_class" in cfg.data.get("generate", {}):
        out += GENERATED_COUNTS
    if "resize_size" in cfg.data:
        out.append("data.resize_size=null")  # image_size / 0.875
    return out


def cpu_and_offline_overrides(cfg: DictConfig) -> list[str]:
    """A GPU recipe on one CPU process (``trainer=cpu``; its ``devices``, ``strategy`` and
    ``sync_batchnorm`` undone), and no pretrained weights (they would be downloaded)."""
    out: list[str] = []
    if str(cfg.trainer.accelerator) in ("gpu", "cuda"):
        out.append("trainer=cpu")
    if cfg.trainer.get("devices", 1) != 1:
        out.append("trainer.devices=1")
    out += [f"~trainer.{key}" for key in ("strategy", "sync_batchnorm") if key in cfg.trainer]
    out += [f"{group}.weights=null" for group in ("backbone", "head") if cfg[group].get("weights")]
    return out


def experiment_file_settings(name: str) -> tuple[dict[str, str], dict[str, Any]]:
    """What ``conf/experiment/<name>.yaml`` itself sets, its parent experiments' included:
    the group option it picks (``{"optim": "sgd"}``) and its values by dotted key."""
    node = OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml")
    picks: dict[str, str] = {}
    values: dict[str, Any] = {}
    for entry in node.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":  # another experiment file
            parent_picks, parent_values = experiment_file_settings(entry)
            picks |= parent_picks
            values |= parent_values
        elif isinstance(entry, DictConfig):
            for key, option in entry.items():
                picks[str(key).removeprefix("override ").strip("/")] = str(option)
    own = OmegaConf.to_container(node, resolve=False)
    assert isinstance(own, dict)
    own.pop("defaults", None)
    values |= dict(_leaves(own))
    return picks, values


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of a nested dict (lists are leaves)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


def overridden(key: str, overrides: list[str]) -> bool:
    """Whether a key override (``a.b=v``, ``~a.b``) sets ``key`` or a parent of it. A group
    choice (``trainer=cpu``) does not: an experiment's own values are merged over its group."""
    for override in overrides:
        target = override.lstrip("~+").split("=", 1)[0]
        if "." in target and (key == target or key.startswith(f"{target}.")):
            return True
    return False


class StepProbe(pl.Callback):
    """Records what the fit did: its steps, its last training loss, the optimizer it built."""

    def __init__(self) -> None:
        self.global_step = -1
        self.loss = float("nan")
        self.optimizer = ""
        self.task = ""
        self.ema = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the trainer after the fit (``mnv3.train`` only returns the monitored metric)."""
        self.global_step = trainer.global_step
        self.loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
        self.optimizer = type(trainer.optimizers[0]).__name__
        self.task = type(pl_module).__name__
        self.ema = getattr(pl_module, "ema", None) is not None


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_one_step(
    name: str, tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The experiment as shipped composes (a GPU recipe on a GPU-less machine is refused in one
    sentence), and shrunk to tiny data on the CPU it trains exactly one finite step with its own
    backbone, head, data, optimizer, schedule and values."""
    if entry_point_of(name) == "search":
        cfg = compose_config("search", tmp_path, [f"experiment={name}"], data_dir)
        assert cfg.search.algorithm in ("nas", "netadapt")
        pytest.skip(
            f"{name} is a python -m mnv3.search experiment: tests/search runs its tiny search "
            "(test_space.py, test_netadapt.py) and checks these files compose"
        )
    import mnv3.train
    from mnv3.tasks import TASKS

    as_shipped = compose_train(tmp_path, [f"experiment={name}"], data_dir)
    if str(as_shipped.trainer.accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^trainer\.accelerator=gpu needs a GPU") as info:
            check_train_config(as_shipped)
        message = str(info.value)
        assert "\n" not in message and ". " not in message, f"not one sentence: {message}"

    tiny = [*cpu_and_offline_overrides(as_shipped), *data_overrides(as_shipped, data_dir)]
    cfg = compose_train(
        tmp_path, [f"experiment={name}", "debug=fast_dev_run", *QUIET, *tiny], data_dir
    )

    # The recipe survived the shrinking: the group options it picks and the values it sets.
    picks, values = experiment_file_settings(name)
    choices = HydraConfig.get().runtime.choices  # what Hydra composed, group by group
    for group, option in picks.items():
        expected = "cpu" if group == "trainer" and "trainer=cpu" in tiny else option
        assert choices[group] == expected, group
    composed = dict(_leaves(OmegaConf.to_container(cfg, resolve=False)))
    for key, value in values.items():
        if not overridden(key, tiny):
            assert composed[key] == value, key

    probe = StepProbe()
    build_callbacks = mnv3.train.build_callbacks
    monkeypatch.setattr(mnv3.train, "build_callbacks", lambda *a: [*build_callbacks(*a), probe])
    mnv3.train.train(cfg)

    assert probe.global_step == 1 and math.isfinite(probe.loss), (probe.global_step, probe.loss)
    assert probe.optimizer == OPTIMIZERS[str(cfg.optim.name)]
    assert probe.task == TASKS[str(cfg.head.task)].__name__
    assert probe.ema == bool(cfg.ema_decay)
