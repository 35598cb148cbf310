"""Building a backbone: a name (or a block table) and the backbone group's options -> a MobileNet.

The one place where the plain values of a backbone (``name``, ``width_mult``, ``minimal``,
``reduced_tail``, ``output_stride``, ``width_rounding``, ``in_channels``, ``bn_momentum``,
``weights``: the ``backbone`` config group) become a network. Classifiers, detectors and
segmenters all build theirs here, in two steps that can be called alone:

1. :func:`backbone_arch`: a name of :data:`BACKBONES` (the papers' tables), a
   :class:`~mnv3.models.mobilenetv3.V3Table` (any other block table, e.g. a searched network's)
   or a finished :class:`~mnv3.models.mobilenet.ArchSpec` -> the concrete ArchSpec;
2. :func:`build_backbone`: the :class:`~mnv3.models.mobilenet.MobileNet` of it, with its BN
   settings, input channels, optional classifier and weights.

A head declares which backbone options it cannot use as data (``BACKBONE_LIMITS`` beside each
head) and checks them with :func:`check_backbone_limits`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any

from mnv3.models.block_table import BlockTableError, as_table
from mnv3.models.checkpoints import load_weights
from mnv3.models.mobilenet import ArchSpec, MobileNet
from mnv3.models.mobilenetv2 import mobilenet_v2_arch
from mnv3.models.mobilenetv3 import (
    MOBILENET_V3_LARGE,
    MOBILENET_V3_SMALL,
    V3Table,
    mobilenet_v3_arch,
)


def table_arch(table: V3Table | Mapping[str, Any] | None = None, **options: Any) -> ArchSpec:
    """The ArchSpec of any MobileNetV3 block table given as data (``backbone.table``; a
    searched network's: :mod:`mnv3.models.block_table`), with MobileNetV3's options."""
    if table is None:
        raise BlockTableError(
            "backbone.name=mobilenet_v3 has no backbone.table; expected a block table "
            "(a backbone file written by mnv3.models.block_table.save_backbone_file)"
        )
    return mobilenet_v3_arch(as_table(table), **options)


# Its options are mobilenet_v3_arch's (what backbone_options and the config checks read).
_V3_SIGNATURE = inspect.signature(mobilenet_v3_arch)
table_arch.__signature__ = _V3_SIGNATURE.replace(  # type: ignore[attr-defined]
    parameters=[
        inspect.Parameter("table", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        *list(_V3_SIGNATURE.parameters.values())[1:],
    ]
)

# The named tables: name -> the function that turns the table into widths (its options as kwargs).
# ``mobilenet_v3`` takes its table as the ``table`` option.
BACKBONES: dict[str, Callable[..., ArchSpec]] = {
    "mobilenet_v3_large": partial(mobilenet_v3_arch, MOBILENET_V3_LARGE),
    "mobilenet_v3_small": partial(mobilenet_v3_arch, MOBILENET_V3_SMALL),
    "mobilenet_v3": table_arch,
    "mobilenet_v2": mobilenet_v2_arch,
}
# The options that decide a backbone's tensor shapes (what a resumed checkpoint must share).
SHAPE_OPTIONS = (
    "width_mult",
    "minimal",
    "reduced_tail",
    "output_stride",
    "width_rounding",
    "in_channels",
    "table",
)
# Options of the built network rather than of its widths (see build_backbone).
BUILD_OPTIONS = ("num_classes", "dropout", "weights", "bn_momentum", "bn_eps", "in_channels")

BackboneSpec = str | V3Table | ArchSpec


def _arch_builder(backbone: BackboneSpec) -> Callable[..., ArchSpec]:
    if isinstance(backbone, V3Table):
        return partial(mobilenet_v3_arch, backbone)
    if isinstance(backbone, ArchSpec):
        return lambda output_stride=backbone.output_stride: replace(
            backbone, output_stride=output_stride
        )
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
    return BACKBONES[backbone]


def backbone_options(backbone: BackboneSpec) -> list[str]:
    """The options :func:`build_backbone` accepts for ``backbone`` (``name`` aside), sorted."""
    arch = inspect.signature(_arch_builder(backbone)).parameters
    return sorted({*arch, *BUILD_OPTIONS})


def backbone_arch(backbone: BackboneSpec, **options: Any) -> ArchSpec:
    """The concrete :class:`ArchSpec` of a named table, of a block table, or of a spec as it is.

    ``options``: the table's own (``width_mult``, ``minimal``, ``reduced_tail``,
    ``reduced_tail_style``, ``output_stride``, ``width_rounding`` for MobileNetV3; ``width_mult``,
    ``output_stride`` for MobileNetV2; ``output_stride`` for an ArchSpec).
    """
    return _arch_builder(backbone)(**options)


def build_backbone(
    name: BackboneSpec = "mobilenet_v3_large",
    *,
    num_classes: int = 0,
    dropout: float = 0.2,
    weights: str | os.PathLike[str] | None = None,
    bn_momentum: float | None = None,
    bn_eps: float | None = None,
    in_channels: int | None = None,
    **arch_options: Any,
) -> MobileNet:
    """A MobileNet from a name, a block table or an ArchSpec, and the backbone group's options.

    ``num_classes`` 0 (default) builds the feature extractor detection and segmentation heads
    read; > 0 adds the classifier (``dropout`` before its logits).

    ``bn_momentum`` None keeps the spec's (0.01 for V3: TF's decay 0.99, right for ImageNet-length
    runs). Runs of a few hundred steps need ~0.1, or the running statistics lag the weights and
    eval-mode accuracy collapses to chance. ``bn_eps`` None keeps the spec's (SSDLite uses 1e-3).

    ``in_channels`` None keeps the spec's (3). 1 builds a network for gray images; RGB-pretrained
    ``weights`` still load: the stem's kernels are summed over R, G, B
    (:func:`mnv3.models.checkpoints.load_weights`).

    ``weights``: None, a file path, a URL (fetched through torch.hub's cache), or the name of a
    known checkpoint (:data:`mnv3.models.checkpoints.KNOWN_WEIGHTS`). A checkpoint with another
    class count loads the backbone and re-initialises the logits layer; a backbone without
    classifier ignores the checkpoint's.
    """
    arch = backbone_arch(name, **arch_options)
    if bn_momentum is not None:
        arch = replace(arch, bn_momentum=float(bn_momentum))
    if bn_eps is not None:
        arch = replace(arch, bn_eps=float(bn_eps))
    if in_channels is not None:
        if in_channels < 1:
            raise ValueError(f"in_channels must be a positive channel count, got {in_channels}")
        arch = replace(arch, in_channels=int(in_channels))
    model = MobileNet(arch, num_classes=num_classes, dropout=dropout)
    if weights is not None:
        load_weights(model, weights)
    return model


def mobilenet_v3_large(*, num_classes: int = 1000, **options: Any) -> MobileNet:
    """MobileNetV3-Large (Table 1). ``num_classes=0`` builds the backbone without classifier.

    Options as :func:`build_backbone` and :func:`mnv3.models.mobilenetv3.mobilenet_v3_arch`
    (``width_mult``, ``minimal``, ``reduced_tail``, ``output_stride``, ``width_rounding``,
    ``dropout``, ``weights``, ``bn_momentum``, ``in_channels``).
    """
    return build_backbone("mobilenet_v3_large", num_classes=num_classes, **options)


def mobilenet_v3_small(*, num_classes: int = 1000, **options: Any) -> MobileNet:
    """MobileNetV3-Small (Table 2); options as :func:`mobilenet_v3_large`."""
    return build_backbone("mobilenet_v3_small", num_classes=num_classes, **options)


def mobilenet_v2(*, num_classes: int = 1000, **options: Any) -> MobileNet:
    """MobileNetV2 with the same tap API as MobileNetV3 (options: ``width_mult``,
    ``output_stride`` and those of :func:`build_backbone`)."""
    return build_backbone("mobilenet_v2", num_classes=num_classes, **options)


class UnsupportedBackbone(ValueError):
    """A backbone option set to a value the chosen head cannot use."""


def check_backbone_limits(
    head: str, limits: Mapping[str, Any], options: Mapping[str, Any], why: str = ""
) -> None:
    """Refuse, in one sentence, the first backbone option ``head`` cannot use.

    ``limits``: option -> the only value the head supports (None or absent options pass);
    ``why``: the reason, appended to the sentence.
    """
    for key, supported in limits.items():
        value = options.get(key, supported)
        if value not in (supported, None):
            raise UnsupportedBackbone(
                f"backbone.{key}={value!r} is not supported by head={head}; "
                f"expected {supported!r}{why}"
            )
