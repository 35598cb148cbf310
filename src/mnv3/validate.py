"""Checks of a composed config and of the checkpoints it names, run before any data is read.

A bad value (``data.batch_size=0``, ``optim.lr=abc``, ``backbone.name=mobilenet_v4``) would
otherwise surface minutes later as a traceback from deep inside torch or Lightning, after the
data was built. :data:`RULES` states what every value must be, as a table a reader checks in one
glance; :func:`check_values` applies it to whichever sections a config has, and each failure is
one :class:`~mnv3.cli.ConfigError` sentence naming the key, the value and what was expected.

Checkpoints named by the config (``backbone.weights``, ``ckpt_path`` to resume, evaluate or
explain) are read here once with ``weights_only=True``, so an empty, truncated, unsafe or
foreign file, and a checkpoint of another architecture, fail at start with one sentence.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mnv3.cli import ConfigError, model_kwargs

# Lightning's own names for a checkpoint (trainer.fit(ckpt_path="last")), not files.
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
# Builder arguments that describe the architecture (what decides the tensors' shapes).
ARCH_KEYS = (
    "name",
    "width_mult",
    "minimal",
    "reduced_tail",
    "output_stride",
    "width_rounding",
    "in_channels",
)


@dataclass(frozen=True)
class Rule:
    """What a config value must be: a test, and the words for it in the error sentence."""

    expected: str
    test: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def integer(minimum: int) -> Rule:
    """An integer >= ``minimum`` (YAML booleans are not integers here)."""
    words = {1: "a positive integer", 0: "an integer >= 0"}.get(minimum, f"an integer >= {minimum}")
    return Rule(words, lambda v: _is_int(v) and v >= minimum)


def number(
    low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
) -> Rule:
    """A finite number in an interval, e.g. ``number(0, low_open=True)`` for a positive one."""
    if high == math.inf:
        words = "a positive number" if low == 0 and low_open else f"a number >= {low:g}"
    else:
        words = (
            f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        )

    def test(v: Any) -> bool:
        if not _is_number(v):
            return False
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    return Rule(words, test)


def one_of(*choices: Any) -> Rule:
    """One of a fixed set (compared exactly: ``1`` and ``True`` are different answers)."""
    words = "one of " + ", ".join(str(c) for c in choices)
    return Rule(words, lambda v: any(type(v) is type(c) and v == c for c in choices))


def optional(rule: Rule) -> Rule:
    """``null`` or what ``rule`` accepts."""
    return Rule(f"null or {rule.expected}", lambda v: v is None or rule.test(v))


def list_of(rule: Rule, length: int | None = None) -> Rule:
    """A list whose items all pass ``rule`` (of ``length`` items when given)."""
    count = f"{length} " if length else ""
    return Rule(
        f"a list of {count}values, each {rule.expected}",
        lambda v: (
            isinstance(v, list)
            and (length is None or len(v) == length)
            and all(rule.test(x) for x in v)
        ),
    )


def either(*rules: Rule) -> Rule:
    """What any of ``rules`` accepts."""
    return Rule(" or ".join(r.expected for r in rules), lambda v: any(r.test(v) for r in rules))


POSITIVE_INT = integer(1)
NON_NEGATIVE_INT = integer(0)
POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
PROBABILITY = number(0, 1)
FRACTION = number(0, 1, high_open=True)  # momentum, dropout, smoothing: 1 would stop learning
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
TEXT = Rule("a string", lambda v: isinstance(v, str) and v != "")


def _models() -> Rule:
    from mnv3.models import BACKBONES as MODELS

    return one_of(*MODELS)


def _datasets() -> Rule:
    from mnv3.data import DATASETS

    return one_of(*sorted(DATASETS))


def _interpolation() -> Rule:
    names = ("nearest", "bilinear", "bicubic")  # mnv3.data.transforms.interpolation_mode
    return Rule("one of " + ", ".join(names), lambda v: isinstance(v, str) and v.lower() in names)


# key (fnmatch pattern) -> rule, or a function giving the rule when it needs an import. The first
# matching pattern decides; keys a config lacks are skipped; keys no pattern matches are free.
RULES: dict[str, Rule | Callable[[], Rule]] = {
    # data: mnv3.data.ClassificationDataModule and the generated datasets
    "data.dataset": _datasets,
    "data.batch_size": POSITIVE_INT,
    "data.image_size": POSITIVE_INT,
    "data.resize_size": optional(POSITIVE_INT),
    "data.num_workers": NON_NEGATIVE_INT,
    "data.channels": one_of(1, 3),
    "data.interpolation": _interpolation,
    "data.auto_augment": optional(one_of("autoaugment", "trivialaugment", "xray")),
    "data.hflip_prob": PROBABILITY,
    "data.random_erase_prob": PROBABILITY,
    "data.min_scale": number(0, 1, low_open=True),
    "data.val_fraction": optional(FRACTION),  # 0 or null: the official val folder
    "data.*seed": NON_NEGATIVE_INT,
    "data.uncertain": one_of("ones", "zeros", "ignore"),
    "data.frontal_only": BOOL,
    "data.drop_last": BOOL,
    "data.persistent_workers": BOOL,
    "data.pin_memory": optional(BOOL),
    "data.mean": list_of(number(0, 1)),
    "data.std": list_of(POSITIVE),
    "data.generate.num_classes": integer(2),
    "data.generate.train_per_class": POSITIVE_INT,
    "data.generate.*_per_class": NON_NEGATIVE_INT,
    "data.generate.image_size": integer(16),
    "data.generate.*_images": NON_NEGATIVE_INT,
    "data.generate.max_objects": POSITIVE_INT,
    "data.generate.height": integer(32),
    "data.generate.width": integer(32),
    # detection data (coco, shapes_coco): SSD augmentation switches
    "data.iou_crop": BOOL,
    "data.zoom_out": BOOL,
    "data.photometric": BOOL,
    "data.keep_empty": BOOL,
    # segmentation data (cityscapes, shapes_cityscapes)
    "data.crop_size": either(POSITIVE_INT, list_of(POSITIVE_INT, length=2)),
    "data.scale_range": list_of(POSITIVE, length=2),
    "data.eval_resize": optional(list_of(POSITIVE_INT, length=2)),
    "data.frame_size": list_of(POSITIVE_INT, length=2),
    "data.train_classes": optional(list_of(TEXT)),
    # backbone: mnv3.models.build_model arguments
    "backbone.name": _models,
    "backbone.width_mult": POSITIVE,
    "backbone.output_stride": one_of(8, 16, 32),
    "backbone.width_rounding": one_of("paper", "torchvision"),
    "backbone.minimal": BOOL,
    "backbone.reduced_tail": BOOL,
    "backbone.bn_momentum": optional(number(0, 1, low_open=True)),
    "backbone.in_channels": optional(one_of(1, 3)),
    "backbone.weights": optional(TEXT),
    # head
    "head.dropout": FRACTION,
    "head.label_smoothing": FRACTION,
    "head.class_weights": either(optional(one_of("balanced")), list_of(NON_NEGATIVE)),
    "head.weights": optional(TEXT),
    # detection head (conf/head/ssdlite.yaml)
    "head.loss": one_of("softmax_hnm", "focal"),
    "head.score_thresh": PROBABILITY,
    "head.nms_thresh": PROBABILITY,
    "head.detections_per_img": POSITIVE_INT,
    "head.map_backend": one_of("pycocotools", "faster_coco_eval"),
    "head.box_images": NON_NEGATIVE_INT,
    # segmentation heads (conf/head/lraspp.yaml, raspp.yaml)
    "head.output_stride": optional(one_of(16, 32)),
    "head.inter_channels": POSITIVE_INT,
    "head.pool": one_of("paper", "global"),
    "head.low_tap": TEXT,
    "head.mask_images": NON_NEGATIVE_INT,
    # optim: mnv3.tasks.optim.build_optimizer
    "optim.name": one_of("rmsprop_tf", "sgd", "adamw"),
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.momentum": FRACTION,
    "optim.decay": FRACTION,
    "optim.eps": POSITIVE,
    "optim.nesterov": BOOL,
    "optim.betas": list_of(FRACTION, length=2),
    "optim.reference_batch_size": optional(POSITIVE_INT),
    # scheduler: mnv3.tasks.optim.WarmupSchedule
    "scheduler.name": one_of("exponential", "cosine", "constant"),
    "scheduler.warmup_epochs": NON_NEGATIVE,
    "scheduler.warmup_start_factor": PROBABILITY,
    "scheduler.min_factor": PROBABILITY,
    "scheduler.decay_rate": number(0, 1, low_open=True),
    "scheduler.decay_epochs": POSITIVE,
    # callbacks (conf/callbacks/default.yaml)
    "callbacks.last_every_n_steps": POSITIVE_INT,
    "callbacks.progress_bar": one_of("rich", "tqdm", "none"),
    "callbacks.model_summary_depth": optional(NON_NEGATIVE_INT),
    "callbacks.lr_monitor": BOOL,
    "*callbacks.ood_quantile": optional(FRACTION),  # 0 or null: off
    "*callbacks.gradcam_images": optional(NON_NEGATIVE_INT),
    "*callbacks.gradcam_every_n_epochs": POSITIVE_INT,
    # trainer: the few keys whose wrong values Lightning reports only as a traceback
    "trainer.max_epochs": optional(integer(-1)),  # -1: no limit (Lightning)
    "trainer.log_every_n_steps": optional(POSITIVE_INT),
    "trainer.accumulate_grad_batches": POSITIVE_INT,
    # top level: train.yaml, eval.yaml, explain.yaml
    "seed": Rule("an integer", _is_int),
    "ema_decay": optional(number(0, 1, low_open=True, high_open=True)),
    "freeze_backbone_epochs": NON_NEGATIVE_INT,
    "backbone_lr_factor": NON_NEGATIVE,
    "channels_last": BOOL,
    "compile": BOOL,
    "test": BOOL,
    "split": one_of("val", "test"),
    "top_k": POSITIVE_INT,
    "alpha": PROBABILITY,
    "ood_threshold": PROBABILITY,
}
# Sections whose keys the table covers; other top-level sections (paths, logger) are left alone.
SECTIONS = ("data", "backbone", "head", "optim", "scheduler", "callbacks", "trainer")


def _rule_for(key: str) -> Rule | None:
    for pattern, rule in RULES.items():
        if fnmatch.fnmatchcase(key, pattern):
            return rule if isinstance(rule, Rule) else rule()
    return None


def _keys(node: Any, prefix: str) -> Iterator[str]:
    """Dotted keys under ``node`` without resolving values (a bad ``paths`` stays unread)."""
    if not isinstance(node, DictConfig):
        return
    for key in node:
        dotted = f"{prefix}{key}"
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            yield from _keys(child, f"{dotted}.")
        else:
            yield dotted


def _shown(value: Any) -> str:
    """A value as the user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def check_values(cfg: DictConfig) -> None:
    """Apply :data:`RULES` to every key ``cfg`` has; the first bad value is a ConfigError."""
    candidates = [k for k in cfg if not isinstance(cfg._get_node(k), DictConfig)]
    for section in SECTIONS:
        if section in cfg:
            candidates += list(_keys(cfg._get_node(section), f"{section}."))
    for key in candidates:
        rule = _rule_for(str(key))
        if rule is None:
            continue
        value = OmegaConf.select(cfg, str(key), throw_on_missing=False)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if not rule.test(value):
            raise ConfigError(f"{key}={_shown(value)} is not valid: expected {rule.expected}")


def check_backbone_keys(cfg: DictConfig) -> None:
    """Every backbone key must be an option of the chosen backbone (e.g. no ``minimal`` on V2)."""
    from mnv3.models.backbone import backbone_options

    accepted = set(backbone_options(cfg.backbone.name)) - {"num_classes"} | {"name"}
    for key in cfg.backbone:
        if key not in accepted:
            raise ConfigError(
                f"backbone.{key} is not an option of backbone.name={cfg.backbone.name}; its "
                f"options: {', '.join(sorted(accepted))}"
            )


def check_backbone_weights(cfg: DictConfig) -> None:
    """Load ``backbone.weights`` into the configured backbone now, as the task will later.

    Reading it before the data means a missing, unsafe or ill-fitting file, or a known name that
    cannot be downloaded, fails in a second instead of after the dataset was scanned.
    """
    from mnv3.models.backbone import build_backbone
    from mnv3.models.checkpoints import CheckpointError

    weights = cfg.backbone.get("weights")
    if not weights:
        return
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    try:
        # One logit: a checkpoint's classifier of any class count is re-initialised, as in fine-tuning.
        build_backbone(**backbone, num_classes=1)  # type: ignore[arg-type]
    except CheckpointError as exc:
        raise CheckpointError(f"backbone.weights: {exc}") from exc


def lightning_checkpoint(path: Path, key: str) -> dict[str, Any]:
    """The checkpoint ``mnv3.train`` wrote at ``path``, read safely; ``key`` names the setting."""
    from mnv3.models.checkpoints import CheckpointError, load_checkpoint_file

    try:
        checkpoint = load_checkpoint_file(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{key}: {exc}") from exc
    if not (
        isinstance(checkpoint, Mapping)
        and "state_dict" in checkpoint
        and isinstance(checkpoint.get("hyper_parameters"), Mapping)
        and "model" in checkpoint["hyper_parameters"]
    ):
        raise CheckpointError(
            f"{key}={path} is not a checkpoint written by mnv3.train (it lacks Lightning's "
            "state_dict and hyper_parameters); expected <run>/checkpoints/last.ckpt or best.ckpt"
        )
    return dict(checkpoint)


def _arch(kwargs: Mapping[str, Any], task: Any) -> dict[str, Any]:
    """A task's network kwargs as its name and its architecture settings by config key
    (``task.architecture_keys``; ``backbone.in_channels`` null means RGB, 3)."""
    arch = {"name": task.network_name(kwargs)}
    arch.update({key: kwargs[k] for k, key in task.architecture_keys.items() if k in kwargs})
    if "backbone.in_channels" in arch and arch["backbone.in_channels"] is None:
        arch["backbone.in_channels"] = 3
    return arch


def _arch_differences(theirs: Mapping[str, Any], ours: Mapping[str, Any], task: Any) -> list[str]:
    """Architecture settings both sides set to different values (the name always first)."""
    a, b = _arch(theirs, task), _arch(ours, task)
    return ["name"] + [k for k in a if k != "name" and k in b and a[k] != b[k]]


def _describe(kwargs: Mapping[str, Any], keys: list[str], task: Any) -> str:
    """The network's name plus the settings that differ and it does not show, e.g.
    ``mobilenet_v3_large width_mult=0.75``."""
    arch = _arch(kwargs, task)
    shown = [k for k in keys[1:] if k in arch and str(arch[k]) not in str(arch["name"])]
    return " ".join([str(arch["name"]), *(f"{k.split('.')[-1]}={_shown(arch[k])}" for k in shown)])


def shape_differences(checkpoint: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """``key (shape in the checkpoint) vs (shape here)`` for every tensor that differs or lacks."""
    out = []
    for key in [*expected, *(k for k in checkpoint if k not in expected)]:
        theirs, ours = checkpoint.get(key), expected.get(key)
        shape = lambda t: "absent" if t is None else tuple(t.shape)  # noqa: E731
        if theirs is None or ours is None or theirs.shape != ours.shape:
            out.append(f"{key} {shape(theirs)} vs {shape(ours)}")
    return out


def _mismatch(
    key: str, path: Path, differences: list[str], theirs: str, ours: str, advice: str
) -> str:
    first = "; ".join(differences[:3])
    return (
        f"{key}={path} holds a {theirs} network but this run builds {ours}: {len(differences)} "
        f"tensors differ (checkpoint vs config), first {first}; {advice}"
    )


def check_resume_checkpoint(cfg: DictConfig) -> None:
    """``ckpt_path`` must be a readable mnv3.train checkpoint of the architecture ``cfg`` builds.

    Every task alike: compared as the network's tensor shapes, built from the config by the
    task's own translation (``network_kwargs``, as its ``from_config``) with the checkpoint's
    class count (so only the architecture can differ); the data-dependent rest (class count, EMA) is
    compared by :func:`check_checkpoint_fits` once the task exists.
    """
    from mnv3.models.checkpoints import CheckpointError
    from mnv3.tasks import TASKS

    ckpt = cfg.get("ckpt_path")
    if not ckpt or (str(ckpt) in LIGHTNING_CKPT_NAMES and not Path(str(ckpt)).exists()):
        return
    path = Path(str(ckpt)).expanduser()
    checkpoint = lightning_checkpoint(path, "ckpt_path")
    hparams = checkpoint["hyper_parameters"]
    task = TASKS.get(str(cfg.head.get("task")))
    if task is None or not isinstance(hparams["model"], Mapping):
        return
    theirs = dict(hparams["model"])
    ours = model_kwargs(cfg)
    # The pretrained weights the run started from are not read: the checkpoint replaces them.
    unloaded = {k: None for k in ("weights", "backbone_weights") if k in ours}
    network = task.network({**ours, **unloaded}, int(hparams.get("num_classes", 1)))
    state = {
        k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")
    }
    differences = shape_differences(state, network.state_dict())
    if differences:
        keys = _arch_differences(theirs, ours, task)
        arch = _arch(theirs, task)
        settings = [k for k in arch if k == "backbone.name" or k in keys[1:]]
        overrides = " ".join(f"{k}={_shown(arch[k])}" for k in settings)
        advice = (
            f"resume with that run's settings ({overrides}) or start a new run without ckpt_path"
        )
        raise CheckpointError(
            _mismatch(
                "ckpt_path",
                path,
                differences,
                _describe(theirs, keys, task),
                _describe(ours, keys, task),
                advice,
            )
        )


def check_checkpoint_fits(ckpt_path: Any, module: Any) -> None:
    """Every tensor of the resumed checkpoint must fit ``module`` (class count, EMA copy, ...).

    Lightning would otherwise stop on the first ``load_state_dict`` with one "size mismatch"
    line per tensor.
    """
    from mnv3.models.checkpoints import CheckpointError

    if not ckpt_path or (
        str(ckpt_path) in LIGHTNING_CKPT_NAMES and not Path(str(ckpt_path)).exists()
    ):
        return
    path = Path(str(ckpt_path)).expanduser()
    checkpoint = lightning_checkpoint(path, "ckpt_path")
    differences = shape_differences(checkpoint["state_dict"], module.state_dict())
    if differences:
        hparams = checkpoint["hyper_parameters"]
        ours_h = getattr(module, "hparams", {})
        theirs = f"{hparams['model'].get('name')} ({hparams.get('num_classes')} classes)"
        ours = f"{ours_h.get('model', {}).get('name')} ({ours_h.get('num_classes')} classes)"
        advice = "resume only with the data and ema_decay that run had"
        raise CheckpointError(_mismatch("ckpt_path", path, differences, theirs, ours, advice))


def check_train_config(cfg: DictConfig) -> None:
    """Everything ``mnv3.train`` can check before reading data: values, builder keys, checkpoints."""
    check_values(cfg)
    check_backbone_keys(cfg)
    check_backbone_weights(cfg)
    check_resume_checkpoint(cfg)


def check_explain_config(cfg: DictConfig) -> None:
    """``mnv3.explain``'s values and its checkpoint, read safely once before anything else."""
    check_values(cfg)
    lightning_checkpoint(Path(str(cfg.ckpt_path)).expanduser(), "ckpt_path")
