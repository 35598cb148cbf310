"""Does NetAdapt beat the width multiplier at the same measured latency? (issue 17's evidence)

Run ``python bench/bench_netadapt.py --out bench/results`` (about an hour on 2 cores; ``--quick``:
1 seed, 1 epoch, a tiny search, to check the script). Steps, all on this machine:

1. **Search**: ``python -m mnv3.search experiment=netadapt_small_quick`` (MobileNetV3-Small to
   75 % of its latency on ``torch_cpu_1t``, on the generated textures), or ``--search-run`` to
   reuse a finished search's folder.
2. **Train** the searched table and MobileNetV3-Small at width 0.5, 0.75 and 1.0 from scratch
   with one recipe (``experiment=textures_quick``, the ``make train`` recipe), ``--seeds`` each;
   the score is each run's test top-1.
3. **Measure** the four networks' latency side by side (``Platform.measure_interleaved``, the
   same time windows, so the ratios hold on a drifting VM) on the search's platform.
4. **Report**: a table (latency, ratio to width 1.0, params, MAdds, top-1 mean and spread over
   seeds) and accuracy vs latency plotted; whether the searched network sits above the
   width-multiplier curve (linear between the two width points around its latency) and by how
   many seed standard deviations.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import load_average, machine_info, write_results
from omegaconf import OmegaConf

from mnv3.models import build_backbone, count_params
from mnv3.models.block_table import load_backbone_file, table_to_plain
from mnv3.models.profile import count_madds
from mnv3.report import markdown_table
from mnv3.search.platform import Platform

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = {"small x0.5": 0.5, "small x0.75": 0.75, "small x1.0": 1.0}


def run(module: str, args: list[str]) -> None:
    """``python -m module args`` in the repository, its output shown only when it fails."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    if done.returncode != 0:
        sys.exit(f"{module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def test_acc1(run_dir: Path) -> float:
    """The test top-1 a finished training run logged (csv/metrics.csv)."""
    with (run_dir / "csv" / "metrics.csv").open() as f:
        values = [float(r["test/acc1"]) for r in csv.DictReader(f) if r.get("test/acc1")]
    if not values:
        sys.exit(f"{run_dir} logged no test/acc1")
    return values[-1]


def train(folder: Path, backbone: list[str], seed: int, epochs: int | None) -> float:
    """Test top-1 of one training with the ``make train`` recipe (``experiment=textures_quick``)
    in ``folder``; a finished run there is read, not redone."""
    if not (folder / "csv" / "metrics.csv").is_file() or not _has_test(folder):
        extra = [f"trainer.max_epochs={epochs}"] if epochs else []
        run(
            "mnv3.train",
            [
                "experiment=textures_quick",
                *backbone,
                f"seed={seed}",
                "logger=csv",
                "callbacks.progress_bar=none",
                f"hydra.run.dir={folder}",
                *extra,
            ],
        )
    acc = test_acc1(folder)
    print(f"{folder.name}: test top-1 {acc:.4f}", file=sys.stderr)
    return acc


def network_row(
    name: str, network: Any, ms: float, base_ms: float, size: Any, accs: list[float]
) -> dict[str, Any]:
    """One network's report row: latency (and its ratio to Small x1.0's, measured side by
    side), size, MAdds at the platform's input size, test top-1 mean / spread / per seed."""
    return {
        "network": name,
        "latency_ms": round(ms, 3),
        "ratio_vs_x1.0": round(ms / base_ms, 3),
        "params_m": round(count_params(network) / 1e6, 3),
        "madds_m": round(count_madds(network, size) / 1e6, 1),
        "top1_mean": round(statistics.mean(accs), 4),
        "top1_std": round(statistics.stdev(accs) if len(accs) > 1 else 0.0, 4),
        "top1_seeds": " ".join(f"{a:.4f}" for a in accs),
    }


def backbone_args(name: str, table_file: Path) -> list[str]:
    """The train command's backbone arguments of one compared network."""
    if name == "netadapt":
        return [f"backbone={table_file}"]
    return ["backbone=small", f"backbone.width_mult={WIDTHS[name]}"]


def build(name: str, table_file: Path, num_classes: int):
    if name == "netadapt":
        table = table_to_plain(load_backbone_file(table_file))
        return build_backbone("mobilenet_v3", table=table, num_classes=num_classes)
    return build_backbone("mobilenet_v3_small", width_mult=WIDTHS[name], num_classes=num_classes)


def above_curve(points: dict[str, tuple[float, float]], ms: float, acc: float) -> float | None:
    """The searched network's top-1 minus the width curve's at its latency (linear between the
    two width points around it); None outside the curve's latency range."""
    curve = sorted(points.values())
    for (m0, a0), (m1, a1) in itertools.pairwise(curve):
        if m0 <= ms <= m1:
            return acc - (a0 + (a1 - a0) * (ms - m0) / (m1 - m0))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--search-run", type=Path, default=None, help="a finished search folder")
    parser.add_argument("--rounds", type=int, default=300, help="interleaved timing rounds")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, a tiny search")
    args = parser.parse_args()
    work = args.out / "netadapt"
    seeds = args.seeds[:1] if args.quick else args.seeds
    epochs = 1 if args.quick else args.epochs
    started = time.time()
    machine = machine_info(1)  # the load average at the start

    search_run = args.search_run or work / "search"
    if args.search_run is None:
        tiny = ["debug=fast_dev_run"] if args.quick else []
        run(
            "mnv3.search",
            ["experiment=netadapt_small_quick", "logger=csv", f"hydra.run.dir={search_run}", *tiny],
        )
    table_file = search_run / "table.yaml"
    summary = json.loads((search_run / "summary.json").read_text())
    cfg = OmegaConf.load(search_run / "config_resolved.yaml")
    platform = Platform.from_config(OmegaConf.to_container(cfg.platform, resolve=True))
    search_s = time.time() - started

    names = ["netadapt", *WIDTHS]
    accs: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        for seed in seeds:
            folder = work / "runs" / f"{name.replace(' ', '_')}_s{seed}"
            accs[name].append(train(folder, backbone_args(name, table_file), seed, epochs))
    train_s = time.time() - started - search_s

    classes = _num_classes(work / "runs" / f"netadapt_s{seeds[0]}")
    networks = {n: build(n, table_file, classes) for n in names}
    rounds = 20 if args.quick else args.rounds
    latency = platform.measure_interleaved(networks, rounds)
    base = latency["small x1.0"].ms
    size = platform.input_size
    rows = [network_row(n, networks[n], latency[n].ms, base, size, accs[n]) for n in names]
    points = {
        r["network"]: (r["latency_ms"], r["top1_mean"]) for r in rows if r["network"] != "netadapt"
    }
    ours = rows[0]
    gap = above_curve(points, ours["latency_ms"], ours["top1_mean"])
    seed_std = statistics.mean(r["top1_std"] for r in rows) or float("nan")
    verdict = (
        "outside the width curve's latency range"
        if gap is None
        else f"{gap:+.4f} top-1 vs the width curve at its latency ({gap / seed_std:+.1f} seed std)"
    )
    info = [
        *machine,
        (
            "platform",
            f"{platform.name}: {latency['netadapt'].runtime}, {platform.threads} thread(s), "
            f"{size[0]}x{size[1]}, {rounds} interleaved rounds",
        ),
        ("recipe", f"experiment=textures_quick{f' trainer.max_epochs={epochs}' if epochs else ''}"),
        ("seeds", " ".join(map(str, seeds))),
        (
            "search",
            f"{search_run}: {summary['stopped']}; {summary['iterations']} iterations, "
            f"{summary['proposals']} proposals, latency ratio judged in the last iteration "
            f"{summary['latency ratio (judged each iteration)']:.3f}, at the end "
            f"{summary['latency ratio (final side by side)']:.3f}",
        ),
        ("time", f"search {search_s:.0f} s, training {train_s:.0f} s"),
        ("load average at the end", load_average()),
    ]
    report = "\n".join(
        [
            "# NetAdapt vs width multiplier (bench/bench_netadapt.py)",
            "",
            *(f"- {k}: {v}" for k, v in info),
            "",
            markdown_table(rows, list(rows[0])),
            "",
            f"**NetAdapt: {verdict}.**",
            "",
        ]
    )
    print(report)
    name = "bench_netadapt"
    write_results(args.out, name, report, rows)
    _plot(rows, args.out / f"{name}.png", f"{platform.name}, {size[0]}x{size[1]}")


def _has_test(folder: Path) -> bool:
    with (folder / "csv" / "metrics.csv").open() as f:
        return any(r.get("test/acc1") for r in csv.DictReader(f))


def _num_classes(run_dir: Path) -> int:
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    return int(ckpt["hyper_parameters"]["num_classes"])


def _plot(rows: list[dict], png: Path, platform: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    widths = [r for r in rows if r["network"] != "netadapt"]
    ax.errorbar(
        [r["latency_ms"] for r in widths],
        [r["top1_mean"] for r in widths],
        yerr=[r["top1_std"] for r in widths],
        marker="o",
        capsize=4,
        label="MobileNetV3-Small, width multiplier",
    )
    for r in widths:
        ax.annotate(
            r["network"].split()[-1],
            (r["latency_ms"], r["top1_mean"]),
            xytext=(5, -12),
            textcoords="offset points",
        )
    ours = rows[0]
    ax.errorbar(
        [ours["latency_ms"]],
        [ours["top1_mean"]],
        yerr=[ours["top1_std"]],
        marker="*",
        markersize=14,
        capsize=4,
        linestyle="none",
        label="NetAdapt from Small (this machine)",
    )
    ax.set_xlabel(f"measured latency, ms ({platform})", fontsize=8)
    ax.set_ylabel("test top-1 (mean +- std over seeds)")
    ax.set_title("NetAdapt vs width multiplier, same recipe")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
