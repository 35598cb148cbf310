"""MobileNetV3-Large and -Small, written from the paper's Tables 1 and 2.

Howard et al., "Searching for MobileNetV3", ICCV 2019. Each ``Bneck`` row below is one "bneck"
row of the paper's table with the same columns (kernel, exp size, #out, SE, NL, s), so the
tables can be checked against the paper line by line. Everything else (width multiplier, the
minimalistic variant, the reduced tail, dilation) is derived from these rows, never re-typed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mnv3.models.layers import BN_EPS_V3, BN_MOMENTUM_V3, ActivationName, make_divisible
from mnv3.models.mobilenet import ArchSpec, BlockSpec

WidthRounding = Literal["paper", "torchvision"]
ReducedTailStyle = Literal["torchvision", "deeplab"]


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


@dataclass(frozen=True)
class V3Table:
    """A MobileNetV3-style network as data: its bneck rows plus the stem, last-conv and head widths.

    Large and Small are two such tables; a searched network is a third, built by the same
    :func:`mobilenet_v3_arch` (and :func:`mnv3.models.backbone.build_backbone`).
    """

    name: str
    rows: tuple[Bneck, ...]
    stem: int
    last: int
    head: int


MOBILENET_V3_LARGE = V3Table("mobilenet_v3_large", LARGE_TABLE, stem=16, last=960, head=1280)
MOBILENET_V3_SMALL = V3Table("mobilenet_v3_small", SMALL_TABLE, stem=16, last=576, head=1024)
VARIANTS = {"large": MOBILENET_V3_LARGE, "small": MOBILENET_V3_SMALL}


def _scale(channels: float, width_mult: float) -> int:
    return make_divisible(channels * width_mult, 8)


def reduce_tail(
    table: V3Table, style: ReducedTailStyle = "torchvision"
) -> tuple[list[tuple[Bneck, int, int]], int, int]:
    """The paper's reduced tail (§6.2-6.4): the last stage's channels halved, at width 1.0.

    Returns (row, exp, out) per row, and the last-conv and head widths. ``style="torchvision"``
    (torchvision's and TF's detection ``reduced_tail``) keeps the expansion of the last stage's
    first block; ``"deeplab"`` (TF DeepLab's ``mobilenet_v3_*_seg``, Table 7's RF2 rows) halves
    it too (672 -> 336 in Large, 288 -> 144 in Small), which gives the paper's parameter counts.
    """
    if style not in ("torchvision", "deeplab"):
        raise ValueError(f"reduced_tail_style must be 'deeplab' or 'torchvision', got {style!r}")
    last_stage = max(i for i, row in enumerate(table.rows) if row.s == 2)
    rows = []
    for i, row in enumerate(table.rows):
        exp, out = row.exp, row.out
        if i >= last_stage:
            out //= 2
            if i > last_stage or style == "deeplab":
                exp //= 2
        rows.append((row, exp, out))
    return rows, table.last // 2, table.head // 2


def _blocks(
    rows: list[tuple[Bneck, int, int]],
    stem_1x: int,
    width_mult: float,
    width_rounding: WidthRounding,
    minimal: bool,
) -> tuple[list[BlockSpec], int, int]:
    """Concrete blocks of (row, exp, out) at ``width_mult``; also the last (1x, real) widths."""
    blocks: list[BlockSpec] = []
    in_1x, in_ch = stem_1x, _scale(stem_1x, width_mult)
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
                activation=_activation(row.nl, minimal),
            )
        )
        in_1x, in_ch = out_1x, out_ch
    return blocks, in_1x, in_ch


def _activation(nl: str, minimal: bool) -> ActivationName:
    return "relu" if minimal or nl == "RE" else "hswish"


def mobilenet_v3_arch(
    variant: Literal["large", "small"] | V3Table,
    width_mult: float = 1.0,
    minimal: bool = False,
    reduced_tail: bool = False,
    output_stride: int = 32,
    width_rounding: WidthRounding = "paper",
    reduced_tail_style: ReducedTailStyle = "torchvision",
) -> ArchSpec:
    """Turn Table 1 or 2 (``"large"`` / ``"small"``, or any :class:`V3Table`) into concrete widths.

    width_rounding="paper" follows the paper's (TensorFlow's) rule: each #out is scaled and
    rounded to a multiple of 8, an expansion width is the table's expansion *factor*
    (exp / input) times the already-rounded input width, and the 1280 / 1024 head keeps its
    width below 1.0. width_rounding="torchvision" scales every number of the table directly
    (head included); at 1.0 both give the same network.

    minimal: the paper's minimalistic models (§6.1 / TF release): no SE, ReLU everywhere,
    3x3 depthwise kernels. reduced_tail: §6.2-6.4, the last stage's channels are halved
    (:func:`reduce_tail`; ``reduced_tail_style`` picks torchvision's or TF DeepLab's).
    """
    table = VARIANTS.get(variant) if isinstance(variant, str) else variant
    if table is None:
        raise ValueError(f"variant must be 'large' or 'small', got {variant!r}")
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    if width_rounding not in ("paper", "torchvision"):
        raise ValueError(f"width_rounding must be 'paper' or 'torchvision', got {width_rounding!r}")
    if reduced_tail:
        rows, last_1x, head_1x = reduce_tail(table, reduced_tail_style)
    else:
        rows, last_1x, head_1x = [(r, r.exp, r.out) for r in table.rows], table.last, table.head
    blocks, in_1x, in_ch = _blocks(rows, table.stem, width_mult, width_rounding, minimal)
    if width_rounding == "paper":
        last_ch = make_divisible(in_ch * last_1x / in_1x, 8)
        head_ch = _scale(head_1x, max(1.0, width_mult))
    else:
        last_ch = _scale(last_1x, width_mult)
        head_ch = _scale(head_1x, width_mult)
    act = _activation("HS", minimal)
    return ArchSpec(
        name=table.name,
        stem_channels=_scale(table.stem, width_mult),
        stem_activation=act,
        blocks=tuple(blocks),
        last_channels=last_ch,
        last_activation=act,
        head_hidden_channels=head_ch,
        head_activation=act,
        bn_eps=BN_EPS_V3,
        bn_momentum=BN_MOMENTUM_V3,
        output_stride=output_stride,
    )
