"""The block search's evidence (issue 18): ranking, controllers, the plot, the reward exponent.

Run ``python bench/bench_nas.py --out bench/results`` (about 2 hours on 2 cores from nothing;
``--quick``: tiny searches, 1 seed, 1 epoch, to check the script). Every step skips what a
previous run of the script finished, so a stopped bench continues, and a run with new networks
or seeds trains only those. Steps, all on this machine:

1. **Supernet**: ``python -m mnv3.search experiment=nas_small_quick search.netadapt=false`` (or
   ``--supernet-run``, a finished search folder); its ``search/supernet.pt`` is copied into every
   search below, so all controllers query one and the same accuracy estimate.
2. **Controllers at an equal budget**: random search, regularized evolution and the RNN
   controller (policy gradient), ``--search-seeds`` each, ``search.budget`` candidates, the
   quick experiment's reward (w = -0.15, target = Small's predicted latency). Per run: the best
   reward over the candidates (predicted latency) and the winner's reward with its latency
   measured side by side with Small.
3. **Reward exponent**: evolution at a small target (``--small-target`` of Small's latency)
   with w = -0.07 and w = -0.15, the same seeds: the winners' supernet accuracy and latency.
4. **NAS -> NetAdapt**: the evolution seed-0 run's winner refined by NetAdapt from its
   supernet weights (``search.netadapt=true``, the quick experiment's ``search.refine``).
5. **From scratch** with one recipe (``experiment=textures_quick``, the ``make train`` recipe),
   over ``--seeds``: Small at ``--small-widths`` and Large at ``--large-widths`` (two
   width-multiplier curves), the evolution winner of every search seed, NAS -> NetAdapt and,
   when ``--netadapt-table`` exists (the ``make search`` run's table), NetAdapt from Small;
   training seed 0 only of the small-target winners, the random-search winner and
   ``--randoms`` random networks of the space. Score: each run's test top-1.
6. **Ranking**: Kendall tau-b (torchmetrics) between supernet accuracy (BN re-measured, the
   validation split, as the search scores) and stand-alone test top-1 (seed 0) over every
   network of the space trained in step 5.
7. **Latency** of every plotted network measured in one interleaved measurement, so that each
   ratio to Small x1.0 comes from the same time windows; a table, a plot of test top-1 vs
   measured latency, and each found network's top-1 minus each width curve's at its latency.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_netadapt import _num_classes, above_curve, network_row, run, train
from common import load_average, machine_info, write_results
from omegaconf import OmegaConf
from torchmetrics.functional import kendall_rank_corrcoef, spearman_corrcoef

from mnv3.cli import CONFIG_DIR
from mnv3.models import build_backbone
from mnv3.models.block_table import load_backbone_file, save_backbone_file, table_to_plain
from mnv3.report import markdown_table
from mnv3.search.platform import Platform
from mnv3.search.space import SearchSpace
from mnv3.search.supernet import sandwich_task, scoring_trainer, supernet_accuracy
from mnv3.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
CONTROLLERS = ("random", "evolution", "rl")
EXPONENTS = (-0.07, -0.15)
FAMILIES = {"small": "mobilenet_v3_small", "large": "mobilenet_v3_large"}
NETADAPT_SMALL = ROOT / "bench" / "results" / "demo_runs" / "netadapt_small_quick" / "table.yaml"


@dataclass(frozen=True)
class Network:
    """One network of step 5: its run folders are ``runs/<stem>_s<seed>``, trained over every
    training seed when ``multi_seed``; a block table file or a width point of a family."""

    name: str
    stem: str
    multi_seed: bool
    table: Path | None = None
    family: str = "small"
    width: float = 1.0

    def backbone(self) -> list[str]:
        """The train command's backbone arguments."""
        if self.table is not None:
            return [f"backbone={self.table}"]
        return [f"backbone={self.family}", f"backbone.width_mult={self.width}"]

    def build(self, num_classes: int) -> torch.nn.Module:
        """The network as trained, for timing and counting."""
        if self.table is not None:
            plain = table_to_plain(load_backbone_file(self.table))
            return build_backbone("mobilenet_v3", table=plain, num_classes=num_classes)
        return build_backbone(FAMILIES[self.family], width_mult=self.width, num_classes=num_classes)


def width_point(family: str, width: float) -> Network:
    """``family`` at one width multiplier, e.g. ``small x0.75`` in ``runs/small_x0.75_s<seed>``."""
    name = f"{family} x{width}"
    return Network(name, name.replace(" ", "_"), True, family=family, width=width)


def table_network(name: str, table: Path, multi_seed: bool, stem: str | None = None) -> Network:
    """A block table trained from scratch; its run folders are named after ``name`` unless
    ``stem`` says otherwise."""
    if stem is None:
        stem = name.replace(" ", "_").replace("(", "").replace(")", "").replace(">", "")
    return Network(name, stem, multi_seed, table=table)


def search(folder: Path, supernet: Path | None, args: list[str]) -> dict[str, Any]:
    """One ``mnv3.search`` run (skipped when finished) sharing ``supernet``; its summary and
    the best predicted-latency reward over its candidates."""
    if not (folder / "summary.json").is_file():
        if supernet is not None:
            (folder / "search").mkdir(parents=True, exist_ok=True)
            shutil.copy(supernet, folder / "search" / "supernet.pt")
        run("mnv3.search", ["logger=csv", f"hydra.run.dir={folder}", *args])
    summary = json.loads((folder / "summary.json").read_text())
    with (folder / "search" / "candidates.csv").open() as f:
        rewards = [float(r["reward"]) for r in csv.DictReader(f)]
    return summary | {"best predicted reward": max(rewards), "evaluated": len(rewards)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--supernet-run", type=Path, default=None, help="a finished NAS folder")
    parser.add_argument("--search-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--randoms", type=int, default=5, help="random networks for the ranking")
    parser.add_argument("--small-target", type=float, default=0.6)
    parser.add_argument("--rounds", type=int, default=300, help="interleaved timing rounds")
    parser.add_argument(
        "--small-widths", type=float, nargs="+", default=[0.35, 0.5, 0.75, 1.0], help="with 1.0"
    )
    parser.add_argument("--large-widths", type=float, nargs="+", default=[0.35, 0.5])
    parser.add_argument(
        "--netadapt-table",
        type=Path,
        default=NETADAPT_SMALL,
        help="NetAdapt from Small (make search); plotted when the file exists",
    )
    parser.add_argument("--quick", action="store_true", help="tiny searches, 1 seed, 1 epoch")
    args = parser.parse_args()
    if 1.0 not in args.small_widths:
        parser.error("--small-widths must include 1.0, the reference every latency is a ratio to")
    work = args.out / "nas"
    quick = ["debug=fast_dev_run"] if args.quick else []
    seeds = args.seeds[:1] if args.quick else args.seeds
    search_seeds = args.search_seeds[:1] if args.quick else args.search_seeds
    epochs = 1 if args.quick else None
    machine = machine_info(1)
    started = time.time()

    base = args.supernet_run or work / "supernet"
    if args.supernet_run is None:
        search(base, None, ["experiment=nas_small_quick", "search.netadapt=false", *quick])
    supernet_file = base / "search" / "supernet.pt"
    common = ["experiment=nas_small_quick", *quick]

    controllers: dict[str, list[dict[str, Any]]] = {c: [] for c in CONTROLLERS}
    for c in CONTROLLERS:
        for s in search_seeds:
            refine = "true" if (c, s) == ("evolution", search_seeds[0]) else "false"
            controllers[c].append(
                search(
                    work / f"{c}_s{s}",
                    supernet_file,
                    [*common, f"search.controller={c}", f"seed={s}", f"search.netadapt={refine}"],
                )
            )
    exponents: dict[float, list[dict[str, Any]]] = {w: [] for w in EXPONENTS}
    for w in EXPONENTS:
        for s in search_seeds:
            exponents[w].append(
                search(
                    work / f"small_target_w{abs(w)}_s{s}",
                    supernet_file,
                    [
                        *common,
                        "search.controller=evolution",
                        f"seed={s}",
                        f"search.w={w}",
                        f"search.target_ratio={args.small_target}",
                        "search.netadapt=false",
                    ],
                )
            )
    search_s = time.time() - started

    cfg = OmegaConf.to_container(OmegaConf.load(base / "config_resolved.yaml"), resolve=True)
    space = SearchSpace.from_config(cfg["search"]["space"])
    s0 = search_seeds[0]
    small = [width_point("small", w) for w in sorted(args.small_widths)]
    large = [width_point("large", w) for w in sorted(args.large_widths)]
    # Search seed 0's winner keeps the run folders of the bench's first layout (one search seed).
    found = [
        table_network(
            f"nas (w -0.15) search s{s}",
            work / f"evolution_s{s}" / "table.yaml",
            True,
            stem="nas_w_-0.15" if s == 0 else f"nas_w_-0.15_search_s{s}",
        )
        for s in search_seeds
    ]
    refined = [
        table_network(
            "nas -> netadapt", work / f"evolution_s{s0}" / "netadapt" / "table.yaml", True
        )
    ]
    if args.netadapt_table.is_file():
        refined.append(table_network("netadapt from small", args.netadapt_table, True))
    small_target = [
        table_network(
            f"nas @{args.small_target} (w {w})",
            work / f"small_target_w{abs(w)}_s{s0}" / "table.yaml",
            False,
        )
        for w in EXPONENTS
    ]
    others = [table_network("random-search winner", work / f"random_s{s0}" / "table.yaml", False)]
    rng = random.Random(2026)
    for i in range(args.randoms):
        path = work / "random_networks" / f"r{i}.yaml"
        table = space.table(space.sample(rng), f"random_{i}")
        if not path.is_file():
            save_backbone_file(table, path)
        others.append(table_network(f"random {i}", path, False))

    plotted = [*small, *large, *found, *refined, *small_target]
    accs: dict[str, list[float]] = {}
    for net in [*plotted, *others]:
        for seed in seeds if net.multi_seed else seeds[:1]:
            accs.setdefault(net.name, []).append(
                train(work / "runs" / f"{net.stem}_s{seed}", net.backbone(), seed, epochs)
            )
    train_s = time.time() - started - search_s

    # Ranking: supernet accuracy as the search scores it vs stand-alone test top-1 (seed 0).
    from mnv3.cli import build_datamodule

    datamodule = build_datamodule(cfg["data"], num_workers=0)
    datamodule.prepare_data()
    task = sandwich_task(TASKS["classification"]).from_config(cfg, datamodule)  # as the search
    task.model.supernet.load_state_dict(
        torch.load(supernet_file, map_location="cpu", weights_only=True)
    )
    scorer = scoring_trainer(str(work / "scoring"))
    batches = int(cfg["search"]["calibration_batches"])
    torch.manual_seed(0)
    calibration = [
        b["image"] for _, b in zip(range(batches), datamodule.train_dataloader(), strict=False)
    ]
    held_out = list(datamodule.val_dataloader())
    in_space = {"small x1.0": load_backbone_file(CONFIG_DIR / "backbone" / "small_table.yaml")}
    # The first run's 10 networks first; the later search seeds' winners after them.
    for net in [found[0], *refined, *small_target, *others, *found[1:]]:
        in_space[net.name] = load_backbone_file(net.table)
    ranking = []
    for name, table in in_space.items():
        choices = space.decode(table)
        if choices is None:
            continue  # NetAdapt's widths leave the space
        ranking.append(
            {
                "network": name,
                "supernet_acc": round(
                    supernet_accuracy(task, choices, calibration, held_out, scorer), 4
                ),
                "standalone_top1_s0": round(accs[name][0], 4),
            }
        )
    later = {n.name for n in found[1:]}
    correlations = [_correlations([r for r in ranking if r["network"] not in later])]
    if later:
        correlations.append(_correlations(ranking))

    # Latency of the plotted networks, side by side.
    platform = Platform.from_config(cfg["platform"])
    classes = _num_classes(work / "runs" / f"small_x1.0_s{seeds[0]}")
    networks = {n.name: n.build(classes) for n in plotted}
    rounds = 20 if args.quick else args.rounds
    latency = platform.measure_interleaved(networks, rounds)
    ref = latency["small x1.0"].ms
    size = platform.input_size
    rows = {n: network_row(n, networks[n], latency[n].ms, ref, size, accs[n]) for n in networks}
    curves = {
        "Small": [rows[n.name] for n in small],
        "Large": [rows[n.name] for n in large],
    }
    judged = [rows[n.name] for n in [*found, *refined]]
    gaps = {r["network"]: {c: _gap(r, points) for c, points in curves.items()} for r in judged}
    verdicts = [
        f"{r['network']} ({r['ratio_vs_x1.0']:.3f}x, top-1 {r['top1_mean']:.4f} +- "
        f"{r['top1_std']:.4f}): "
        + "; ".join(_verdict(c, r, gaps[r["network"]][c], points) for c, points in curves.items())
        for r in judged
    ]
    found_rows = [rows[n.name] for n in found]
    pooled = [a for n in found for a in accs[n.name]]
    ratios = [r["ratio_vs_x1.0"] for r in found_rows]
    found_table = [
        {
            "search seed": str(seed),
            "latency vs small x1.0": f"{r['ratio_vs_x1.0']:.3f}",
            "top-1 per training seed": r["top1_seeds"],
            "top-1 mean +- std": f"{r['top1_mean']:.4f} +- {r['top1_std']:.4f}",
            **{
                f"vs {c} curve": _cell(r, gaps[r["network"]][c], points)
                for c, points in curves.items()
            },
        }
        for seed, r in zip(search_seeds, found_rows, strict=True)
    ]
    ratio_mean, ratio_std = mean_std(ratios)
    pooled_mean, pooled_std = mean_std(pooled)
    all_row = {
        "search seed": f"all {len(pooled)} runs",
        "latency vs small x1.0": f"{ratio_mean:.3f} +- {ratio_std:.3f}",
        "top-1 per training seed": "",
        "top-1 mean +- std": f"{pooled_mean:.4f} +- {pooled_std:.4f}",
    }
    for c, points in curves.items():
        inside = [gaps[r["network"]][c] for r in found_rows if gaps[r["network"]][c] is not None]
        outside = [_beyond(r, points) for r in found_rows if gaps[r["network"]][c] is None]
        words = [f"{statistics.mean(inside):+.4f} (mean of {len(inside)})"] if inside else []
        for verb, plural in (("dominates", "dominate"), ("is dominated by", "dominated by")):
            count = sum(1 for b in outside if b is not None and b[0] == verb)
            if count:
                words.append(f"{count} of {len(found_rows)} {plural} its end point")
        if len(outside) > sum(1 for b in outside if b is not None):
            words.append(f"{sum(1 for b in outside if b is None)} outside")
        all_row[f"vs {c} curve"] = "; ".join(words)
    found_table.append(all_row)

    lines = [
        "# Block search evidence (bench/bench_nas.py)",
        "",
        *(f"- {k}: {v}" for k, v in machine),
        f"- platform: {platform.name}: {latency['small x1.0'].runtime}, {platform.threads} "
        f"thread(s), {size[0]}x{size[1]}, {rounds} interleaved rounds",
        f"- supernet: {base} (experiment=nas_small_quick: "
        f"{cfg['search']['supernet_steps']} sandwich steps), shared by every search",
        f"- search seeds: {' '.join(map(str, search_seeds))}; budget "
        f"{controllers['random'][0]['evaluated']} candidates each; training seeds "
        f"{' '.join(map(str, seeds))} (recipe experiment=textures_quick"
        f"{' trainer.max_epochs=1' if epochs else ''})",
        f"- width curves: Small x{' / '.join(str(n.width) for n in small)}, Large "
        f"x{' / '.join(str(n.width) for n in large)}; NetAdapt from Small: "
        + (
            str(args.netadapt_table)
            if args.netadapt_table.is_file()
            else f"no table at {args.netadapt_table}, not plotted"
        ),
        "- latency: every network of section 4 timed in the one interleaved measurement; "
        "compare ratios to Small x1.0, not milliseconds across pages",
        f"- time: searches {search_s:.0f} s, training {train_s:.0f} s (only runs not finished "
        "before)",
        f"- load average at the end: {load_average()}",
        "",
        "## 1. Does supernet accuracy rank networks as training them alone does?",
        "",
        "| network | supernet_acc | standalone_top1_s0 |",
        "|---|---|---|",
        *(f"| {r['network']} | {r['supernet_acc']} | {r['standalone_top1_s0']} |" for r in ranking),
        "",
        *(
            f"**Kendall tau-b {tau:+.3f}, Spearman {rho:+.3f} over {count} networks"
            + (" (the first run's set).**" if i == 0 and later else ".**")
            for i, (tau, rho, count) in enumerate(correlations)
        ),
        "",
        "## 2. Controllers at an equal budget (w = -0.15, target = Small's predicted latency)",
        "",
        "| controller | best predicted reward per seed | mean +- std | winner latency vs Small "
        "per seed (measured side by side) | mean +- std |",
        "|---|---|---|---|---|",
    ]
    lines += [_runs_row(c, runs, "best predicted reward") for c, runs in controllers.items()]
    lines += [
        "",
        f"## 3. The reward exponent at a small target ({args.small_target} x Small's latency)",
        "",
        "| w | winner's supernet acc per seed | mean +- std | winner latency vs Small per seed "
        "| mean +- std |",
        "|---|---|---|---|---|",
    ]
    lines += [_runs_row(str(w), runs, "best supernet acc") for w, runs in exponents.items()]
    lines += [
        "",
        "## 4. Found networks trained from scratch vs the width multiplier",
        "",
        markdown_table(list(rows.values()), list(next(iter(rows.values())))),
        "",
        "Top-1 minus each width curve's at the network's measured latency (linear between the "
        "two width points around it; seed std: the curve points' mean std over training seeds):",
        "",
        *(f"- {v}" for v in verdicts),
        "",
        "### The evolution winner of each search seed, over the training seeds",
        "",
        markdown_table(found_table, list(found_table[0])),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    name = "bench_nas"
    write_results(args.out, name, report, list(rows.values()))
    others_plotted = [rows[n.name] for n in [*found, *refined, *small_target]]
    _plot(curves, others_plotted, args.out / f"{name}.png", f"{platform.name}, {size[0]}x{size[1]}")


def _correlations(ranking: list[dict[str, Any]]) -> tuple[float, float, int]:
    """Kendall tau-b and Spearman rho between supernet and stand-alone accuracy, and the count."""
    proxy = torch.tensor([r["supernet_acc"] for r in ranking])
    truth = torch.tensor([r["standalone_top1_s0"] for r in ranking])
    return (
        float(kendall_rank_corrcoef(proxy, truth)),
        float(spearman_corrcoef(proxy, truth)),
        len(ranking),
    )


def _gap(row: dict[str, Any], curve: list[dict[str, Any]]) -> float | None:
    """``row``'s top-1 minus the width curve's at its measured latency; None outside it."""
    points = {r["network"]: (r["latency_ms"], r["top1_mean"]) for r in curve}
    return above_curve(points, row["latency_ms"], row["top1_mean"])


def _beyond(row: dict[str, Any], curve: list[dict[str, Any]]) -> tuple[str, dict, float] | None:
    """Outside a width curve's latency range, what holds without extrapolating it: ``row`` is
    faster and at least as accurate as the curve's fastest point ("dominates"), or slower and
    at most as accurate as its slowest ("dominated by"); that point and the top-1 difference.
    None when neither holds or there is no curve."""
    if not curve:
        return None
    fastest = min(curve, key=lambda r: r["latency_ms"])
    slowest = max(curve, key=lambda r: r["latency_ms"])
    if row["latency_ms"] < fastest["latency_ms"] and row["top1_mean"] >= fastest["top1_mean"]:
        return "dominates", fastest, row["top1_mean"] - fastest["top1_mean"]
    if row["latency_ms"] > slowest["latency_ms"] and row["top1_mean"] <= slowest["top1_mean"]:
        return "is dominated by", slowest, row["top1_mean"] - slowest["top1_mean"]
    return None


def _verdict(
    family: str, row: dict[str, Any], gap: float | None, curve: list[dict[str, Any]]
) -> str:
    """One width curve's comparison in words: the gap at equal latency and its size in the
    curve's seed std, or outside the curve's latency range what :func:`_beyond` finds."""
    if not curve:
        return f"no {family} curve"
    seed_std = statistics.mean(r["top1_std"] for r in curve) or float("nan")
    if gap is not None:
        return f"{gap:+.4f} vs the {family} curve ({gap / seed_std:+.1f} seed std)"
    ratios = sorted(r["ratio_vs_x1.0"] for r in curve)
    text = f"outside the {family} curve ({ratios[0]:.3f}x-{ratios[-1]:.3f}x)"
    beyond = _beyond(row, curve)
    if beyond is not None:
        verb, end, diff = beyond
        text += f"; {verb} {end['network']} ({diff:+.4f} top-1, {diff / seed_std:+.1f} seed std)"
    return text


def _cell(row: dict[str, Any], gap: float | None, curve: list[dict[str, Any]]) -> str:
    """The per-search-seed table's short form of :func:`_verdict`."""
    if gap is not None:
        return f"{gap:+.4f}"
    beyond = _beyond(row, curve)
    if beyond is None:
        return "outside"
    verb, end, diff = beyond
    return f"outside; {verb} {end['network']} ({diff:+.4f})"


def _runs_row(label: str, runs: list[dict[str, Any]], key: str) -> str:
    """A markdown row: ``key`` of each search run and its mean +- std, then the winner's
    latency ratio to Small (measured side by side in each run) and its mean +- std."""
    cells = [label]
    for values in (
        [r[key] for r in runs],
        [r["latency vs reference (side by side)"] for r in runs],
    ):
        mean, spread = mean_std(values)
        cells += [" ".join(f"{v:.4f}" for v in values), f"{mean:.4f} +- {spread:.4f}"]
    return "| " + " | ".join(cells) + " |"


def _plot(curves: dict[str, list[dict]], others: list[dict], png: Path, platform: str) -> None:
    """Test top-1 (mean +- std over training seeds) vs measured latency: each width curve as a
    line, every other network as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    series = [
        (
            points,
            marker,
            f"MobileNetV3-{family}, width "
            + " / ".join(r["network"].split(" x")[1] for r in points),
            "-",
        )
        for (family, points), marker in zip(curves.items(), ("o", "s"), strict=False)
        if points
    ]
    markers = ("*", "X", "D", "P", "h", "v", "^", "<", ">")
    for i, r in enumerate(others):
        label = r["network"] + (" (1 seed)" if r["top1_std"] == 0 else "")
        series.append(([r], markers[i % len(markers)], label, "none"))
    for points, marker, label, line in series:
        ax.errorbar(
            [r["latency_ms"] for r in points],
            [r["top1_mean"] for r in points],
            yerr=[r["top1_std"] for r in points],
            marker=marker,
            markersize=11 if line == "none" else 6,
            capsize=4,
            linestyle=line,
            label=label,
        )
    ax.set_xlabel(f"measured latency, ms ({platform})", fontsize=8)
    ax.set_ylabel("test top-1 (mean +- std over seeds)")
    ax.set_title("Block search on this CPU, retrained from scratch, one recipe")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
