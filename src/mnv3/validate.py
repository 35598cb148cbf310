"""The entry points' checks of a composed config and of the checkpoints it names, run before any
data is read: one home for every "this cannot work" sentence of train, eval, export and explain.

A bad value (``data.batch_size=0``, ``optim.lr=abc``, ``backbone.name=mobilenet_v4``) would
otherwise surface minutes later as a traceback from deep inside torch or Lightning, after the
data was built. :data:`~mnv3.value_rules.RULES` states what every value must be;
:func:`check_values` applies it to whichever sections a config has, and each failure is one
:class:`~mnv3.errors.ConfigError` sentence naming the key, the value and what was expected.
Combinations (a head and a dataset, data and backbone channels, export format and quantization)
are checked by the ``check_*`` functions below, and each entry point has one ``check_*_config``.

Checkpoints named by the config (``backbone.weights``, ``ckpt_path`` to resume, evaluate or
explain) are read here once with ``weights_only=True``, so an empty, truncated, unsafe or
foreign file, and a checkpoint of another architecture, fail at start with one sentence.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mnv3.cli import CONFIG_DIR, CPU_PLAN_KEY, ConfigError, model_kwargs, to_plain
from mnv3.value_rules import RULES, SECTIONS, Rule

# Lightning's own names for a checkpoint (trainer.fit(ckpt_path="last")), not files.
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


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


# Groups whose options are files of keys (conf/<group>/<name>.yaml): a key no shipped option of
# the group has is a typo or a setting nothing reads, refused rather than silently ignored.
# (backbone: check_backbone_keys, by builder; data: the data module's constructor.)
SCHEMA_GROUPS = ("head", "optim", "scheduler", "cpu", "callbacks")
# Keys mnv3 itself adds to a group while it runs, so a resumed run's saved config holds them.
ADDED_WHILE_RUNNING = {"cpu": frozenset({CPU_PLAN_KEY})}
# Files that set keys of any group or at the top level (``# @package _global_``).
GLOBAL_GROUPS = ("experiment", "debug", "hparams_search")


@functools.cache
def _option_keys(group: str, option: str) -> frozenset[str]:
    """The keys ``conf/<group>/<option>.yaml`` sets, its own ``defaults`` options included."""
    path = CONFIG_DIR / group / f"{option}.yaml"
    if not path.is_file():
        return frozenset()
    node = OmegaConf.load(path)
    keys = {str(k) for k in node if k != "defaults"}
    for parent in node.get("defaults", []):
        if isinstance(parent, str) and parent != "_self_":
            keys |= _option_keys(group, parent)
    return frozenset(keys)


def _overrides(node: DictConfig, group: str) -> str | None:
    """The option a global file's defaults list picks for ``group`` (``override /head: x``)."""
    for entry in node.get("defaults", []):
        if isinstance(entry, DictConfig):
            for key, value in entry.items():
                if str(key).removeprefix("override ").strip("/") == group:
                    return str(value)
    return None


@functools.cache
def _global_keys(section: str | None, option: str | None = None) -> frozenset[str]:
    """The keys the experiment, debug and search files set in ``section`` (None: top level),
    from the files that pick ``option`` for that group or leave the group's choice alone."""
    keys: set[str] = set()
    for group in GLOBAL_GROUPS:
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            node = OmegaConf.load(path)
            if section is None:
                keys |= {str(k) for k in node if k != "defaults"}
                continue
            picked = _overrides(node, section)
            if isinstance(node.get(section), DictConfig) and picked in (None, option):
                keys |= {str(k) for k in node[section]}
    return frozenset(keys)


def _unknown(key: str, known: set[str] | frozenset[str], where: str) -> ConfigError:
    return ConfigError(
        f"{key} is not an option of {where}; its options: {', '.join(sorted(known))} (a typo, "
        "or a setting nothing reads: mnv3 refuses it rather than ignore it)"
    )


def check_known_keys(cfg: DictConfig, top_level: str | None = "train") -> None:
    """Refuse a key nothing reads: ``+head.foo=1``, ``+optim.moment=0.9``, ``+trainer.epochs=3``.

    A group's keys are those of its chosen option file plus those any experiment / debug file
    sets in it; ``trainer`` keys are Lightning ``Trainer`` arguments; top-level keys (for the
    ``top_level`` entry point's config, e.g. ``conf/train.yaml``) those of that file, its groups
    and the experiment files. Without this, a misspelt key was silently ignored.
    """
    for group in SCHEMA_GROUPS:
        section = cfg.get(group)
        if not isinstance(section, DictConfig):
            continue
        option = str(section.get("name") or "default")
        own = _option_keys(group, option)
        if not own:  # a group option from the user's own search path: nothing to compare
            continue
        known = own | _global_keys(group, option) | ADDED_WHILE_RUNNING.get(group, frozenset())
        for key in section:
            if str(key) not in known:
                raise _unknown(f"{group}.{key}", own, f"{group}={option}")
    trainer = cfg.get("trainer")
    if isinstance(trainer, DictConfig) and "_target_" in trainer:
        import pytorch_lightning as pl

        accepted = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
        for key in trainer:
            if str(key) not in accepted | {"_target_"}:
                raise _unknown(f"trainer.{key}", accepted, "Lightning's Trainer")
    if top_level is not None:
        own = _option_keys(".", top_level) | {"hydra"}
        defaults = OmegaConf.load(CONFIG_DIR / f"{top_level}.yaml").get("defaults", [])
        groups = {str(next(iter(d))) for d in defaults if isinstance(d, DictConfig)}
        known = own | groups | _global_keys(None)
        for key in cfg:
            if str(key) not in known:
                raise _unknown(str(key), own - {"hydra"}, f"{top_level}.yaml (top level)")


def check_accelerator(cfg: DictConfig, gpus: int | None = None) -> None:
    """A GPU config on a machine without (enough) GPUs is one sentence before any data is read.

    Lightning says ``MisconfigurationException('No supported gpu backend found!')`` inside a
    5-line Hydra instantiation error, after the data module was built; the paper recipes
    (``override /trainer: gpu``, ``devices: 8``) meet this on every laptop. ``gpus``: the
    machine's CUDA device count (default: ``torch.cuda.device_count()``).
    """
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig):
        return
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in ("gpu", "cuda"):
        return
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    if gpus == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} needs a GPU, but this machine has none "
            "(torch.cuda.is_available() is False); run it on a GPU machine, or try the recipe "
            "here on the CPU with trainer=cpu (resuming a GPU run: trainer.accelerator=cpu "
            "trainer.precision=32, since resume keeps the run's groups)"
        )
    devices = trainer.get("devices", 1)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > gpus:
        raise ConfigError(
            f"trainer.devices={devices} but this machine has {gpus} GPU(s); set "
            f"trainer.devices={gpus} (data.batch_size is per device: the global batch shrinks) "
            f"or run on a machine with {devices}"
        )


def check_backbone_keys(cfg: DictConfig) -> None:
    """Every backbone key must be an option of the chosen backbone (e.g. no ``minimal`` on V2)."""
    from mnv3.models.backbone import backbone_arch, backbone_options
    from mnv3.models.block_table import BlockTableError

    accepted = set(backbone_options(cfg.backbone.name)) - {"num_classes"} | {"name"}
    for key in cfg.backbone:
        if key not in accepted:
            raise ConfigError(
                f"backbone.{key} is not an option of backbone.name={cfg.backbone.name}; its "
                f"options: {', '.join(sorted(accepted))}"
            )
    if "table" in accepted:  # a block table is data: read it now, not when the model is built
        table = OmegaConf.to_container(cfg.backbone, resolve=True).get("table")  # type: ignore[union-attr]
        try:
            backbone_arch(cfg.backbone.name, table=table)
        except BlockTableError as exc:
            raise ConfigError(str(exc)) from None


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
    assert isinstance(backbone, dict)
    try:
        # One logit: a checkpoint's classifier of any class count is re-initialised, as in fine-tuning.
        build_backbone(**backbone, num_classes=1)
    except CheckpointError as exc:
        raise CheckpointError(f"backbone.weights: {exc}{_shape_advice(weights, backbone)}") from exc


def _shape_advice(weights: Any, backbone: Mapping[str, Any]) -> str:
    """``; set backbone.reduced_tail=false ...`` when ``weights`` is an mnv3 classifier checkpoint
    whose shape options (width, tail, ...) differ from the backbone group's; else ``""``."""
    from mnv3.models.backbone import SHAPE_OPTIONS
    from mnv3.models.checkpoints import CheckpointError, load_checkpoint_file

    path = Path(str(weights)).expanduser()
    try:
        checkpoint = load_checkpoint_file(path) if path.is_file() else None
    except CheckpointError:
        return ""
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    model = hparams.get("model") if isinstance(hparams, Mapping) else None
    if not isinstance(model, Mapping) or model.get("name") != backbone.get("name"):
        return ""
    differ = [
        k
        for k in SHAPE_OPTIONS
        if backbone.get(k) is not None and k in model and model[k] != backbone[k]
    ]
    if not differ:
        return ""
    sets = " ".join(f"backbone.{k}={_shown(model[k])}" for k in differ)
    return f"; its network was trained with {sets}: set that to start from it"


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


def _task_and_network(checkpoint: Mapping[str, Any]) -> tuple[str, str] | None:
    """The task an mnv3.train checkpoint holds and its network's name, e.g. ``("detection",
    "ssdlite320_mobilenet_v3_small")``; None for any other file."""
    from mnv3.tasks import TASKS, task_of_model

    hparams = checkpoint.get("hyper_parameters")
    model = hparams.get("model") if isinstance(hparams, Mapping) else None
    task = task_of_model(model)
    if task is None:
        return None
    return task, TASKS[task].network_name(model)  # type: ignore[arg-type]


def _weights_key_for(checkpoint_task: str, run_task: str) -> str | None:
    """The setting of a ``run_task`` run that starts from a ``checkpoint_task`` checkpoint: the
    task's own whole-network weights key, or ``backbone.weights`` for a classifier's backbone."""
    from mnv3.tasks import TASKS

    if checkpoint_task == run_task:
        return TASKS[run_task].weights_key
    return "backbone.weights" if checkpoint_task == "classification" else None


def check_weights_task(cfg: DictConfig) -> None:
    """``backbone.weights`` / ``head.weights`` naming an mnv3.train checkpoint of the wrong task
    is one sentence saying which task it holds and which the setting takes.

    ``backbone.weights`` takes a classifier (its backbone); the task's own weights key
    (``head.weights`` for detection and segmentation) takes a checkpoint of the run's task.
    Without this, a detector checkpoint in a segmentation run failed on its first tensor name.
    Files that are not mnv3.train checkpoints (torchvision's, known names, URLs) pass through to
    the loaders, which check their tensors.
    """
    from mnv3.models.checkpoints import CheckpointError, load_checkpoint_file
    from mnv3.tasks import TASKS

    run_task = str(cfg.head.get("task")) if cfg.get("head") else ""
    if run_task not in TASKS:
        return
    for key in ("backbone.weights", "head.weights"):
        value = OmegaConf.select(cfg, key, default=None)
        path = Path(str(value)).expanduser() if value else None
        if path is None or not path.is_file():
            continue
        try:
            held = _task_and_network(load_checkpoint_file(path))
        except CheckpointError:
            continue  # unreadable: the loader says so in its own sentence
        takes = run_task if key == TASKS[run_task].weights_key else "classification"
        if held is None or held[0] == takes:
            continue
        alternative = _weights_key_for(held[0], run_task)
        advice = (
            f"pass it as {alternative}={path}"
            if alternative and alternative != key
            else f"use a checkpoint of a {takes} run"
        )
        raise CheckpointError(
            f"{key}={path} holds a {held[0]} checkpoint ({held[1]}) but {key} of this {run_task} "
            f"run (head={cfg.head.get('name')}) takes {takes} weights; {advice}"
        )


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
    run_task = str(cfg.head.get("task"))
    task = TASKS.get(run_task)
    if task is None or not isinstance(hparams["model"], Mapping):
        return
    held = _task_and_network(checkpoint)
    if held is not None and held[0] != run_task:
        start = _weights_key_for(held[0], run_task)
        also = f", or start this run from its weights with {start}={path}" if start else ""
        raise CheckpointError(
            f"ckpt_path={path} holds a {held[0]} checkpoint ({held[1]}) but this run is "
            f"{run_task} (head={cfg.head.get('name')}, data={cfg.data.get('name')}); resume it "
            f"with the head and data of the run that wrote it{also}"
        )
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
    check_known_keys(cfg)
    check_values(cfg)
    check_accelerator(cfg)
    check_backbone_keys(cfg)
    check_weights_task(cfg)
    check_backbone_weights(cfg)
    check_resume_checkpoint(cfg)


def check_head_and_data(cfg: DictConfig) -> None:
    """Refuse a head/dataset pair that cannot work, before any data is read."""
    task = cfg.head.task
    provides = list(cfg.data.get("provides", []))
    if task not in provides:
        raise ConfigError(
            f"head={cfg.head.name} needs {task} data, but data={cfg.data.name} provides "
            f"{' and '.join(provides) or 'nothing'}; choose a {task} dataset or a head for {provides[0] if provides else '-'}"
        )


def check_channels(cfg: DictConfig) -> None:
    """A gray (1-channel) data config needs a 1-channel backbone, and the reverse."""
    data_channels = int(cfg.data.get("channels", 3))
    model_channels = int(cfg.backbone.get("in_channels", 3) or 3)
    if data_channels != model_channels:
        raise ConfigError(
            f"data.channels={data_channels} but backbone.in_channels={model_channels}; set both to 1 "
            "(gray input, stem weights summed from RGB) or both to 3 (gray replicated to RGB)"
        )


def check_groups_fit(cfg: DictConfig) -> None:
    """The head, data and backbone groups fit together: the task the head needs and the
    channels the backbone takes (train and eval both check this before reading data)."""
    check_head_and_data(cfg)
    check_channels(cfg)


def check_weights_config(cfg: DictConfig, weights_key: str, tool: str = "mnv3.eval") -> str:
    """``mnv3.eval`` (or ``tool``) without ``ckpt_path``: the groups it needs and the weights it
    runs (``weights_key``: the task's, e.g. ``backbone.weights``); returns the weights' name."""
    if not cfg.get("backbone") or not cfg.get("data") or "_target_" not in cfg.data:
        raise ConfigError(
            f"{tool} needs ckpt_path=<run checkpoint>, or backbone=<name>, data=<dataset> and "
            "the weights (backbone.weights for head=classifier, head.weights otherwise)"
        )
    weights = OmegaConf.select(cfg, weights_key)
    if not weights:
        raise ConfigError(
            f"{weights_key} is not set: without ckpt_path, {tool} runs the weights it "
            "names (a known name such as mobilenet_v3_large.IMAGENET1K_V2, a URL or a file path)"
        )
    return str(weights)


def check_evaluated_config(cfg: DictConfig) -> None:
    """The data / backbone / head sections ``mnv3.eval`` builds released weights into."""
    check_values(cfg)
    check_groups_fit(cfg)
    check_backbone_keys(cfg)
    check_weights_task(cfg)


def check_export_config(cfg: DictConfig) -> None:
    """Refuse unknown formats, quantization modes and sizes before anything is read."""
    from mnv3.deploy.common import ExportError
    from mnv3.deploy.exporter import check_format
    from mnv3.deploy.onnx_export import CALIBRATION_METHODS

    if cfg.get("ckpt_path") in (None, ""):
        raise ConfigError("ckpt_path is not set; expected ckpt_path=<run>/checkpoints/best.ckpt")
    try:
        check_format(cfg.format, cfg.get("quantize"))
    except ExportError as exc:
        raise ConfigError(str(exc)) from None
    steps = cfg.get("qat_steps", 0)
    if not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"qat_steps={steps!r} is not a count; expected 0 or more batches")
    if steps and (cfg.format != "pte" or cfg.get("quantize") != "int8"):
        raise ConfigError(
            f"qat_steps={steps} needs format=pte quantize=int8 (quantization-aware training "
            f"for ExecuTorch); got format={cfg.format} quantize={cfg.get('quantize')}"
        )
    method = cfg.get("calibration_method", "minmax")
    if method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"calibration_method={method!r} is unknown; "
            f"expected one of {', '.join(CALIBRATION_METHODS)}"
        )
    size = cfg.get("input_size")
    if size is not None:
        plain = to_plain(size)
        if isinstance(plain, int):
            plain = [plain, plain]
        if not (
            isinstance(plain, list) and len(plain) == 2 and all(isinstance(v, int) for v in plain)
        ):
            raise ConfigError(f"input_size={plain!r} is not a size; expected [H, W] in pixels")


def check_explain_config(cfg: DictConfig) -> None:
    """``mnv3.explain``'s files and values, before the checkpoint is opened."""
    ckpt_path = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt_path.is_file():
        raise FileNotFoundError(
            f"checkpoint {ckpt_path} does not exist (expected a .ckpt written by mnv3.train)"
        )
    image_path = Path(str(cfg.image)).expanduser()
    if not image_path.is_file():
        raise FileNotFoundError(f"image {image_path} does not exist (give image=path/to/file)")
    check_values(cfg)
    value = cfg.get("overlay_max_size", 2048)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(
            f"overlay_max_size={value!r} (conf/explain.yaml) must be a positive number of "
            "pixels or null for no limit"
        )
