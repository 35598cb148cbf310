"""Reading checkpoints safely, and the known pretrained weights with their preprocessing.

Everything is loaded with ``torch.load(weights_only=True)``: a checkpoint is data, never code.
Three formats are understood and told apart by their keys:

- torchvision's state dicts (``features.N...``, ``classifier.N...``), renamed to ours by a key
  map derived from the model itself;
- this project's plain state dicts (``stem.``, ``blocks.N.``, ``last_conv.``, ``classifier.``);
- this project's Lightning checkpoints (``{"state_dict": {"model.stem...": ...}}``).

A checkpoint with another class count keeps the backbone and the head's hidden layer and
re-initialises the logits layer (the fine-tuning path). An RGB checkpoint loads into a
one-channel (gray) model by summing the stem's kernels over R, G, B (:func:`adapt_stem_to_gray`).
Any other mismatch is an error that names the first missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from mnv3.models.mobilenet import MobileNet


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a checkpoint (ImageNet evaluation preset)."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class KnownWeights:
    """A published checkpoint: where it lives, what it expects, and what it should score.

    The one record type of every known checkpoint (classifiers, detectors, segmenters).
    ``arch``: the builder name it fits (``model.arch.name`` of a classifier, ``model.name`` of
    a detector or segmenter); ``build``: the builder arguments it needs beyond the defaults.
    """

    name: str
    arch: str
    url: str
    num_params: int
    metrics: Mapping[str, float]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    num_classes: int = 1000
    source: str = "torchvision"
    build: Mapping[str, Any] = field(default_factory=dict)


TORCHVISION_URL = "https://download.pytorch.org/models/"


# torchvision's ImageNet-1K classifiers: name -> (file hash, parameters, top-1, top-5); the V2
# recipe evaluates at resize 232.
IMAGENET_RELEASES = {
    "mobilenet_v3_large.IMAGENET1K_V1": ("8738ca79", 5_483_032, 74.042, 91.340),
    "mobilenet_v3_large.IMAGENET1K_V2": ("5c1a4163", 5_483_032, 75.274, 92.566),
    "mobilenet_v3_small.IMAGENET1K_V1": ("047dcff4", 2_542_856, 67.668, 87.402),
    "mobilenet_v2.IMAGENET1K_V1": ("b0353104", 3_504_872, 71.878, 90.286),
    "mobilenet_v2.IMAGENET1K_V2": ("7ebf99e0", 3_504_872, 72.154, 90.822),
}


def _imagenet(name: str) -> KnownWeights:
    file_hash, params, top1, top5 = IMAGENET_RELEASES[name]
    arch, _, tag = name.partition(".")
    return KnownWeights(
        name,
        arch,
        f"{TORCHVISION_URL}{arch}-{file_hash}.pth",
        params,
        {"acc1": top1, "acc5": top5},
        Preprocessing(resize_size=232) if tag == "IMAGENET1K_V2" else Preprocessing(),
    )


# Published top-1 / top-5 on ImageNet-1K val (torchvision's weight tables), box mAP on COCO
# val2017. Segmenters' are in mnv3.models.segmentation.checkpoints (same record type).
KNOWN_WEIGHTS: dict[str, KnownWeights] = {
    w.name: w
    for w in (
        *(_imagenet(name) for name in IMAGENET_RELEASES),
        # SSDLite detector (mnv3.models.ssdlite320), inputs in [-1, 1].
        KnownWeights(
            "ssdlite320_mobilenet_v3_large.COCO_V1",
            "ssdlite320_mobilenet_v3_large",
            TORCHVISION_URL + "ssdlite320_mobilenet_v3_large_coco-a79551df.pth",
            3_440_060,
            {"box_map": 21.3},
            Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize_size=320, crop_size=320),
            num_classes=91,
        ),
    )
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


@dataclass
class LoadReport:
    """What :func:`load_weights` did: the format it found, which keys it re-initialised, and
    which tensors it adapted to the model (``adapted``: one "key: what was done" note each)."""

    source: str
    format: str
    reinitialized: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)


STEM_WEIGHT = "stem.conv.weight"


def adapt_stem_to_gray(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Sum an RGB stem kernel into one input channel when the model reads gray images.

    Why the sum is exact: a gray image ``g`` replicated to RGB has ``x_c = g`` for every c, so
    ``conv(x, W) = sum_c conv(g, W[:, c]) = conv(g, W.sum(dim=1, keepdim=True))`` (convolution is
    linear in its input channels). When the gray channel is normalised as each replicated one was
    (the same mean/std on all three), the one-channel model computes exactly what the RGB model
    computed on the replicated image; with ImageNet's per-channel mean/std the data side uses
    their averages, a close approximation.

    Returns the state dict (a new dict; other tensors shared) and the adaptation notes. Only the
    3 -> 1 case is adapted; every other in-channel mismatch is left for the shape check to report.
    """
    ours, theirs = expected.get(STEM_WEIGHT), state.get(STEM_WEIGHT)
    if ours is None or theirs is None or theirs.ndim != 4 or ours.ndim != 4:
        return dict(state), []
    if not (theirs.shape[1] == 3 and ours.shape[1] == 1):
        return dict(state), []
    if theirs.shape[0] != ours.shape[0] or theirs.shape[2:] != ours.shape[2:]:
        return dict(state), []  # another stem altogether: the shape check names it
    out = dict(state)
    out[STEM_WEIGHT] = theirs.sum(dim=1, keepdim=True)
    return out, [f"{STEM_WEIGHT}: RGB kernels summed into 1 input channel (gray model)"]


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://", "file://"))


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
# How torch's safe unpickler names the callable it refused ("GLOBAL posix.system").
_REFUSED_GLOBAL = re.compile(r"(?:Unsupported global: |unsupported )GLOBAL (\S+)")


def _load_error(path: Path, exc: BaseException) -> str:
    """One sentence saying why ``torch.load(path, weights_only=True)`` failed, for a user.

    Never the loader's own advice to retry with ``weights_only=False``: that would run whatever
    code the file carries.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(4)
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        refused = _REFUSED_GLOBAL.search(text)
        what = f"a pickled {refused.group(1)}" if refused else "pickled objects"
        return (
            f"checkpoint file {path} holds {what}, refused for safety: only tensors and plain "
            "values are loaded, so it was not written by torch.save of a state dict or by mnv3.train"
        )
    if head == _ZIP_MAGIC:
        # torch's zip reader reports a cut-off archive as a missing central directory.
        return (
            f"checkpoint file {path} is truncated or corrupt ({size:,} bytes, an incomplete zip "
            "archive): the save or the copy was interrupted; copy it again or use another checkpoint"
        )
    return (
        f"file {path} is not a PyTorch checkpoint ({size:,} bytes that are neither a torch.save "
        f"zip archive nor a readable pickle: {type(exc).__name__}); expected a .pth/.ckpt file"
    )


def load_checkpoint_file(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with one sentence for every failure.

    Why a wrapper: torch answers an empty file with a bare ``EOFError``, a text file with a
    ``KeyError`` and an unsafe pickle with advice to disable the safety check. Each case becomes a
    :class:`CheckpointError` naming the file and what it is instead.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; expected a .pth/.ckpt file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist (expected a .pth/.ckpt file)")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint file {path} is empty (0 bytes): the save or the copy was interrupted; "
            "use another checkpoint or copy it again"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # unpickling refusals, corrupt zips, garbage bytes
        raise CheckpointError(_load_error(path, exc)) from exc


def hub_cache_path(url: str) -> Path:
    """Where torch.hub keeps the file of ``url``: ``$TORCH_HOME/hub/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _download(url: str, name: str, check_hash: bool, progress: bool) -> Path:
    """The torch.hub cache file of ``url``, downloaded first when it is not there yet."""
    cached = hub_cache_path(url)
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(cached.name) if check_hash else None
    print(f"Downloading {url} to {cached}", file=sys.stdout)
    try:
        # Looked up at call time, so tests can stand in for the network.
        torch.hub.download_url_to_file(
            url, str(cached), match.group(1) if match else None, progress=progress
        )
    except Exception as exc:  # no network, HTTP errors, a hash that does not match
        reason = str(getattr(exc, "reason", None) or exc).split("\n")[0]
        raise CheckpointError(
            f"could not download {name} from {url} ({type(exc).__name__}: {reason}); without "
            f"network, put that file at {cached} ($TORCH_HOME/hub/checkpoints/{cached.name}) "
            "or give the path of a local copy instead"
        ) from exc
    return cached


def read_checkpoint(
    source: str | os.PathLike[str],
    progress: bool = True,
    arch: str | None = None,
    known_weights: Mapping[str, KnownWeights] | None = None,
) -> dict[str, torch.Tensor]:
    """Read a state dict from a known weights name, a URL (torch.hub cache) or a local file.

    Lightning checkpoints are unwrapped to the network's own state dict. Every failure (missing,
    empty, truncated or unsafe file; no network for a known name; a known name whose
    architecture is not ``arch``, when given) is one :class:`CheckpointError`.
    ``known_weights``: the table names are looked up in (default :data:`KNOWN_WEIGHTS`).
    """
    name = source = str(source)
    known = (KNOWN_WEIGHTS if known_weights is None else known_weights).get(source)
    if arch is not None and known is not None and known.arch != arch:
        raise CheckpointError(f"weights {source} are for {known.arch}, not {arch}")
    check_hash = False
    if known is not None:
        source, check_hash = known.url, True
    path = _download(source, name, check_hash, progress) if _is_url(source) else Path(source)
    return unwrap_state_dict(load_checkpoint_file(path), str(path))


def unwrap_state_dict(obj: object, source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The network state dict inside a plain, ``{"model": ...}`` or Lightning checkpoint."""
    if isinstance(obj, Mapping) and "state_dict" in obj:
        inner = obj["state_dict"]
        # The Lightning task keeps the network as ``self.model``.
        return {k[len("model.") :]: v for k, v in inner.items() if k.startswith("model.")}
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        return dict(obj["model"])
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise CheckpointError(f"checkpoint {source} holds no state dict (found {type(obj).__name__})")


def torchvision_module_map(model: MobileNet) -> dict[str, str]:
    """Map torchvision's module names to ours, derived from the model's own block list.

    torchvision numbers layers inside ``features.N.block`` (V3) or ``features.N.conv`` (V2)
    in order, skipping absent expansions and SE layers; we walk our blocks the same way.
    """
    v2 = model.arch.name == "mobilenet_v2"
    names = {"features.0.0": "stem.conv", "features.0.1": "stem.bn"}
    for i, block in enumerate(model.blocks):
        prefix = f"features.{i + 1}.{'conv' if v2 else 'block'}"
        j = 0
        for part in ("expand", "depthwise"):
            if getattr(block, part) is not None:
                names[f"{prefix}.{j}.0"] = f"blocks.{i}.{part}.conv"
                names[f"{prefix}.{j}.1"] = f"blocks.{i}.{part}.bn"
                j += 1
        if block.se is not None:
            names[f"{prefix}.{j}.fc1"] = f"blocks.{i}.se.reduce"
            names[f"{prefix}.{j}.fc2"] = f"blocks.{i}.se.expand"
            j += 1
        if v2:  # V2's projection is a bare Conv2d followed by a bare BatchNorm2d
            names[f"{prefix}.{j}"] = f"blocks.{i}.project.conv"
            names[f"{prefix}.{j + 1}"] = f"blocks.{i}.project.bn"
        else:
            names[f"{prefix}.{j}.0"] = f"blocks.{i}.project.conv"
            names[f"{prefix}.{j}.1"] = f"blocks.{i}.project.bn"
    last = len(model.blocks) + 1
    names[f"features.{last}.0"] = "last_conv.conv"
    names[f"features.{last}.1"] = "last_conv.bn"
    if v2:
        names["classifier.1"] = "classifier.fc"
    else:
        names["classifier.0"] = "classifier.pre_logits"
        names["classifier.3"] = "classifier.fc"
    return names


def is_torchvision_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("features.") for k in state_dict) and not any(
        k.startswith("stem.") for k in state_dict
    )


def from_torchvision(
    state_dict: Mapping[str, torch.Tensor], model: MobileNet
) -> dict[str, torch.Tensor]:
    """Rename a torchvision state dict to this project's names (unknown keys kept as they are)."""
    return rename_modules(state_dict, torchvision_module_map(model))


def load_weights(
    model: MobileNet, source: str | os.PathLike[str], progress: bool = True
) -> LoadReport:
    """Load a checkpoint into ``model`` in place; see the module docstring for the rules.

    Gray models (``in_channels=1``) take RGB checkpoints: the stem kernel ``W`` (out, 3, k, k)
    becomes ``W.sum(dim=1, keepdim=True)``, because for a gray image replicated to RGB
    ``conv(replicate(x), W) == conv(x, W.sum(dim=1, keepdim=True))``; with identical
    normalisation the 1-channel model computes exactly what the 3-channel one did on replicated
    input. The report's ``adapted`` lists it. Any other in-channel mismatch (a 1-channel
    checkpoint into an RGB model, say) is a :class:`CheckpointError` naming ``stem.conv.weight``.
    """
    source = str(source)
    state = read_checkpoint(source, progress=progress, arch=model.arch.name)
    fmt = "mnv3"
    if is_torchvision_state_dict(state):
        state, fmt = from_torchvision(state, model), "torchvision"
    report = LoadReport(source=source, format=fmt)
    expected = model.state_dict()
    state, report.adapted = adapt_stem_to_gray(state, expected)

    if model.classifier is None:  # a backbone takes no classifier from the checkpoint
        report.ignored = [k for k in state if k.startswith("classifier.")]
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    else:
        fc = [k for k in expected if k.startswith("classifier.fc.")]
        fc_fits = all(k in state and state[k].shape == expected[k].shape for k in fc)
        if not fc_fits:
            report.ignored = [k for k in state if k.startswith("classifier.fc.")]
            state = {k: v for k, v in state.items() if not k.startswith("classifier.fc.")}
            report.reinitialized = fc
        if not any(k.startswith("classifier.") for k in state):  # a backbone-only checkpoint
            report.reinitialized = [k for k in expected if k.startswith("classifier.")]

    def reset_classifier() -> None:
        if any(k.startswith("classifier.pre_logits") for k in report.reinitialized):
            model.classifier.reset_parameters()
        else:
            model.reset_classifier(model.num_classes)

    return load_mapped_state_dict(model, state, report, model.arch.name, reset_classifier)


def rename_modules(
    state: Mapping[str, torch.Tensor], modules: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Rename each ``<module>.<param>`` key whose module ``modules`` maps to one of ours.

    Keys of unmapped modules are kept as they are, so that the load's error can name them.
    """
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        out[f"{modules[module]}.{param}" if module in modules else key] = value
    return out


def load_mapped_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    report: LoadReport,
    describe: str,
    reinit: Callable[[], None] | None = None,
) -> LoadReport:
    """Load ``state`` (already in our names) into ``model`` in place, or fail in one sentence.

    Every key of the model must be in ``state`` with its shape, except those the caller listed
    in ``report.reinitialized`` (dropped from ``state`` before), and ``state`` must hold no
    other key; otherwise a :class:`CheckpointError` names ``report.source``, its format, the
    model (``describe``) and the first missing, unexpected and mis-shaped keys. After loading,
    ``reinit()`` re-initialises the layers listed in ``report.reinitialized``, if any.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in report.reinitialized]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        parts = [f"{len(missing)} missing key(s)" + (f", first {missing[0]!r}" if missing else "")]
        parts.append(
            f"{len(unexpected)} unexpected" + (f", first {unexpected[0]!r}" if unexpected else "")
        )
        if mis_shaped:
            k = mis_shaped[0]
            parts.append(
                f"{len(mis_shaped)} of another shape, first {k!r}: "
                f"{tuple(state[k].shape)} in the checkpoint vs {tuple(expected[k].shape)} in the model"
            )
        raise CheckpointError(
            f"checkpoint {report.source} ({report.format} format) does not fit {describe}: "
            + "; ".join(parts)
        )
    model.load_state_dict(state, strict=False)
    if report.reinitialized and reinit is not None:
        reinit()
    return report


def save_state_dict(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s state dict (plain tensors only) atomically: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
