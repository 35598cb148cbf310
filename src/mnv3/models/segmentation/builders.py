"""Builders of the paper's segmenters (§6.4): ``lraspp(...)`` and ``raspp(...)`` from plain values.

The backbone is built by :func:`mnv3.models.backbone.build_backbone` (dilated to
``output_stride``, with Table 7's reduced tail); :data:`BACKBONE_LIMITS` are the backbone-group
options these heads cannot use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from mnv3.models.backbone import build_backbone
from mnv3.models.mobilenet import MobileNet
from mnv3.models.mobilenetv3 import ReducedTailStyle
from mnv3.models.segmentation.checkpoints import load_segmentation_weights
from mnv3.models.segmentation.heads import (
    PAPER_POOL_CROP,
    PAPER_POOL_STRIDE,
    GatePool,
    LRASPPHead,
    RASPPHead,
)
from mnv3.models.segmentation.segmenter import DEFAULT_LOW_TAP, HIGH_TAP, Segmenter

SegmentationBackbone = Literal["mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v3"]
# ``mobilenet_v3``: any block table (``table``), e.g. a searched network.
BACKBONES: tuple[str, ...] = ("mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v3")
# Backbone-group options the segmenters cannot use, with the only value they support (the
# paper's segmentation models: full width, RGB, the standard blocks).
BACKBONE_LIMITS = {"minimal": False, "in_channels": 3, "width_mult": 1.0}
BACKBONE_LIMITS_WHY = " (the paper's segmentation models)"


def segmentation_backbone(
    backbone: str,
    reduced_tail: bool = True,
    output_stride: int = 16,
    reduced_tail_style: ReducedTailStyle = "deeplab",
    weights: str | None = None,
    bn_momentum: float | None = None,
    table: Mapping[str, Any] | None = None,
) -> MobileNet:
    """The MobileNetV3 a segmentation head reads: dilated to ``output_stride``, no classifier.

    ``backbone="mobilenet_v3"`` builds the block ``table`` (:mod:`mnv3.models.block_table`).

    ``reduced_tail_style="deeplab"`` is TF DeepLab's ``mobilenet_v3_{large,small}_seg``, what
    Table 7's RF2 rows measured (:func:`mnv3.models.mobilenetv3.reduce_tail`); with it the
    parameter counts of rows 6, 7, 8 and 11 come out as the paper's. ``weights``: ImageNet
    weights for the backbone (a classifier checkpoint; its classifier is dropped).
    """
    if backbone not in BACKBONES:
        raise ValueError(
            f"segmentation backbone {backbone!r} is not supported; expected one of "
            f"{', '.join(BACKBONES)}"
        )
    return build_backbone(
        backbone,
        reduced_tail=reduced_tail,
        reduced_tail_style=reduced_tail_style,
        output_stride=output_stride,
        weights=weights,
        bn_momentum=bn_momentum,
        **({"table": table} if table is not None else {}),
    )


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
    table: Mapping[str, Any] | None = None,
) -> Segmenter:
    """LR-ASPP segmenter (paper Figure 10); defaults are Table 7 row 8 (Large, RF2, F128, OS16).

    Args:
        backbone: ``"mobilenet_v3_large"`` or ``"mobilenet_v3_small"`` (row 11).
        num_classes: logits per pixel (19 for Cityscapes' train classes).
        pool: the gate's pooling, ``"paper"`` (49x49 / stride (16, 20), clamped to the map) or
            ``"global"`` (torchvision's); see :mod:`mnv3.models.segmentation.heads`.
        inter_channels: F, 128 (row 8) or 256 (row 7).
        reduced_tail: halve the last stage's channels (Table 7's RF2 column).
        output_stride: 16 (Table 7, Table 8's OS16) or 32 (Table 8's OS32); 8 also works.
        low_tap: backbone tap feeding the 1/8 skip: ``"C3_first"`` (torchvision's) or
            ``"C3_depthwise"`` (TF DeepLab's).
        weights: a segmentation checkpoint: file, URL, or a name of
            :data:`~mnv3.models.segmentation.checkpoints.KNOWN_SEGMENTATION_WEIGHTS`; loaded after ``backbone_weights``.
        backbone_weights: ImageNet weights for the backbone (a classifier checkpoint; its
            classifier is dropped). Reduced-tail backbones need reduced-tail weights.
        pool_crop_size: the crop the paper pool's kernel is sized for (769).
        pool_stride: the paper pool's stride on the feature map ((16, 20)).
        bn_momentum: the backbone's BN momentum; None keeps the paper's 0.01.
        reduced_tail_style: ``"deeplab"`` (the paper's RF2) or ``"torchvision"``; see
            :func:`segmentation_backbone`.
        table: the block table of ``backbone="mobilenet_v3"`` (a searched network).
    """
    net = segmentation_backbone(
        backbone,
        reduced_tail,
        output_stride,
        reduced_tail_style,
        backbone_weights,
        bn_momentum,
        table,
    )
    head = LRASPPHead(
        net.tap(low_tap).channels,
        net.tap(HIGH_TAP).channels,
        num_classes,
        inter_channels,
        pool=pool,
        output_stride=output_stride,
        pool_crop_size=_pair(pool_crop_size, "pool_crop_size"),
        pool_stride=_pair(pool_stride, "pool_stride"),
    )
    config = _config(backbone, num_classes, inter_channels, reduced_tail, reduced_tail_style, table)
    config.update(output_stride=output_stride, pool=pool, low_tap=low_tap)
    return _segmenter("lraspp", net, head, low_tap, config, weights)


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
    table: Mapping[str, Any] | None = None,
) -> Segmenter:
    """R-ASPP segmenter, the paper's comparison head; defaults are Table 7 row 6 (RF2, F256).

    Arguments as :func:`lraspp`; R-ASPP has no 1/8 skip and no gate pooling choice (its image
    pooling is global, as DeepLab's). ``dropout`` follows DeepLab's concat projection (0.1).
    """
    net = segmentation_backbone(
        backbone,
        reduced_tail,
        output_stride,
        reduced_tail_style,
        backbone_weights,
        bn_momentum,
        table,
    )
    head = RASPPHead(net.tap(HIGH_TAP).channels, num_classes, inter_channels, dropout)
    config = _config(backbone, num_classes, inter_channels, reduced_tail, reduced_tail_style, table)
    config.update(output_stride=output_stride)
    return _segmenter("raspp", net, head, None, config, weights)


def _config(
    backbone: str,
    num_classes: int,
    inter_channels: int,
    reduced_tail: bool,
    reduced_tail_style: str,
    table: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The builder arguments both segmenters share, as plain values (for errors and hparams)."""
    config = {
        "backbone": backbone,
        "num_classes": num_classes,
        "inter_channels": inter_channels,
        "reduced_tail": reduced_tail,
        "reduced_tail_style": reduced_tail_style,
    }
    if table is not None:
        config["table"] = dict(table)
    return config


def _segmenter(
    head_name: str,
    net: MobileNet,
    head: LRASPPHead | RASPPHead,
    low_tap: str | None,
    config: dict[str, Any],
    weights: str | os.PathLike[str] | None,
) -> Segmenter:
    """Join backbone and head; load the whole segmenter's ``weights`` when given."""
    name = f"{head_name}_{config['backbone']}"
    model = Segmenter(net, head, low_tap, name=name, config={"head": head_name, **config})
    if weights is not None:
        load_segmentation_weights(model, weights)
    return model
