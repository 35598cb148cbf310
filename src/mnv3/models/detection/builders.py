"""Building SSDLite from plain values: ``ssdlite320(...)`` (MobileNetV3 paper §6.3, Table 6).

The backbone comes from :func:`mnv3.models.backbone.build_backbone`; :data:`BACKBONE_LIMITS`
are the backbone-group options SSDLite cannot use. Kept apart from the model classes
(``ssdlite.py``) so that loading (``checkpoints.py``) imports the model and the builder imports
both, in one direction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from mnv3.models.backbone import build_backbone
from mnv3.models.detection.checkpoints import load_ssdlite_weights
from mnv3.models.detection.loss import LossName
from mnv3.models.detection.ssdlite import (
    BN_EPS,
    BN_MOMENTUM,
    EXTRA_CHANNELS,
    SSDLite,
    normal_init_,
)

DetectionBackbone = Literal[
    "mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v2", "mobilenet_v3"
]
# ``mobilenet_v3``: any block table (``table``), e.g. a searched network.
BACKBONES: tuple[str, ...] = (
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "mobilenet_v2",
    "mobilenet_v3",
)
# Backbone-group options SSDLite cannot use, with the only value it supports (§6.3's networks).
BACKBONE_LIMITS = {"minimal": False, "output_stride": 32, "in_channels": 3}


def use_reduced_tail(
    backbone: str, reduced_tail: bool | None, backbone_weights: str | None
) -> bool:
    """Whether the backbone's last stage is halved; see :func:`ssdlite320`'s ``reduced_tail``."""
    if backbone == "mobilenet_v3":  # a block table is the network as written (or searched)
        return bool(reduced_tail)
    if backbone == "mobilenet_v2":
        if reduced_tail:
            raise ValueError(
                "reduced_tail applies to MobileNetV3 only (the paper's dagger rows); "
                "pass reduced_tail=False or None for mobilenet_v2"
            )
        return False
    use = backbone_weights is None if reduced_tail is None else bool(reduced_tail)
    if use and backbone_weights is not None:
        raise ValueError(
            f"backbone_weights={backbone_weights!r} cannot go with reduced_tail=True: ImageNet "
            "checkpoints have the full last stage; pass reduced_tail=False (or None)"
        )
    return use


def ssdlite320(
    backbone: DetectionBackbone = "mobilenet_v3_large",
    num_classes: int = 91,
    reduced_tail: bool | None = None,
    weights: str | None = None,
    backbone_weights: str | None = None,
    width_mult: float = 1.0,
    loss: LossName = "softmax_hnm",
    bn_momentum: float = BN_MOMENTUM,
    table: Mapping[str, Any] | None = None,
    **kwargs: float | int,
) -> SSDLite:
    """SSDLite at 320x320 on MobileNetV3-Large / -Small or MobileNetV2 (paper Table 6).

    ``reduced_tail``: halve the channels of the last stage (the paper's dagger rows). None: on
    for MobileNetV3 trained from scratch, off with ``backbone_weights`` (ImageNet checkpoints
    have the full tail) and for MobileNetV2, torchvision's choice. ``reduced_tail=True`` with
    ``backbone_weights`` is refused: no ImageNet weights exist for the halved last stage, and a
    backbone half pretrained is not what either reference trains.

    ``weights``: a whole detector (a path, a URL, or ``ssdlite320_mobilenet_v3_large.COCO_V1``),
    loaded by :func:`mnv3.models.detection.checkpoints.load_ssdlite_weights`; another class
    count keeps everything but the class predictors' last convs. ``backbone_weights``: an
    ImageNet classifier checkpoint for the backbone only (its classifier is ignored).
    From scratch every conv is initialised normal(0, 0.03), TensorFlow's and torchvision's choice.

    ``width_mult`` scales the backbone and the extra blocks (``max(16, int(c * width_mult))``,
    TF's min_depth). ``bn_momentum`` 0.03 is torchvision's (TF decay 0.97); BN eps is 1e-3
    everywhere. ``backbone="mobilenet_v3"`` takes any block ``table``
    (:mod:`mnv3.models.block_table`, e.g. a NetAdapt result); its tail is halved only when
    ``reduced_tail=True`` (the table is the network as searched). Other keyword arguments go to :class:`SSDLite` (score_thresh, nms_thresh,
    detections_per_img, topk_candidates, iou_threshold, neg_to_pos_ratio, focal_alpha, ...).
    """
    if backbone not in BACKBONES:
        raise ValueError(
            f"unknown detection backbone {backbone!r}; expected one of {', '.join(BACKBONES)}"
        )
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    reduced = use_reduced_tail(backbone, reduced_tail, backbone_weights)
    net = build_backbone(
        backbone,
        width_mult=width_mult,
        **({"reduced_tail": True} if reduced else {}),  # MobileNetV2 has no such option
        **({"table": table} if table is not None else {}),
        bn_eps=BN_EPS,
        bn_momentum=bn_momentum,
        weights=backbone_weights,
    )
    extra = tuple(max(16, int(c * width_mult)) for c in EXTRA_CHANNELS)
    model = SSDLite(
        net,
        num_classes,
        extra,
        loss,
        bn_momentum=bn_momentum,
        **kwargs,  # type: ignore[arg-type]
    )
    if backbone_weights is None:
        normal_init_(model.backbone)
    if weights is not None:
        load_ssdlite_weights(model, weights)
    return model
