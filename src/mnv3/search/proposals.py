"""NetAdapt's proposals on a block table, and the weights a proposal inherits from its parent.

NetAdapt (Yang et al., ECCV 2018, Algorithm 1) shrinks one part of the network per proposal;
MobileNetV3 §4.2 uses two kinds:

- ``expansion``: the expansion width of one block (its 1x1 expand conv, depthwise conv, SE and
  the input of its projection), in a block that has an expand conv;
- ``group``: the output width shared by all blocks of one residual group, i.e. the blocks tied
  together by identity shortcuts (and the stem, when the first block adds its input to its
  output), so every shortcut still adds tensors of equal width.

Every width is a multiple of 8 and at least 8, and SE widths follow their expansion
(``make_divisible(exp / 4, 8)``, as the table builder computes them). A proposal never changes
the network's structure: which blocks have an expand conv and which have a shortcut stay as
they were (a width that would add or remove one is skipped).

A child inherits the strongest filters of its parent (§4.2 / NetAdapt §3.2: largest weight
norm), measured on the BN-folded weights (``|W_c| * |gamma_c| / sqrt(var_c + eps)``), so a
filter that BN scales down counts as weak: for an expansion, the expand conv's filters; for a
group, the sum over the group's projections (and the stem) of their filters' folded norms.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from mnv3.models.layers import ConvBNAct
from mnv3.models.mobilenet import MobileNet
from mnv3.models.mobilenetv3 import V3Table

Kind = Literal["expansion", "group"]
WIDTH_STEP = 8  # every width a multiple of 8 (paper §4.2; TF's make_divisible)


@dataclass(frozen=True)
class Group:
    """Blocks whose outputs share one width through identity shortcuts (and the stem, if the
    first block's shortcut adds the stem's output)."""

    blocks: tuple[int, ...]
    with_stem: bool = False


@dataclass(frozen=True)
class Proposal:
    """One shrunk network: which part (``kind``, block or group ``index``), its new ``width``,
    the resulting ``table``, and the parent's width there."""

    kind: Kind
    index: int
    width: int
    parent_width: int
    table: V3Table = field(compare=False)

    @property
    def name(self) -> str:
        """``block3.exp 240->176`` / ``group2.out 40->32``: the proposal in a log line."""
        where = f"block{self.index}.exp" if self.kind == "expansion" else f"group{self.index}.out"
        return f"{where} {self.parent_width}->{self.width}"


def input_widths(table: V3Table) -> list[int]:
    """The input width of every block: the stem's, then each previous block's output."""
    return [table.stem, *(row.out for row in table.rows[:-1])]


def has_shortcut(table: V3Table, i: int) -> bool:
    """Block ``i`` adds its input to its output (stride 1 and equal widths)."""
    row = table.rows[i]
    return row.s == 1 and input_widths(table)[i] == row.out


def has_expand(table: V3Table, i: int) -> bool:
    """Block ``i`` has a 1x1 expand conv (its expansion differs from its input width)."""
    return table.rows[i].exp != input_widths(table)[i]


def residual_groups(table: V3Table) -> list[Group]:
    """The residual groups of ``table`` in order: a block without a shortcut starts a group,
    each block with one joins the group before it."""
    groups: list[list[int]] = []
    with_stem = False
    for i in range(len(table.rows)):
        if has_shortcut(table, i) and groups:
            groups[-1].append(i)
        elif has_shortcut(table, i):  # the first block adds the stem's output
            groups.append([i])
            with_stem = True
        else:
            groups.append([i])
    return [Group(tuple(g), with_stem and n == 0) for n, g in enumerate(groups)]


def structure(table: V3Table) -> tuple[tuple[bool, bool], ...]:
    """What a proposal must keep: per block, (has expand conv, has shortcut)."""
    return tuple((has_expand(table, i), has_shortcut(table, i)) for i in range(len(table.rows)))


def with_expansion(table: V3Table, block: int, width: int) -> V3Table:
    """``table`` with block ``block``'s expansion width set to ``width``."""
    rows = list(table.rows)
    rows[block] = replace(rows[block], exp=width)
    return replace(table, rows=tuple(rows))


def with_group_width(table: V3Table, group: Group, width: int) -> V3Table:
    """``table`` with every output of ``group`` (and the stem, if it is in it) set to
    ``width``; a block reading the group without an expand conv keeps its expansion equal to
    its input (the depthwise conv then runs on ``width`` channels)."""
    rows = list(table.rows)
    stem = width if group.with_stem else table.stem
    inputs = input_widths(table)
    for i in group.blocks:
        rows[i] = replace(rows[i], out=width)
    readers = [group.blocks[0]] if group.with_stem else []
    readers += [i + 1 for i in group.blocks if i + 1 < len(rows)]
    for i in readers:
        if rows[i].exp == inputs[i]:  # no expand conv: the depthwise reads the group directly
            rows[i] = replace(rows[i], exp=width)
    return replace(table, rows=tuple(rows), stem=stem)


def candidate_widths(current: int) -> Iterator[int]:
    """Narrower widths to try, widest first: multiples of 8 below ``current``, down to 8."""
    top = (current - 1) // WIDTH_STEP * WIDTH_STEP
    yield from range(top, WIDTH_STEP - 1, -WIDTH_STEP)


def proposals_of(table: V3Table, kind: Kind, index: int) -> Iterator[Proposal]:
    """Every structure-keeping shrink of one part, widest first (the caller keeps the widest
    one that saves enough latency)."""
    shape = structure(table)
    if kind == "expansion":
        if not has_expand(table, index):
            return
        current = table.rows[index].exp
        for width in candidate_widths(current):
            child = with_expansion(table, index, width)
            if structure(child) == shape:
                yield Proposal(kind, index, width, current, child)
    else:
        group = residual_groups(table)[index]
        current = table.rows[group.blocks[0]].out
        for width in candidate_widths(current):
            child = with_group_width(table, group, width)
            if structure(child) == shape:
                yield Proposal(kind, index, width, current, child)


def parts(table: V3Table) -> list[tuple[Kind, int]]:
    """Every part a proposal may shrink: each block with an expand conv, each residual group."""
    expansions: list[tuple[Kind, int]] = [
        ("expansion", i) for i in range(len(table.rows)) if has_expand(table, i)
    ]
    groups: list[tuple[Kind, int]] = [("group", g) for g in range(len(residual_groups(table)))]
    return expansions + groups


# -- weights ---------------------------------------------------------------------------------


def _folded_norms(layer: ConvBNAct) -> torch.Tensor:
    """Per-output-channel norm of a conv's weights with its BN's scale folded in."""
    weight = layer.conv.weight.detach().flatten(1)
    bn = layer.bn
    scale = bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)
    return torch.linalg.vector_norm(weight, dim=1) * scale


def strongest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` largest ``scores``, in their original order."""
    return torch.topk(scores, keep).indices.sort().values


@dataclass
class Channels:
    """Which parent channels each tensor of a child keeps (None: all)."""

    stem: torch.Tensor | None = None
    exp: dict[int, torch.Tensor] = field(default_factory=dict)
    out: dict[int, torch.Tensor] = field(default_factory=dict)


def kept_channels(parent: MobileNet, proposal: Proposal) -> Channels:
    """The parent channels ``proposal``'s child keeps: the strongest by folded weight norm."""
    kept = Channels()
    if proposal.kind == "expansion":
        block = parent.blocks[proposal.index]
        kept.exp[proposal.index] = strongest(_folded_norms(block.expand), proposal.width)
        return kept
    group = residual_groups(_table_of(parent))[proposal.index]
    scores = sum(_folded_norms(parent.blocks[i].project) for i in group.blocks)
    if group.with_stem:
        scores = scores + _folded_norms(parent.stem)
    index = strongest(scores, proposal.width)
    for i in group.blocks:
        kept.out[i] = index
    if group.with_stem:
        kept.stem = index
    inputs = input_widths(proposal.table)
    readers = [group.blocks[0]] if group.with_stem else []
    readers += [i + 1 for i in group.blocks if i + 1 < len(proposal.table.rows)]
    for i in readers:
        if proposal.table.rows[i].exp == inputs[i]:  # no expand conv: the depthwise follows
            kept.exp[i] = index
    return kept


def _table_of(network: MobileNet) -> V3Table:
    from mnv3.models.block_table import table_from_arch

    return table_from_arch(network.arch)


def _take(tensor: torch.Tensor, dim: int, index: torch.Tensor | None) -> torch.Tensor:
    return tensor if index is None else tensor.index_select(dim, index)


def _copy_conv_bn(
    src: ConvBNAct, dst: ConvBNAct, out: torch.Tensor | None, inp: torch.Tensor | None
) -> None:
    """Copy a conv (+BN) keeping output channels ``out`` and input channels ``inp``."""
    weight = _take(src.conv.weight.detach(), 0, out)
    if src.conv.groups == 1:
        weight = _take(weight, 1, inp)
    dst.conv.weight.data.copy_(weight)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst.bn, name).data.copy_(_take(getattr(src.bn, name).detach(), 0, out))
    dst.bn.num_batches_tracked.data.copy_(src.bn.num_batches_tracked)


def _copy_se(src: nn.Module, dst: nn.Module, exp: torch.Tensor | None) -> None:
    """Copy an SE block keeping expansion channels ``exp``; the squeeze keeps its strongest
    channels (reduce-filter norms over the kept inputs) when it narrows."""
    reduce_w = _take(src.reduce.weight.detach(), 1, exp)
    squeeze = dst.reduce.out_channels
    sq = None
    if squeeze != src.reduce.out_channels:
        sq = strongest(torch.linalg.vector_norm(reduce_w.flatten(1), dim=1), squeeze)
    dst.reduce.weight.data.copy_(_take(reduce_w, 0, sq))
    dst.reduce.bias.data.copy_(_take(src.reduce.bias.detach(), 0, sq))
    dst.expand.weight.data.copy_(_take(_take(src.expand.weight.detach(), 0, exp), 1, sq))
    dst.expand.bias.data.copy_(_take(src.expand.bias.detach(), 0, exp))


def inherit(parent: MobileNet, child: MobileNet, kept: Channels) -> MobileNet:
    """Copy ``parent``'s weights into ``child``, keeping the channels ``kept`` names.

    With nothing dropped the child computes exactly what the parent does; the classifier
    (after the last conv, whose width never changes) is copied as it is.
    """
    _copy_conv_bn(parent.stem, child.stem, kept.stem, None)
    previous = kept.stem
    for i, (src, dst) in enumerate(zip(parent.blocks, child.blocks, strict=True)):
        exp = kept.exp.get(i, previous if src.expand is None else None)
        out = kept.out.get(i)
        if src.expand is not None:
            _copy_conv_bn(src.expand, dst.expand, exp, previous)
        _copy_conv_bn(src.depthwise, dst.depthwise, exp, None)
        if src.se is not None:
            _copy_se(src.se, dst.se, exp)
        _copy_conv_bn(src.project, dst.project, out, exp)
        previous = out
    _copy_conv_bn(parent.last_conv, child.last_conv, None, previous)
    if parent.classifier is not None and child.classifier is not None:
        child.classifier.load_state_dict(parent.classifier.state_dict())
    return child
