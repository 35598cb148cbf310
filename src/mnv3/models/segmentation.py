"""MobileNetV3 semantic segmenters: LR-ASPP and R-ASPP on a dilated backbone (paper §6.4).

``lraspp(...)`` / ``raspp(...)`` build a :class:`Segmenter`: a ``backbone`` (a
:class:`~mnv3.models.mobilenet.MobileNet` without classifier, its last stage dilated to
``output_stride``) and a ``head`` (:mod:`mnv3.models.heads.lraspp`), fed with backbone taps chosen
by name. ``forward`` returns logits at the input size, (N, classes, H, W).

Checkpoints (``weights=``) load with ``weights_only=True`` through
:func:`mnv3.models.checkpoints.read_checkpoint`, in three formats told apart by their keys:
torchvision's ``lraspp_mobilenet_v3_large`` (``backbone.N...``, ``classifier.cbr...``), renamed by
a key map derived from the model; this project's (``backbone.stem...``, ``head...``); and this
project's Lightning checkpoints. A checkpoint with another class count keeps everything but the
two logits layers, which are re-initialised (the fine-tuning path, e.g. COCO-VOC -> Cityscapes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from mnv3.models.build import build_mobilenet
from mnv3.models.checkpoints import (
    CheckpointError,
    LoadReport,
    load_mapped_state_dict,
    read_checkpoint,
    rename_modules,
    torchvision_module_map,
    unwrap_state_dict,
)
from mnv3.models.heads.lraspp import (
    PAPER_POOL_CROP,
    PAPER_POOL_STRIDE,
    GatePool,
    LRASPPHead,
    RASPPHead,
)
from mnv3.models.layers import make_divisible
from mnv3.models.mobilenet import ArchSpec, MobileNet
from mnv3.models.mobilenetv3 import mobilenet_v3_arch

SegmentationBackbone = Literal["mobilenet_v3_large", "mobilenet_v3_small"]
BACKBONES = {"mobilenet_v3_large": "large", "mobilenet_v3_small": "small"}
ReducedTailStyle = Literal["deeplab", "torchvision"]

# The 1/8 skip: torchvision's (first stride-8 block's output) or TF DeepLab's (last stride-8
# block's depthwise output); see mnv3.models.mobilenet's tap list.
DEFAULT_LOW_TAP = "C3_first"
HIGH_TAP = "C5"


@dataclass(frozen=True)
class KnownSegmentationWeights:
    """A published segmentation checkpoint: where it lives, its builder arguments, its score."""

    name: str
    url: str
    build: Mapping[str, Any]
    num_params: int
    metrics: Mapping[str, float]
    resize_size: int


KNOWN_SEGMENTATION_WEIGHTS: dict[str, KnownSegmentationWeights] = {
    w.name: w
    for w in (
        # torchvision's LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1 (COCO val2017
        # restricted to the 20 VOC classes + background).
        KnownSegmentationWeights(
            "lraspp_mobilenet_v3_large.COCO_WITH_VOC_LABELS_V1",
            "https://download.pytorch.org/models/lraspp_mobilenet_v3_large-d234d4ea.pth",
            {
                "backbone": "mobilenet_v3_large",
                "num_classes": 21,
                "pool": "global",
                "reduced_tail": False,
                "output_stride": 16,
                "low_tap": "C3_first",
                "inter_channels": 128,
            },
            3_221_538,
            {"miou": 57.9, "pixel_acc": 91.2},
            520,
        ),
    )
}


class Segmenter(nn.Module):
    """A backbone and a segmentation head, joined by named taps; logits at the input size.

    ``backbone`` and ``head`` are separate submodules so a task can give them separate
    parameter groups (or freeze the backbone). ``config`` holds the builder's arguments as plain
    values (what hyper-parameters and error messages show).
    """

    def __init__(
        self,
        backbone: MobileNet,
        head: LRASPPHead | RASPPHead,
        low_tap: str | None,
        high_tap: str = HIGH_TAP,
        name: str = "segmenter",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.low_tap = low_tap
        self.high_tap = high_tap
        self.name = name
        self.config = dict(config or {})
        self.num_classes = int(
            head.low_classifier.out_channels
            if isinstance(head, LRASPPHead)
            else head.classifier.out_channels
        )
        self._taps = [high_tap] + ([low_tap] if low_tap is not None else [])

    @property
    def arch(self) -> Any:
        """The backbone's :class:`~mnv3.models.mobilenet.ArchSpec` (input channels, name)."""
        return self.backbone.arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.backbone.forward_taps(x, self._taps)
        low = taps[self.low_tap] if self.low_tap is not None else None
        logits = self.head(taps[self.high_tap], low)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def logits_layers(self) -> list[nn.Conv2d]:
        """The layers whose width is the class count (re-initialised for a new class count)."""
        if isinstance(self.head, LRASPPHead):
            return [self.head.low_classifier, self.head.high_classifier]
        return [self.head.classifier]


def segmentation_backbone_arch(
    backbone: str,
    reduced_tail: bool = True,
    output_stride: int = 16,
    reduced_tail_style: ReducedTailStyle = "deeplab",
) -> ArchSpec:
    """The backbone's spec: dilated to ``output_stride``, with the chosen reduced tail.

    ``reduced_tail_style="deeplab"`` is TF DeepLab's ``mobilenet_v3_{large,small}_seg``, what
    Table 7's RF2 rows measured: the last stage's outputs *and* the expansion of its first block
    are halved (672 -> 336 in Large, 288 -> 144 in Small); with it the parameter counts of rows
    6, 7, 8 and 11 come out as the paper's. ``"torchvision"`` keeps that expansion
    (torchvision's and TF's detection ``reduced_tail``: :func:`mobilenet_v3_arch`).
    """
    if backbone not in BACKBONES:
        raise ValueError(
            f"segmentation backbone {backbone!r} is not supported; expected one of "
            f"{', '.join(BACKBONES)}"
        )
    if reduced_tail_style not in ("deeplab", "torchvision"):
        raise ValueError(
            f"reduced_tail_style must be 'deeplab' or 'torchvision', got {reduced_tail_style!r}"
        )
    arch = mobilenet_v3_arch(
        BACKBONES[backbone], reduced_tail=reduced_tail, output_stride=output_stride
    )
    if reduced_tail and reduced_tail_style == "deeplab":
        first = max(i for i, b in enumerate(arch.blocks) if b.stride == 2)
        blocks = list(arch.blocks)
        block = blocks[first]
        blocks[first] = replace(
            block, expanded_channels=make_divisible(block.expanded_channels / 2, 8)
        )
        arch = replace(arch, blocks=tuple(blocks))
    return arch


def _backbone(
    backbone: str,
    reduced_tail: bool,
    output_stride: int,
    reduced_tail_style: ReducedTailStyle,
    backbone_weights: str | None,
    bn_momentum: float | None,
) -> MobileNet:
    arch = segmentation_backbone_arch(backbone, reduced_tail, output_stride, reduced_tail_style)
    return build_mobilenet(arch, num_classes=0, weights=backbone_weights, bn_momentum=bn_momentum)


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"LR-ASPP {what} must be a positive int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def lraspp(
    backbone: SegmentationBackbone = "mobilenet_v3_large",
    num_classes: int = 19,
    pool: GatePool = "paper",
    inter_channels: int = 128,
    reduced_tail: bool = True,
    output_stride: int = 16,
    low_tap: str = DEFAULT_LOW_TAP,
    weights: str | os.PathLike[str] | None = None,
    backbone_weights: str | None = None,
    pool_crop_size: int | Sequence[int] = PAPER_POOL_CROP,
    pool_stride: int | Sequence[int] = PAPER_POOL_STRIDE,
    bn_momentum: float | None = None,
    reduced_tail_style: ReducedTailStyle = "deeplab",
) -> Segmenter:
    """LR-ASPP segmenter (paper Figure 10); defaults are Table 7 row 8 (Large, RF2, F128, OS16).

    Args:
        backbone: ``"mobilenet_v3_large"`` or ``"mobilenet_v3_small"`` (row 11).
        num_classes: logits per pixel (19 for Cityscapes' train classes).
        pool: the gate's pooling, ``"paper"`` (49x49 / stride (16, 20), clamped to the map) or
            ``"global"`` (torchvision's); see :mod:`mnv3.models.heads.lraspp`.
        inter_channels: F, 128 (row 8) or 256 (row 7).
        reduced_tail: halve the last stage's channels (Table 7's RF2 column).
        output_stride: 16 (Table 7, Table 8's OS16) or 32 (Table 8's OS32); 8 also works.
        low_tap: backbone tap feeding the 1/8 skip: ``"C3_first"`` (torchvision's) or
            ``"C3_depthwise"`` (TF DeepLab's).
        weights: a segmentation checkpoint: file, URL, or a name of
            :data:`KNOWN_SEGMENTATION_WEIGHTS`; loaded after ``backbone_weights``.
        backbone_weights: ImageNet weights for the backbone (a classifier checkpoint; its
            classifier is dropped). Reduced-tail backbones need reduced-tail weights.
        pool_crop_size: the crop the paper pool's kernel is sized for (769).
        pool_stride: the paper pool's stride on the feature map ((16, 20)).
        bn_momentum: the backbone's BN momentum; None keeps the paper's 0.01.
        reduced_tail_style: ``"deeplab"`` (the paper's RF2) or ``"torchvision"``; see
            :func:`segmentation_backbone_arch`.
    """
    net = _backbone(
        backbone, reduced_tail, output_stride, reduced_tail_style, backbone_weights, bn_momentum
    )
    low = net.tap(low_tap)
    head = LRASPPHead(
        low.channels,
        net.tap(HIGH_TAP).channels,
        num_classes,
        inter_channels,
        pool=pool,
        output_stride=output_stride,
        pool_crop_size=_pair(pool_crop_size, "pool_crop_size"),
        pool_stride=_pair(pool_stride, "pool_stride"),
    )
    config = {
        "head": "lraspp",
        "backbone": backbone,
        "num_classes": num_classes,
        "pool": pool,
        "inter_channels": inter_channels,
        "reduced_tail": reduced_tail,
        "reduced_tail_style": reduced_tail_style,
        "output_stride": output_stride,
        "low_tap": low_tap,
    }
    model = Segmenter(net, head, low_tap, name=f"lraspp_{backbone}", config=config)
    if weights is not None:
        load_segmentation_weights(model, weights)
    return model


def raspp(
    backbone: SegmentationBackbone = "mobilenet_v3_large",
    num_classes: int = 19,
    inter_channels: int = 256,
    reduced_tail: bool = True,
    output_stride: int = 16,
    weights: str | os.PathLike[str] | None = None,
    backbone_weights: str | None = None,
    dropout: float = 0.1,
    bn_momentum: float | None = None,
    reduced_tail_style: ReducedTailStyle = "deeplab",
) -> Segmenter:
    """R-ASPP segmenter, the paper's comparison head; defaults are Table 7 row 6 (RF2, F256).

    Arguments as :func:`lraspp`; R-ASPP has no 1/8 skip and no gate pooling choice (its image
    pooling is global, as DeepLab's). ``dropout`` follows DeepLab's concat projection (0.1).
    """
    net = _backbone(
        backbone, reduced_tail, output_stride, reduced_tail_style, backbone_weights, bn_momentum
    )
    head = RASPPHead(net.tap(HIGH_TAP).channels, num_classes, inter_channels, dropout)
    config = {
        "head": "raspp",
        "backbone": backbone,
        "num_classes": num_classes,
        "inter_channels": inter_channels,
        "reduced_tail": reduced_tail,
        "reduced_tail_style": reduced_tail_style,
        "output_stride": output_stride,
    }
    model = Segmenter(net, head, None, name=f"raspp_{backbone}", config=config)
    if weights is not None:
        load_segmentation_weights(model, weights)
    return model


def torchvision_segmentation_map(model: Segmenter) -> dict[str, str]:
    """Map torchvision's ``LRASPP`` module names to ours, derived from the model.

    torchvision's backbone is its ``features`` list under ``backbone.`` (an
    ``IntermediateLayerGetter``), so the classifier's map renames it; its head is
    ``classifier.{cbr.0, cbr.1, scale.1, low_classifier, high_classifier}``.
    """
    if not isinstance(model.head, LRASPPHead):
        raise CheckpointError(f"torchvision has no {model.name} model; only LR-ASPP maps")
    names = {
        "backbone." + tv.removeprefix("features."): "backbone." + ours
        for tv, ours in torchvision_module_map(model.backbone).items()
        if tv.startswith("features.")
    }
    names.update(
        {
            "classifier.cbr.0": "head.conv.conv",
            "classifier.cbr.1": "head.conv.bn",
            "classifier.scale.1": "head.gate",
            "classifier.low_classifier": "head.low_classifier",
            "classifier.high_classifier": "head.high_classifier",
        }
    )
    return names


def is_torchvision_segmentation_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    """torchvision's LRASPP: ``backbone.0.0.weight`` (its stem) and ``classifier.*`` keys."""
    return "backbone.0.0.weight" in state and any(k.startswith("classifier.") for k in state)


def from_torchvision_segmentation(
    state: Mapping[str, torch.Tensor], model: Segmenter
) -> dict[str, torch.Tensor]:
    """Rename a torchvision LRASPP state dict to our names (unknown keys kept as they are)."""
    return rename_modules(state, torchvision_segmentation_map(model))


def _read(source: str, progress: bool) -> dict[str, torch.Tensor]:
    known = KNOWN_SEGMENTATION_WEIGHTS.get(source)
    if known is None:
        return read_checkpoint(source, progress=progress)
    try:
        obj = torch.hub.load_state_dict_from_url(
            known.url, map_location="cpu", progress=progress, check_hash=True, weights_only=True
        )
    except Exception as exc:  # network errors, hash mismatches, unpickling refusals
        raise CheckpointError(
            f"could not read checkpoint {source}: {type(exc).__name__}: {exc}".split("\n")[0]
        ) from exc
    return unwrap_state_dict(obj, source)


def _describe(model: Segmenter) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in model.config.items() if k != "head")
    return f"{model.config.get('head', model.name)}({args})"


def load_segmentation_weights(
    model: Segmenter, source: str | os.PathLike[str], progress: bool = True
) -> LoadReport:
    """Load a segmentation checkpoint into ``model`` in place; see the module docstring.

    Raises :class:`~mnv3.models.checkpoints.CheckpointError` (one sentence naming the source,
    the model's arguments and the first missing / unexpected / mis-shaped key) when the
    checkpoint is another architecture (another backbone, tail, F, or head).
    """
    source = str(source)
    state = _read(source, progress)
    fmt = "mnv3"
    if is_torchvision_segmentation_state_dict(state):
        state, fmt = from_torchvision_segmentation(state, model), "torchvision"
    report = LoadReport(source=source, format=fmt)
    expected = model.state_dict()

    logits_keys = {
        f"{prefix}.{param}"
        for prefix, module in model.named_modules()
        if any(module is layer for layer in model.logits_layers())
        for param in ("weight", "bias")
    }
    other_classes = [k for k in logits_keys if k in state and state[k].shape != expected[k].shape]
    if other_classes:  # another class count: keep the rest, re-initialise the logits layers
        report.ignored = sorted(logits_keys & set(state))
        report.reinitialized = sorted(logits_keys)
        state = {k: v for k, v in state.items() if k not in logits_keys}

    def reset_logits() -> None:
        for layer in model.logits_layers():
            layer.reset_parameters()

    return load_mapped_state_dict(model, state, report, _describe(model), reset_logits)
