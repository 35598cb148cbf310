"""MobileNetV3-Large and -Small, written from the paper's Tables 1 and 2.

Howard et al., "Searching for MobileNetV3", ICCV 2019. Each ``Bneck`` row below is one "bneck"
row of the paper's table with the same columns (kernel, exp size, #out, SE, NL, s), so the
tables can be checked against the paper line by line. Everything else (width multiplier, the
minimalistic variant, the reduced tail, dilation) is derived from these rows, never re-typed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mnv3.models.build import build_mobilenet
from mnv3.models.layers import BN_EPS_V3, BN_MOMENTUM_V3, make_divisible
from mnv3.models.mobilenet import ArchSpec, BlockSpec, MobileNet

WidthRounding = Literal["paper", "torchvision"]


@dataclass(frozen=True)
class Bneck:
    """One bneck row of Table 1/2: kernel, exp size, #out, SE, NL (RE / HS), stride."""

    kernel: int
    exp: int
    out: int
    se: bool
    nl: Literal["RE", "HS"]
    s: int


# Table 1: MobileNetV3-Large. Stem: conv2d 3x3, 16, HS, s2. Tail: conv2d 1x1 960 HS, pool,
# conv2d 1x1 NBN 1280 HS, conv2d 1x1 NBN k.
LARGE_TABLE = (
    #     k  exp  out   SE     NL  s
    Bneck(3, 16, 16, False, "RE", 1),
    Bneck(3, 64, 24, False, "RE", 2),
    Bneck(3, 72, 24, False, "RE", 1),
    Bneck(5, 72, 40, True, "RE", 2),
    Bneck(5, 120, 40, True, "RE", 1),
    Bneck(5, 120, 40, True, "RE", 1),
    Bneck(3, 240, 80, False, "HS", 2),
    Bneck(3, 200, 80, False, "HS", 1),
    Bneck(3, 184, 80, False, "HS", 1),
    Bneck(3, 184, 80, False, "HS", 1),
    Bneck(3, 480, 112, True, "HS", 1),
    Bneck(3, 672, 112, True, "HS", 1),
    Bneck(5, 672, 160, True, "HS", 2),
    Bneck(5, 960, 160, True, "HS", 1),
    Bneck(5, 960, 160, True, "HS", 1),
)
LARGE_STEM, LARGE_LAST, LARGE_HEAD = 16, 960, 1280

# Table 2: MobileNetV3-Small. Stem: conv2d 3x3, 16, HS, s2. Tail: conv2d 1x1 576 HS, pool,
# conv2d 1x1 NBN 1024 HS, conv2d 1x1 NBN k. Table 2 also ticks SE on the 576 conv: a known
# erratum; the released TF models and torchvision have no SE there, and neither do we.
SMALL_TABLE = (
    #     k  exp  out   SE     NL  s
    Bneck(3, 16, 16, True, "RE", 2),
    Bneck(3, 72, 24, False, "RE", 2),
    Bneck(3, 88, 24, False, "RE", 1),
    Bneck(5, 96, 40, True, "HS", 2),
    Bneck(5, 240, 40, True, "HS", 1),
    Bneck(5, 240, 40, True, "HS", 1),
    Bneck(5, 120, 48, True, "HS", 1),
    Bneck(5, 144, 48, True, "HS", 1),
    Bneck(5, 288, 96, True, "HS", 2),
    Bneck(5, 576, 96, True, "HS", 1),
    Bneck(5, 576, 96, True, "HS", 1),
)
SMALL_STEM, SMALL_LAST, SMALL_HEAD = 16, 576, 1024


def _scale(channels: float, width_mult: float) -> int:
    return make_divisible(channels * width_mult, 8)


def mobilenet_v3_arch(
    variant: Literal["large", "small"],
    width_mult: float = 1.0,
    minimal: bool = False,
    reduced_tail: bool = False,
    output_stride: int = 32,
    width_rounding: WidthRounding = "paper",
) -> ArchSpec:
    """Turn Table 1 or 2 into concrete widths.

    width_rounding="paper" follows the paper's (TensorFlow's) rule: each #out is scaled and
    rounded to a multiple of 8, an expansion width is the table's expansion *factor*
    (exp / input) times the already-rounded input width, and the 1280 / 1024 head keeps its
    width below 1.0. width_rounding="torchvision" scales every number of the table directly
    (head included); at 1.0 both give the same network.

    minimal: the paper's minimalistic models (§6.1 / TF release): no SE, ReLU everywhere,
    3x3 depthwise kernels. reduced_tail: §6.2-6.3, the last stage's channels are halved (as
    torchvision: the first block's expansion stays, the head halves too).
    """
    if variant not in ("large", "small"):
        raise ValueError(f"variant must be 'large' or 'small', got {variant!r}")
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    if width_rounding not in ("paper", "torchvision"):
        raise ValueError(f"width_rounding must be 'paper' or 'torchvision', got {width_rounding!r}")
    table, stem, last, head = (
        (LARGE_TABLE, LARGE_STEM, LARGE_LAST, LARGE_HEAD)
        if variant == "large"
        else (SMALL_TABLE, SMALL_STEM, SMALL_LAST, SMALL_HEAD)
    )
    divider = 2 if reduced_tail else 1
    last_stage = max(i for i, row in enumerate(table) if row.s == 2)

    # Widths at 1.0 after the optional tail reduction; expansion factors come from these.
    rows = []
    for i, row in enumerate(table):
        exp, out = row.exp, row.out
        if i >= last_stage:
            out //= divider
            if i > last_stage:
                exp //= divider
        rows.append((row, exp, out))
    last_1x = last // divider
    head_1x = head // divider

    def act(nl: str) -> str:
        return "relu" if minimal or nl == "RE" else "hswish"

    blocks: list[BlockSpec] = []
    in_1x, in_ch = stem, _scale(stem, width_mult)
    stem_ch = in_ch
    for row, exp_1x, out_1x in rows:
        out_ch = _scale(out_1x, width_mult)
        if width_rounding == "paper":
            exp_ch = make_divisible(in_ch * exp_1x / in_1x, 8)
        else:
            exp_ch = _scale(exp_1x, width_mult)
        blocks.append(
            BlockSpec(
                in_channels=in_ch,
                expanded_channels=exp_ch,
                out_channels=out_ch,
                kernel_size=3 if minimal else row.kernel,
                stride=row.s,
                use_se=row.se and not minimal,
                activation=act(row.nl),
            )
        )
        in_1x, in_ch = out_1x, out_ch

    if width_rounding == "paper":
        last_ch = make_divisible(in_ch * last_1x / in_1x, 8)
        head_ch = _scale(head_1x, max(1.0, width_mult))
    else:
        last_ch = _scale(last_1x, width_mult)
        head_ch = _scale(head_1x, width_mult)

    name = f"mobilenet_v3_{variant}"
    return ArchSpec(
        name=name,
        stem_channels=stem_ch,
        stem_activation=act("HS"),
        blocks=tuple(blocks),
        last_channels=last_ch,
        last_activation=act("HS"),
        head_hidden_channels=head_ch,
        head_activation=act("HS"),
        bn_eps=BN_EPS_V3,
        bn_momentum=BN_MOMENTUM_V3,
        output_stride=output_stride,
    )


def mobilenet_v3_large(
    *,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    minimal: bool = False,
    reduced_tail: bool = False,
    output_stride: int = 32,
    dropout: float = 0.2,
    weights: str | None = None,
    width_rounding: WidthRounding = "paper",
    bn_momentum: float | None = None,
    in_channels: int | None = None,
) -> MobileNet:
    """MobileNetV3-Large (Table 1). ``num_classes=0`` builds the backbone without classifier.

    ``weights``: None, a file path, a URL (fetched through torch.hub's cache), or the name of a
    known checkpoint (see ``mnv3.models.checkpoints.KNOWN_WEIGHTS``). A checkpoint with another
    class count loads the backbone and re-initialises the logits layer.

    ``bn_momentum``: None keeps the paper's 0.01; see :func:`mnv3.models.build.build_mobilenet`.

    ``in_channels``: None or 3 for RGB input; 1 for gray images (RGB weights are adapted by
    summing the stem's kernels, see :func:`mnv3.models.build.build_mobilenet`).
    """
    arch = mobilenet_v3_arch(
        "large", width_mult, minimal, reduced_tail, output_stride, width_rounding
    )
    return build_mobilenet(arch, num_classes, dropout, weights, bn_momentum, in_channels)


def mobilenet_v3_small(
    *,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    minimal: bool = False,
    reduced_tail: bool = False,
    output_stride: int = 32,
    dropout: float = 0.2,
    weights: str | None = None,
    width_rounding: WidthRounding = "paper",
    bn_momentum: float | None = None,
    in_channels: int | None = None,
) -> MobileNet:
    """MobileNetV3-Small (Table 2); arguments as :func:`mobilenet_v3_large`."""
    arch = mobilenet_v3_arch(
        "small", width_mult, minimal, reduced_tail, output_stride, width_rounding
    )
    return build_mobilenet(arch, num_classes, dropout, weights, bn_momentum, in_channels)
