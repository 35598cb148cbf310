"""The block search's space as data: MnasNet's factorized hierarchical space for MobileNetV3.

MnasNet (Tan et al., CVPR 2019, §4.1) factorizes a network into stages and searches each
stage's ops separately; MobileNetV3 (§4.1) searches its blocks this way. Here a stage is one
run of blocks at one resolution and one output width (a residual group of the paper's tables),
and the space says, per stage (``conf/search/space/*.yaml``):

- ``stride`` of its first block (fixed: the resolutions are the paper's);
- ``depths``: how many blocks; ``widths``: the output width (multiples of 8);
- ``se``: squeeze-excite on / off; ``nl``: ``RE`` (ReLU) / ``HS`` (h-swish), for the stage;
- ``kernels`` and ``expansions`` chosen *per block*: the depthwise kernel, and the expansion
  as a ratio of the block's input width (``make_divisible(in * ratio, 8)``; ratio 1 on a block
  whose input is its width skips the expand conv, as the first block of both papers does).

A network is a list of decisions (:meth:`SearchSpace.decisions` says how many options each
has), the form a controller samples; :meth:`SearchSpace.table` turns decisions into a
:class:`~mnv3.models.mobilenetv3.V3Table` that builds with the normal backbone code, and
:meth:`SearchSpace.decode` finds the decisions of a given table (how the tests show that
MobileNetV3-Large and -Small are points of their spaces).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mnv3.errors import ConfigError
from mnv3.models.layers import make_divisible
from mnv3.models.mobilenetv3 import Bneck, V3Table


@dataclass(frozen=True)
class Stage:
    """One stage's choices (see the module docstring)."""

    stride: int
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    kernels: tuple[int, ...]
    expansions: tuple[float, ...]
    se: tuple[bool, ...]
    nl: tuple[str, ...]

    @property
    def max_depth(self) -> int:
        return max(self.depths)


@dataclass(frozen=True)
class Decision:
    """One choice a controller makes: where it is (``stage``, ``block``), what (``kind``) and
    how many options it has."""

    stage: int
    block: int | None
    kind: str
    options: int


STAGE_KEYS = ("stride", "depths", "widths", "kernels", "expansions", "se", "nl")


def _choices(stage: Mapping[str, Any], key: str, where: str) -> tuple[Any, ...]:
    value = stage.get(key)
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}={value!r}; expected a non-empty list of choices")
    return tuple(value)


class SearchSpace:
    """A factorized space of MobileNetV3 block tables (stem, last and head widths fixed)."""

    def __init__(self, name: str, stem: int, last: int, head: int, stages: Sequence[Stage]):
        self.name = name
        self.stem, self.last, self.head = stem, last, head
        self.stages = tuple(stages)
        self._decisions = self._layout()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], where: str = "search.space") -> SearchSpace:
        """The space of a ``search.space`` config entry, each wrong value named in a sentence."""
        for key in ("name", "stem", "last", "head", "stages"):
            if key not in cfg:
                raise ConfigError(f"{where} has no {key}; expected name, stem, last, head, stages")
        stages = []
        for i, raw in enumerate(cfg["stages"]):
            at = f"{where}.stages[{i}]"
            unknown = sorted(set(raw) - set(STAGE_KEYS))
            if unknown:
                raise ConfigError(f"{at}.{unknown[0]} is unknown; expected {', '.join(STAGE_KEYS)}")
            if raw.get("stride") not in (1, 2):
                raise ConfigError(f"{at}.stride={raw.get('stride')!r}; expected 1 or 2")
            stage = Stage(
                stride=int(raw["stride"]),
                depths=_choices(raw, "depths", at),
                widths=_choices(raw, "widths", at),
                kernels=_choices(raw, "kernels", at),
                expansions=_choices(raw, "expansions", at),
                se=_choices(raw, "se", at),
                nl=_choices(raw, "nl", at),
            )
            bad = (
                [f"depths={d!r}" for d in stage.depths if not isinstance(d, int) or d < 1]
                + [
                    f"widths={w!r}"
                    for w in stage.widths
                    if not isinstance(w, int) or w % 8 or w < 8
                ]
                + [f"kernels={k!r}" for k in stage.kernels if k not in (3, 5, 7)]
                + [f"expansions={e!r}" for e in stage.expansions if not float(e) >= 1]
                + [f"se={s!r}" for s in stage.se if not isinstance(s, bool)]
                + [f"nl={n!r}" for n in stage.nl if n not in ("RE", "HS")]
            )
            if bad:
                raise ConfigError(
                    f"{at}: {bad[0]} is not a valid choice; expected depths >= 1, widths "
                    "multiples of 8, kernels 3/5/7, expansions >= 1, se true/false, nl RE/HS"
                )
            stages.append(stage)
        if not stages:
            raise ConfigError(f"{where}.stages is empty; expected at least one stage")
        return cls(str(cfg["name"]), int(cfg["stem"]), int(cfg["last"]), int(cfg["head"]), stages)

    def _layout(self) -> list[Decision]:
        out: list[Decision] = []
        for s, stage in enumerate(self.stages):
            out += [
                Decision(s, None, "depth", len(stage.depths)),
                Decision(s, None, "width", len(stage.widths)),
                Decision(s, None, "se", len(stage.se)),
                Decision(s, None, "nl", len(stage.nl)),
            ]
            for b in range(stage.max_depth):  # slots past the chosen depth are ignored
                out += [
                    Decision(s, b, "kernel", len(stage.kernels)),
                    Decision(s, b, "expansion", len(stage.expansions)),
                ]
        return out

    @property
    def decisions(self) -> list[Decision]:
        """Every choice a network makes, in the order controllers sample them."""
        return list(self._decisions)

    def size(self) -> int:
        """How many distinct decision vectors the space has (unused slots counted once)."""
        total = 1
        for stage in self.stages:
            per_block = len(stage.kernels) * len(stage.expansions)
            blocks = sum(per_block**d for d in stage.depths)
            total *= len(stage.widths) * len(stage.se) * len(stage.nl) * blocks
        return total

    def sample(self, rng: random.Random) -> list[int]:
        """A uniformly random decision vector."""
        return [rng.randrange(d.options) for d in self._decisions]

    def table(self, choices: Sequence[int], name: str = "searched") -> V3Table:
        """The block table ``choices`` pick; every one builds (widths rounded to 8)."""
        if len(choices) != len(self._decisions):
            raise ValueError(f"{len(choices)} choices; this space takes {len(self._decisions)}")
        picked: dict[tuple[int, int | None, str], int] = {
            (d.stage, d.block, d.kind): int(c)
            for d, c in zip(self._decisions, choices, strict=True)
        }
        rows: list[Bneck] = []
        width_in = self.stem
        for s, stage in enumerate(self.stages):
            depth = stage.depths[picked[(s, None, "depth")]]
            width = stage.widths[picked[(s, None, "width")]]
            se = stage.se[picked[(s, None, "se")]]
            nl = stage.nl[picked[(s, None, "nl")]]
            for b in range(depth):
                ratio = float(stage.expansions[picked[(s, b, "expansion")]])
                exp = width_in if ratio == 1 else max(8, make_divisible(width_in * ratio, 8))
                kernel = stage.kernels[picked[(s, b, "kernel")]]
                rows.append(Bneck(kernel, exp, width, se, nl, stage.stride if b == 0 else 1))  # type: ignore[arg-type]
                width_in = width
        return V3Table(name, tuple(rows), self.stem, self.last, self.head)

    def decode(self, table: V3Table) -> list[int] | None:
        """Decisions whose :meth:`table` has ``table``'s rows, or None if it is not in the space
        (unused block slots decode to their first option)."""
        choices: list[int] = []
        rows = list(table.rows)
        if (table.stem, table.last, table.head) != (self.stem, self.last, self.head):
            return None
        width_in, at = self.stem, 0
        for stage in self.stages:
            depth = next(
                (
                    d
                    for d in sorted(stage.depths, reverse=True)
                    if at + d <= len(rows)
                    and rows[at].s == stage.stride
                    and all(r.out == rows[at].out and r.s == 1 for r in rows[at + 1 : at + d])
                    and (
                        at + d == len(rows)
                        or rows[at + d].out != rows[at].out
                        or rows[at + d].s == 2
                    )
                ),
                None,
            )
            if depth is None:
                return None
            block_rows = rows[at : at + depth]
            first = block_rows[0]
            try:
                choices += [
                    stage.depths.index(depth),
                    stage.widths.index(first.out),
                    stage.se.index(first.se),
                    stage.nl.index(first.nl),
                ]
            except ValueError:
                return None
            if any((r.se, r.nl) != (first.se, first.nl) for r in block_rows):
                return None
            for b in range(stage.max_depth):
                if b >= depth:
                    choices += [0, 0]
                    continue
                row = block_rows[b]
                expansion = next(
                    (
                        i
                        for i, e in enumerate(stage.expansions)
                        if (width_in if float(e) == 1 else make_divisible(width_in * float(e), 8))
                        == row.exp
                    ),
                    None,
                )
                if row.kernel not in stage.kernels or expansion is None:
                    return None
                choices += [stage.kernels.index(row.kernel), expansion]
                width_in = row.out
            at += depth
        return choices if at == len(rows) else None
