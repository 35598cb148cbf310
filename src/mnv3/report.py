"""Collect finished runs from their log folders and compare them the way the paper does.

Every run of ``mnv3.train`` leaves ``config_resolved.yaml`` and ``csv/metrics.csv`` (the CSV logger
is always on), so runs can be compared offline without W&B. Runs logged with ``logger=wandb`` also
leave ``wandb/offline-run-*`` folders; those are read too (their ``.wandb`` record file), which
covers a run whose CSV was lost or an offline run copied from another machine. The W&B public API
is read only on request (:func:`collect_wandb_api`).

Used by notebooks/compare_runs.ipynb (learning curves) and notebooks/paper_figures.ipynb (the
paper's Figures 1 and 2 from your own runs, mAP / mIoU against latency, and the best run of each
experiment next to the paper's number with the MnasNet reward).
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import struct
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Paper §4.1: the MnasNet reward's exponent; MobileNetV3-Small was re-searched with -0.15.
REWARD_EXPONENT = {"large": -0.07, "small": -0.15, "mobilenet_v2": -0.07}
# Default TAR (ms): eager Large 1.0 / Small 1.0 classifiers at 224x224, batch 1, 1 thread on this
# project's 2-vCPU machine (README, "Models" benchmark table). bench/results/models.csv, when
# present, replaces them (:func:`reference_targets_ms`).
DEFAULT_TARGET_MS = {"large": 22.76, "small": 10.97, "mobilenet_v2": 22.76}
BENCH_TARGET_ROWS = {"large": "large-1.0", "small": "small-1.0", "mobilenet_v2": "large-1.0"}
LATENCY_FILE = "latency.json"
WANDB_RUN_GLOB = "wandb/offline-run-*"
# What each task monitors for its best checkpoint (the tasks' ``monitor``); binary and multi-label
# classification switch to val/auroc, which only they log.
TASK_MONITOR = {"classification": "val/acc1", "detection": "val/map", "segmentation": "val/miou"}


@dataclass
class Run:
    """One training run: its folder, config and metric history (``source``: csv or wandb)."""

    path: Path
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    source: str = "csv"

    @property
    def name(self) -> str:
        return str(self.config.get("run_name", self.path.name))

    @property
    def task(self) -> str:
        """The head's task (classification, detection or segmentation)."""
        return str((self.config.get("head") or {}).get("task", "classification"))

    @property
    def experiment(self) -> str:
        """The ``experiment=`` the run was started with (Hydra's record), else its run name."""
        overrides = self.path / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            for item in yaml.safe_load(overrides.read_text()) or []:
                key, _, value = str(item).lstrip("+~").partition("=")
                if key == "experiment" and value:
                    return value
        return self.name

    @property
    def monitor(self) -> str:
        """The metric the run's best checkpoint was chosen by."""
        if self.task == "classification" and "val/auroc" in self.summary:
            return "val/auroc"
        return TASK_MONITOR.get(self.task, "val/acc1")

    def series(self, metric: str, x: str = "epoch") -> tuple[list[float], list[float]]:
        """(x, y) for every logged row that has ``metric``."""
        rows = [r for r in self.history if metric in r and x in r]
        return [r[x] for r in rows], [r[metric] for r in rows]

    def final(self, metric: str) -> float:
        """The last logged value of ``metric`` (NaN when the run never logged it)."""
        return self.summary.get(metric, math.nan)

    def best(self, metric: str | None = None) -> float:
        """The highest logged value of ``metric`` (default: the monitored one); NaN if never."""
        metric = metric or self.monitor
        values = [r[metric] for r in self.history if metric in r and not math.isnan(r[metric])]
        return max(values) if values else math.nan


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


def _folders(log_dirs: str | Path | Iterable[str | Path]) -> list[Path]:
    folders = [Path(log_dirs)] if isinstance(log_dirs, str | Path) else [Path(d) for d in log_dirs]
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(
                f"runs folder {folder} does not exist; expected a folder of mnv3.train runs "
                "(each with config_resolved.yaml and csv/metrics.csv)"
            )
    return folders


def collect_runs(log_dir: str | Path | Iterable[str | Path], wandb: bool = True) -> list[Run]:
    """Every run below ``log_dir`` (one folder or several), oldest first.

    A run folder with ``config_resolved.yaml`` and ``csv/metrics.csv`` is read from its CSV. With
    ``wandb``, a W&B offline run folder (``wandb/offline-run-*``) whose run has no CSV is read from
    its ``.wandb`` record file instead, so such runs are not silently missing.
    """
    runs: list[Run] = []
    seen: set[Path] = set()
    folders = _folders(log_dir)
    for root in folders:
        for config_path in sorted(root.rglob("config_resolved.yaml")):
            folder = config_path.parent
            metrics_path = folder / "csv" / "metrics.csv"
            if not metrics_path.is_file() or folder in seen:
                continue
            seen.add(folder)
            history = _read_metrics(metrics_path)
            summary: dict[str, float] = _read_hparams(folder / "csv" / "hparams.yaml")
            for row in history:
                summary.update(row)
            config = yaml.safe_load(config_path.read_text()) or {}
            runs.append(Run(folder, config, history, summary))
    if wandb:
        for root in folders:
            for offline in sorted(root.rglob("offline-run-*")):
                if not offline.is_dir() or _run_folder_of(offline) in seen:
                    continue
                records = sorted(offline.glob("*.wandb"))
                if records:
                    seen.add(_run_folder_of(offline))
                    runs.append(read_wandb_offline(records[0]))
    return runs


def _run_folder_of(offline: Path) -> Path:
    """``<run>/wandb/offline-run-*`` -> ``<run>`` (where checkpoints and latency.json live)."""
    return offline.parent.parent if offline.parent.name == "wandb" else offline


# -- W&B offline run files --------------------------------------------------------------------
# The .wandb file is a LevelDB-style log (wandb's datastore format): a 7-byte header (":W&B",
# magic 0xBEE1, version 0), then 32 KiB blocks of records, each with a 7-byte header (CRC-32 of
# type byte + data, length, type: 1 full, 2 first, 3 middle, 4 last); every record is a protobuf
# ``wandb_internal_pb2.Record``. wandb 0.31 ships the protobuf but no Python reader.
_WANDB_HEADER = struct.Struct("<4sHB")
_WANDB_RECORD = struct.Struct("<IHB")
_WANDB_BLOCK = 32768


def wandb_records(path: str | Path) -> list[bytes]:
    """The raw protobuf records of a W&B ``.wandb`` file, in order (CRC-checked)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < _WANDB_HEADER.size or _WANDB_HEADER.unpack_from(data)[:2] != (b":W&B", 0xBEE1):
        raise ValueError(f"{path} is not a W&B run file; expected the run-<id>.wandb of a W&B run")
    records, parts, pos = [], [], _WANDB_HEADER.size
    while pos + _WANDB_RECORD.size <= len(data):
        left = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if left < _WANDB_RECORD.size:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = _WANDB_RECORD.unpack_from(data, pos)
        if kind == 0:  # zero padding up to the next block, or the unwritten end of a live run
            pos += left
            continue
        body = data[pos + _WANDB_RECORD.size : pos + _WANDB_RECORD.size + length]
        if len(body) < length or zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            break  # a run still being written (or killed mid-record): keep what is complete
        pos += _WANDB_RECORD.size + length
        if kind == 1:
            records.append(body)
        elif kind == 2:
            parts = [body]
        elif kind == 3:
            parts.append(body)
        elif kind == 4:
            records.append(b"".join([*parts, body]))
            parts = []
    return records


def _item_key(item: Any) -> str | None:
    """The metric name of a W&B history / summary / config item; None for nested media fields."""
    if item.key:
        return str(item.key)
    return str(item.nested_key[0]) if len(item.nested_key) == 1 else None


def _numbers(items: Iterable[Any]) -> dict[str, float]:
    out = {}
    for item in items:
        key = _item_key(item)
        if key is None or key.startswith("_"):
            continue
        try:
            value = json.loads(item.value_json) if item.value_json else None
        except json.JSONDecodeError:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def read_wandb_offline(path: str | Path) -> Run:
    """A :class:`Run` from a W&B offline run: its config, numeric history and summary.

    ``path`` is the ``run-<id>.wandb`` file or the ``offline-run-*`` folder holding it.
    """
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.wandb"))
        if not found:
            raise FileNotFoundError(f"{path} holds no .wandb file; expected a W&B offline run")
        path = found[0]
    config: dict[str, Any] = {}
    history: list[dict[str, float]] = []
    summary: dict[str, float] = {}
    for raw in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                key = _item_key(item)
                if key is not None and not key.startswith("_"):
                    config[key] = json.loads(item.value_json)
        elif kind == "history":
            row = _numbers(record.history.item)
            if row:
                history.append(row)
                summary.update(row)
        elif kind == "summary":
            summary.update(_numbers(record.summary.update))
    summary.update({k: float(v) for k, v in config.items() if k.startswith("model/")})
    return Run(_run_folder_of(path.parent), config, history, summary, source="wandb")


def collect_wandb_api(project: str, online: bool = False, limit: int = 200) -> list[Run]:
    """Runs of a W&B project (``entity/project``) through the public API: network, on request.

    Refuses unless ``online`` is set and ``WANDB_MODE`` allows the network, so a notebook re-run
    offline (or a test) never reaches for it. The runs have no local folder: no latency unless
    measured elsewhere.
    """
    mode = os.environ.get("WANDB_MODE", "")
    if not online or mode in ("offline", "disabled", "dryrun"):
        raise RuntimeError(
            f"collect_wandb_api({project!r}) reads W&B over the network; expected online=True "
            f"and WANDB_MODE unset or online (it is {mode or 'unset'})"
        )
    import wandb

    runs = []
    for api_run in list(wandb.Api().runs(project))[:limit]:
        history = [
            {k: float(v) for k, v in row.items() if isinstance(v, int | float) and k[0] != "_"}
            for row in api_run.scan_history()
        ]
        summary = {
            k: float(v)
            for k, v in dict(api_run.summary).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        config = dict(api_run.config)
        summary.update({k: float(v) for k, v in config.items() if k.startswith("model/")})
        runs.append(Run(Path(api_run.id), config, history, summary, source="wandb-api"))
    return runs


# -- latency --------------------------------------------------------------------------------------
def input_size_of(config: Mapping[str, Any]) -> tuple[int, int]:
    """(H, W) the run's network sees: the segmentation crop, else the data's image size, else 224."""
    data = config.get("data") or {}
    size = data.get("crop_size") if config.get("head", {}).get("task") == "segmentation" else None
    size = size or data.get("image_size") or 224
    return (int(size), int(size)) if isinstance(size, int | float) else (int(size[0]), int(size[1]))


def checkpoint_of(run_dir: Path) -> Path | None:
    """``checkpoints/best.ckpt`` of a run folder, else ``last.ckpt``, else None."""
    for name in ("best.ckpt", "last.ckpt"):
        if (run_dir / "checkpoints" / name).is_file():
            return run_dir / "checkpoints" / name
    return None


def load_network(ckpt: str | Path, task: str) -> Any:
    """The run's network from its checkpoint's plain hyperparameters, in eval mode.

    As ``mnv3.eval`` does: the pretrained weights the run started from are nulled (the checkpoint
    holds the trained ones, and re-reading them would download them or fail offline).
    """

    from mnv3.tasks import TASKS

    task_module = TASKS[task].load_trained(ckpt)
    return task_module.model.eval()


def measure_latency(
    net: Any, input_size: tuple[int, int], repeats: int = 7, warmup: int = 2, threads: int = 1
) -> float:
    """Median wall time (ms) of ``net`` on one random image of ``input_size`` (batch 1)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(1, 3, *input_size)
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                net(x)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times)


def run_latency(run: Run, repeats: int = 7, threads: int = 1, refresh: bool = False) -> dict:
    """The run's batch-1 CPU latency, measured once and cached in ``<run>/latency.json``.

    Returns ``{"latency_ms", "input_size", "threads", "repeats", "checkpoint", "source"}``;
    ``source`` is "measured", "cached" or "no checkpoint" (latency NaN then).
    """
    size = input_size_of(run.config)
    cache = run.path / LATENCY_FILE
    if cache.is_file() and not refresh:
        cached = json.loads(cache.read_text())
        if cached.get("input_size") == list(size) and cached.get("threads") == threads:
            return {**cached, "source": "cached"}
    ckpt = checkpoint_of(run.path)
    if ckpt is None:
        return {"latency_ms": math.nan, "input_size": list(size), "source": "no checkpoint"}
    import torch

    latency = measure_latency(load_network(ckpt, run.task), size, repeats, threads=threads)
    result = {
        "latency_ms": latency,
        "input_size": list(size),
        "threads": threads,
        "repeats": repeats,
        "checkpoint": ckpt.name,
        "torch": torch.__version__,
    }
    cache.write_text(json.dumps(result, indent=1) + "\n")
    return {**result, "source": "measured"}


# -- the MnasNet reward ---------------------------------------------------------------------------
def reward(acc: float, latency_ms: float, target_ms: float, w: float) -> float:
    """MnasNet's ACC(m) x (LAT(m) / TAR)^w (paper §4.1; w = -0.07 Large, -0.15 Small)."""
    if latency_ms <= 0 or target_ms <= 0:
        raise ValueError(f"latency {latency_ms} ms and target {target_ms} ms must be positive")
    return acc * (latency_ms / target_ms) ** w


def backbone_family(backbone: Mapping[str, Any]) -> str:
    """``large``, ``small`` or ``mobilenet_v2``: which reward exponent and target apply."""
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
    and has the Large 1.0 / Small 1.0 rows, else :data:`DEFAULT_TARGET_MS` (the README's)."""
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
    return dict(DEFAULT_TARGET_MS), "the README's bench_models table (1 thread, 224x224)"


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
                "backbone": backbone.get("name"),
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
