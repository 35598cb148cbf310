"""What every benchmark script shares: writing its table as markdown and CSV."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_results(out: Path, name: str, markdown: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``out/<name>.md`` (the printed table) and ``out/<name>.csv`` (one line per row)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    with (out / f"{name}.csv").open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
