"""Compare finished runs the way the paper does: tables, the MnasNet reward, frontier plots.

Runs are read by :mod:`mnv3.run_records` (CSV and W&B) and timed by :mod:`mnv3.run_latency`; this
module is what notebooks/compare_runs.ipynb (learning curves) and notebooks/paper_figures.ipynb
(the paper's Figures 1 and 2 from your own runs, mAP / mIoU against latency, and the best run of
each experiment next to the paper's number with the MnasNet reward) import, so the reading and
timing functions they use are importable from here too.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mnv3.run_latency import run_latency
from mnv3.run_records import (
    TASK_MONITOR,
    Run,
    collect_runs,
    collect_wandb_api,
    read_wandb_offline,
    wandb_records,
)

__all__ = [
    "Run",
    "best_per_experiment",
    "collect_runs",
    "collect_wandb_api",
    "markdown_table",
    "paper_rows",
    "plot_frontier",
    "plot_points",
    "plot_runs",
    "read_wandb_offline",
    "reference_targets_ms",
    "reward",
    "run_latency",
    "runs_table",
    "wandb_records",
]

# Paper §4.1: the MnasNet reward's exponent; MobileNetV3-Small was re-searched with -0.15.
REWARD_EXPONENT = {"large": -0.07, "small": -0.15, "mobilenet_v2": -0.07}
# Default TAR (ms): eager Large 1.0 / Small 1.0 classifiers at 224x224, batch 1, 1 thread on this
# project's 2-vCPU machine (docs/benchmarks.md, "Models" benchmark table). bench/results/models.csv, when
# present, replaces them (:func:`reference_targets_ms`).
DEFAULT_TARGET_MS = {"large": 22.76, "small": 10.97, "mobilenet_v2": 22.76}
BENCH_TARGET_ROWS = {"large": "large-1.0", "small": "small-1.0", "mobilenet_v2": "large-1.0"}


# -- the MnasNet reward ---------------------------------------------------------------------------
def reward(acc: float, latency_ms: float, target_ms: float, w: float) -> float:
    """MnasNet's ACC(m) x (LAT(m) / TAR)^w (paper §4.1; w = -0.07 Large, -0.15 Small)."""
    if latency_ms <= 0 or target_ms <= 0:
        raise ValueError(f"latency {latency_ms} ms and target {target_ms} ms must be positive")
    return acc * (latency_ms / target_ms) ** w


def backbone_name(backbone: Mapping[str, Any]) -> str:
    """The backbone's name in a report: a block table's own name (``..._netadapt``), else the
    group's ``name``."""
    table = backbone.get("table")
    if isinstance(table, Mapping) and table.get("name"):
        return str(table["name"])
    return str(backbone.get("name", ""))


def backbone_family(backbone: Mapping[str, Any]) -> str:
    """``large``, ``small`` or ``mobilenet_v2``: which reward exponent and target apply; a
    block table is Large or Small only when its rows are the paper's, else its own name (a
    searched network is its own line in the plots)."""
    table = backbone.get("table")
    if isinstance(table, Mapping):
        from mnv3.models.block_table import table_from_plain
        from mnv3.models.mobilenetv3 import VARIANTS

        try:
            rows = table_from_plain(table).rows
        except ValueError:
            return backbone_name(backbone)
        paper = {v.rows: family for family, v in VARIANTS.items()}
        return paper.get(rows, backbone_name(backbone))
    name = str(backbone.get("name", ""))
    for family in ("large", "small"):
        if name.startswith(f"mobilenet_v3_{family}"):
            return family
    return "mobilenet_v2" if name.startswith("mobilenet_v2") else name


def family_label(backbone: Mapping[str, Any]) -> str:
    """One line per family in the frontier plots, as the paper's Figures 1-2 (minimal apart)."""
    family = backbone_family(backbone)
    label = {"large": "MobileNetV3-Large", "small": "MobileNetV3-Small"}.get(family, "MobileNetV2")
    if family not in ("large", "small", "mobilenet_v2"):
        label = family
    return f"{label} minimal" if backbone.get("minimal") else label


def reference_targets_ms(bench_csv: str | Path | None = None) -> tuple[dict[str, float], str]:
    """TAR per family and where it came from: ``bench_csv`` (bench_models' CSV) when it exists
    and has the Large 1.0 / Small 1.0 rows, else :data:`DEFAULT_TARGET_MS` (docs/benchmarks.md's)."""
    if bench_csv is not None and Path(bench_csv).is_file():
        with open(bench_csv, newline="") as f:
            rows = {r.get("key"): r for r in csv.DictReader(f)}
        try:
            targets = {
                fam: float(rows[key]["ours_1t_ms"]) for fam, key in BENCH_TARGET_ROWS.items()
            }
        except (KeyError, TypeError, ValueError):
            pass
        else:
            return targets, f"measured by bench/bench_models.py ({bench_csv})"
    return dict(DEFAULT_TARGET_MS), "docs/benchmarks.md's bench_models table (1 thread, 224x224)"


# -- tables --------------------------------------------------------------------------------------
def runs_table(
    runs: Iterable[Run], metrics: Sequence[str] = ("val/acc1", "test/acc1")
) -> list[dict[str, Any]]:
    """One row per run: what it was (backbone, width, data) and its final metrics."""
    table = []
    for run in runs:
        backbone = run.config.get("backbone", {})
        row: dict[str, Any] = {
            "run": run.name,
            "backbone": backbone_name(backbone),
            "width_mult": backbone.get("width_mult"),
            "data": run.config.get("data", {}).get("name"),
            "params": run.final("model/params"),
            "madds_M": run.final("model/madds") / 1e6,
        }
        for metric in metrics:
            row[metric] = run.final(metric)
        table.append(row)
    return table


def paper_value(run: Run) -> tuple[float, str]:
    """The paper's number for the run's monitored metric (its experiment's ``paper:`` block) and
    the table it comes from; NaN and "" when the experiment has none."""
    paper = run.config.get("paper") or {}
    value = paper.get(run.monitor.split("/")[-1])
    return (math.nan if value is None else float(value)), str(paper.get("table", ""))


def paper_rows(
    runs: Iterable[Run],
    latency: bool = True,
    targets_ms: Mapping[str, float] | None = None,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """One row per run: experiment, task, backbone, params, MAdds, best monitored metric,
    latency (measured once per run, cached) and the MnasNet reward against ``targets_ms``."""
    targets = dict(targets_ms or DEFAULT_TARGET_MS)
    rows = []
    for run in runs:
        backbone = run.config.get("backbone") or {}
        family = backbone_family(backbone)
        lat = run_latency(run, threads=threads) if latency else {"latency_ms": math.nan}
        best = run.best()
        paper, table = paper_value(run)
        target = targets.get(family, math.nan)
        w = REWARD_EXPONENT.get(family, REWARD_EXPONENT["large"])
        lat_ms = float(lat["latency_ms"])
        ok = not (math.isnan(best) or math.isnan(lat_ms) or math.isnan(target))
        rows.append(
            {
                "experiment": run.experiment,
                "run": run.name,
                "task": run.task,
                "backbone": backbone_name(backbone),
                "family": family_label(backbone),
                "width_mult": backbone.get("width_mult"),
                "metric": run.monitor,
                "best": best,
                "paper": paper,
                "paper_table": table,
                "params_M": run.final("model/params") / 1e6,
                "madds_M": run.final("model/madds") / 1e6,
                "latency_ms": lat_ms,
                "latency_source": lat.get("source", "not measured"),
                "reward": reward(best, lat_ms, target, w) if ok else math.nan,
                "path": str(run.path),
                "source": run.source,
            }
        )
    return rows


def best_per_experiment(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The row with the highest ``best`` metric of each experiment, in first-seen order."""
    chosen: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        current = chosen.get(row["experiment"])
        if math.isnan(row["best"]):
            chosen.setdefault(row["experiment"], row)
        elif current is None or math.isnan(current["best"]) or row["best"] > current["best"]:
            chosen[row["experiment"]] = row
    return [dict(r) for r in chosen.values()]


BEST_COLUMNS = (
    "experiment",
    "run",
    "metric",
    "best",
    "paper",
    "paper_table",
    "params_M",
    "madds_M",
    "latency_ms",
    "reward",
)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = BEST_COLUMNS) -> str:
    """``rows`` as a markdown table (floats to 4 significant digits, NaN as "-")."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.4g}"
        return "-" if value in (None, "") else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# -- figures -------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (x, lower is better) and metric (y)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot_frontier(
    rows: Sequence[Mapping[str, Any]],
    x: str = "latency_ms",
    task: str = "classification",
    path: str | Path | None = None,
) -> Any:
    """Best metric against ``x`` (latency_ms or madds_M), one line per backbone family through
    its Pareto-optimal runs and every run as a point (paper Figures 1 and 2)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    chosen = [r for r in rows if r["task"] == task and not math.isnan(r["best"])]
    chosen = [r for r in chosen if not math.isnan(r[x])]
    for family in sorted({r["family"] for r in chosen}):
        points = [(r[x], r["best"]) for r in chosen if r["family"] == family]
        (line,) = ax.plot(*zip(*pareto_front(points), strict=True), marker="o", label=family)
        ax.scatter(*zip(*points, strict=True), color=line.get_color(), alpha=0.4, s=14)
    metric = chosen[0]["metric"] if chosen else TASK_MONITOR.get(task, "")
    label = {"latency_ms": "latency (ms, batch 1, CPU)", "madds_M": "MAdds (M)"}.get(x, x)
    ax.set_xlabel(label)
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"{task}: {metric} vs {label.split(' (')[0]}" + ("" if chosen else " (no runs)"))
    ax.grid(alpha=0.3)
    if chosen:
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def plot_points(
    rows: Sequence[Mapping[str, Any]], task: str, path: str | Path | None = None
) -> Any:
    """Best metric against latency, one labelled point per run (mAP or mIoU vs latency)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    chosen = [r for r in rows if r["task"] == task]
    chosen = [r for r in chosen if not (math.isnan(r["best"]) or math.isnan(r["latency_ms"]))]
    for r in chosen:
        ax.scatter(r["latency_ms"], r["best"], s=24)
        ax.annotate(r["experiment"], (r["latency_ms"], r["best"]), fontsize=7)
    metric = chosen[0]["metric"] if chosen else TASK_MONITOR.get(task, "")
    ax.set_xlabel("latency (ms, batch 1, CPU)")
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"{task}: {metric} vs latency" + ("" if chosen else " (no runs)"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def plot_runs(runs: Sequence[Run], metric: str = "val/acc1", path: str | Path | None = None) -> Any:
    """Learning curves of ``metric`` per run, and the final value against MAdds (paper Fig. 1 style)."""
    plt = _pyplot()
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
