"""Collect finished runs from their log folders and compare them (used by notebooks/).

Every run of ``mnv3.train`` leaves ``config_resolved.yaml`` and ``csv/metrics.csv`` (the CSV logger
is always on), so runs can be compared offline without W&B; W&B dashboards show the same metrics.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Run:
    """One training run: its folder, config and metric history."""

    path: Path
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.config.get("run_name", self.path.name))

    def series(self, metric: str, x: str = "epoch") -> tuple[list[float], list[float]]:
        """(x, y) for every logged row that has ``metric``."""
        rows = [r for r in self.history if metric in r and x in r]
        return [r[x] for r in rows], [r[metric] for r in rows]

    def final(self, metric: str) -> float:
        """The last logged value of ``metric`` (NaN when the run never logged it)."""
        return self.summary.get(metric, math.nan)


def _read_metrics(path: Path) -> list[dict[str, float]]:
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, value in raw.items():
                if value not in ("", None):
                    try:
                        row[key] = float(value)
                    except ValueError:
                        continue
            rows.append(row)
    return rows


def _read_hparams(path: Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return {
        k: float(v)
        for k, v in data.items()
        if k.startswith("model/") and isinstance(v, int | float)
    }


def collect_runs(log_dir: str | Path) -> list[Run]:
    """Every run below ``log_dir`` that has a resolved config and a metrics CSV, oldest first."""
    runs = []
    for config_path in sorted(Path(log_dir).rglob("config_resolved.yaml")):
        folder = config_path.parent
        metrics_path = folder / "csv" / "metrics.csv"
        if not metrics_path.is_file():
            continue
        history = _read_metrics(metrics_path)
        summary: dict[str, float] = _read_hparams(folder / "csv" / "hparams.yaml")
        for row in history:
            summary.update(row)
        runs.append(Run(folder, yaml.safe_load(config_path.read_text()) or {}, history, summary))
    return runs


def runs_table(
    runs: Iterable[Run], metrics: Sequence[str] = ("val/acc1", "test/acc1")
) -> list[dict[str, Any]]:
    """One row per run: what it was (backbone, width, data) and its final metrics."""
    table = []
    for run in runs:
        backbone = run.config.get("backbone", {})
        row: dict[str, Any] = {
            "run": run.name,
            "backbone": backbone.get("name"),
            "width_mult": backbone.get("width_mult"),
            "data": run.config.get("data", {}).get("name"),
            "params": run.final("model/params"),
            "madds_M": run.final("model/madds") / 1e6,
        }
        for metric in metrics:
            row[metric] = run.final(metric)
        table.append(row)
    return table


def plot_runs(runs: Sequence[Run], metric: str = "val/acc1", path: str | Path | None = None) -> Any:
    """Learning curves of ``metric`` per run, and the final value against MAdds (paper Fig. 1 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, tradeoff) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        x, y = run.series(metric)
        curves.plot(x, y, marker="o", label=run.name)
        tradeoff.scatter(run.final("model/madds") / 1e6, run.final(metric), label=run.name)
    curves.set_xlabel("epoch")
    curves.set_ylabel(metric)
    curves.legend(fontsize=7)
    tradeoff.set_xlabel("MAdds (M)")
    tradeoff.set_ylabel(f"final {metric}")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
