"""Block tables as plain data: a MobileNetV3-style network written down, read back and built.

A searched network (NetAdapt, the block search) is what the paper's Tables 1 and 2 are: bneck
rows (kernel, exp size, #out, SE, NL, stride) plus the stem, last-conv and head widths. Here that
table becomes plain Python types (what a config and a checkpoint's hyperparameters hold) and a
backbone group file:

.. code-block:: yaml

    name: mobilenet_v3          # the builder that takes a table
    table:
      name: small_netadapt_t20  # the network's own name
      stem: 16
      last: 576
      head: 1024
      rows:                     # kernel, exp, out, se, nl (RE / HS), stride
        - [3, 16, 16, true, RE, 2]
        - [3, 72, 24, false, RE, 2]

so ``backbone=<that file's name>`` trains it for any task that takes ``mobilenet_v3`` backbones,
and its checkpoint holds the table (the run's config), so it reloads without the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mnv3.models.mobilenet import ArchSpec
from mnv3.models.mobilenetv3 import Bneck, V3Table

ROW_COLUMNS = ("kernel", "exp", "out", "se", "nl", "s")
TABLE_KEYS = ("name", "stem", "last", "head", "rows")


class BlockTableError(ValueError):
    """A block table that cannot build a network; the message is one sentence naming where."""


def table_to_plain(table: V3Table) -> dict[str, Any]:
    """``table`` as plain types: ``{name, stem, last, head, rows: [[k, exp, out, se, nl, s]]}``."""
    return {
        "name": table.name,
        "stem": table.stem,
        "last": table.last,
        "head": table.head,
        "rows": [[r.kernel, r.exp, r.out, r.se, r.nl, r.s] for r in table.rows],
    }


def _width(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BlockTableError(f"{where}={value!r} is not a width; expected a positive integer")
    return value


def _row(row: Any, where: str) -> Bneck:
    if isinstance(row, Mapping):
        missing = [c for c in ROW_COLUMNS if c not in row]
        if missing:
            raise BlockTableError(f"{where} lacks {', '.join(missing)}; expected {ROW_COLUMNS}")
        row = [row[c] for c in ROW_COLUMNS]
    if not isinstance(row, Sequence) or isinstance(row, str) or len(row) != len(ROW_COLUMNS):
        raise BlockTableError(
            f"{where}={row!r} is not a bneck row; expected [kernel, exp, out, se, nl, stride]"
        )
    kernel, exp, out, se, nl, stride = row
    if kernel not in (3, 5, 7) or isinstance(kernel, bool):
        raise BlockTableError(f"{where}: kernel={kernel!r}; expected 3, 5 or 7")
    if not isinstance(se, bool):
        raise BlockTableError(f"{where}: se={se!r}; expected true or false")
    if nl not in ("RE", "HS"):
        raise BlockTableError(f"{where}: nl={nl!r}; expected RE (ReLU) or HS (h-swish)")
    if stride not in (1, 2) or isinstance(stride, bool):
        raise BlockTableError(f"{where}: stride={stride!r}; expected 1 or 2")
    return Bneck(kernel, _width(exp, f"{where}: exp"), _width(out, f"{where}: out"), se, nl, stride)


def table_from_plain(plain: Mapping[str, Any], where: str = "table") -> V3Table:
    """The :class:`V3Table` of a plain mapping (as :func:`table_to_plain` writes it), checked.

    ``where`` names the table in error sentences (``backbone.table``, a file path).
    """
    if not isinstance(plain, Mapping):
        raise BlockTableError(f"{where} is {plain!r}; expected a mapping with {TABLE_KEYS}")
    unknown = sorted(set(plain) - set(TABLE_KEYS))
    missing = [k for k in TABLE_KEYS if k not in plain]
    if unknown or missing:
        what = f"unknown {', '.join(unknown)}" if unknown else f"no {', '.join(missing)}"
        raise BlockTableError(f"{where} has {what}; expected the keys {', '.join(TABLE_KEYS)}")
    rows = plain["rows"]
    if not isinstance(rows, Sequence) or isinstance(rows, str) or not rows:
        raise BlockTableError(f"{where}.rows={rows!r}; expected a non-empty list of bneck rows")
    return V3Table(
        name=str(plain["name"]),
        rows=tuple(_row(r, f"{where}.rows[{i}]") for i, r in enumerate(rows)),
        stem=_width(plain["stem"], f"{where}.stem"),
        last=_width(plain["last"], f"{where}.last"),
        head=_width(plain["head"], f"{where}.head"),
    )


def table_from_arch(arch: ArchSpec) -> V3Table:
    """The block table of a built MobileNetV3 (any width multiplier, minimal, reduced tail):
    its concrete widths as rows, so a search can start from ``backbone=small`` or
    ``backbone=large_075`` as from a table file. Dilation (output stride) is not a table
    column and is left out; MobileNetV2 (ReLU6) has no table and is refused."""
    nl = {"relu": "RE", "hswish": "HS"}
    if any(b.activation not in nl for b in arch.blocks) or arch.head_hidden_channels is None:
        raise BlockTableError(
            f"{arch.name} is not a MobileNetV3-style network; expected ReLU / h-swish blocks "
            "and a hidden head layer (a MobileNetV3 backbone or block table)"
        )
    rows = tuple(
        Bneck(
            b.kernel_size, b.expanded_channels, b.out_channels, b.use_se, nl[b.activation], b.stride
        )
        for b in arch.blocks
    )
    return V3Table(
        arch.name, rows, arch.stem_channels, arch.last_channels, arch.head_hidden_channels
    )


def as_table(table: V3Table | Mapping[str, Any]) -> V3Table:
    """A :class:`V3Table` as it is, or one read from its plain form."""
    return table if isinstance(table, V3Table) else table_from_plain(table, "backbone.table")


def save_backbone_file(
    table: V3Table, path: str | os.PathLike[str], extends: str | None = None, **options: Any
) -> Path:
    """Write ``table`` as a backbone group file (``name: mobilenet_v3`` + ``table``) at ``path``.

    ``options``: other backbone keys to write beside it (``width_mult``, ``bn_momentum``, ...).
    Put the file in ``conf/backbone/`` (or ``<folder>/backbone/`` with ``folder`` on
    ``hydra.searchpath``) to select it with ``backbone=<file stem>``; ``extends`` (e.g.
    ``small_table``) then names the backbone option whose other keys it inherits (a Hydra
    defaults list), as a group option must have them all.
    """
    from omegaconf import OmegaConf

    from mnv3.deploy.common import atomic_output

    def flow(value: Any) -> str:  # YAML scalars as the paper's tables read: true, RE, 16
        return str(value).lower() if isinstance(value, bool) else str(value)

    rows = "\n".join(
        f"    - [{', '.join(flow(v) for v in (r.kernel, r.exp, r.out, r.se, r.nl, r.s))}]"
        for r in table.rows
    )
    inherit = f"defaults:\n  - {extends}\n  - _self_\n" if extends else ""
    text = (
        f"# MobileNetV3 block table {table.name} (mnv3.models.block_table)\n"
        f"{inherit}"
        "name: mobilenet_v3\n"
        "table:\n"
        f"  name: {table.name}\n"
        f"  stem: {table.stem}\n"
        f"  last: {table.last}\n"
        f"  head: {table.head}\n"
        "  rows:  # kernel, exp, out, se, nl (RE / HS), stride\n"
        f"{rows}\n"
    )
    if options:
        text += OmegaConf.to_yaml(OmegaConf.create(dict(options)))
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _read_backbone_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], V3Table]:
    """A backbone group file's plain contents and its checked table."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict) or "table" not in data:
        raise BlockTableError(f"{path} holds no 'table'; expected a backbone file with a table")
    return data, table_from_plain(data["table"], f"{path}: table")  # type: ignore[arg-type]


def load_backbone_file(path: str | os.PathLike[str]) -> V3Table:
    """The table of a backbone group file written by :func:`save_backbone_file`."""
    return _read_backbone_file(path)[1]


def _override_value(value: Any) -> str:
    """A plain value in Hydra's override grammar (flow lists and mappings, quoted strings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    text = str(value)
    return text if text.replace("_", "").isalnum() else "'" + text.replace("'", "\\'") + "'"


def backbone_file_overrides(argv: Sequence[str]) -> list[str]:
    """``backbone=<path/to/file.yaml>`` on a command line, as the overrides that select it.

    Hydra picks group options by name from its search path; a searched network's file lives in
    its run folder. The file's table and options become ``backbone=small_table`` (a table
    backbone) plus one ``++backbone.<key>=<value>`` per key, so the run's config (and its
    checkpoint) holds the table itself, not the path. Other arguments pass unchanged; a named
    choice (``backbone=small``) too.
    """
    out: list[str] = []
    for arg in argv:
        value = arg.partition("=")[2] if arg.startswith("backbone=") else ""
        if not value.endswith((".yaml", ".yml")):
            out.append(arg)
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise BlockTableError(f"backbone={value}: no such file; expected a backbone YAML file")
        data, _ = _read_backbone_file(path)
        out.append("backbone=small_table")
        out.extend(
            f"++backbone.{k}={_override_value(v)}" for k, v in data.items() if k != "defaults"
        )
    return out
