"""The block search's evidence (issue 18): ranking, controllers, the plot, the reward exponent.

Run ``python bench/bench_nas.py --out bench/results`` (about 80 minutes on 2 cores; ``--quick``:
tiny searches, 1 seed, 1 epoch, to check the script). Every step skips what a previous run of
the script finished, so a stopped bench continues. Steps, all on this machine:

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
5. **From scratch** with one recipe (``experiment=textures_quick``, the ``make train`` recipe):
   Small at width 0.5 / 0.75 / 1.0, the NAS winner and NAS -> NetAdapt over ``--seeds``; seed 0
   of the small-target winners, the random-search winner and ``--randoms`` random networks of
   the space. Score: each run's test top-1.
6. **Ranking**: Kendall tau-b (torchmetrics) between supernet accuracy (BN re-measured, the
   validation split, as the search scores) and stand-alone test top-1 (seed 0) over every
   network of the space trained in step 5.
7. **Latency** of the plotted networks measured side by side (interleaved rounds); a table and
   a plot of test top-1 vs measured latency.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import statistics
import time
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
from mnv3.search.supernet import SuperNet, supernet_accuracy

ROOT = Path(__file__).resolve().parent.parent
CONTROLLERS = ("random", "evolution", "rl")
EXPONENTS = (-0.07, -0.15)
WIDTHS = {"small x0.5": 0.5, "small x0.75": 0.75, "small x1.0": 1.0}


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
    parser.add_argument("--quick", action="store_true", help="tiny searches, 1 seed, 1 epoch")
    args = parser.parse_args()
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
    tables = {
        "nas (w -0.15)": work / f"evolution_s{s0}" / "table.yaml",
        "nas -> netadapt": work / f"evolution_s{s0}" / "netadapt" / "table.yaml",
        f"nas @{args.small_target} (w -0.07)": work / f"small_target_w0.07_s{s0}" / "table.yaml",
        f"nas @{args.small_target} (w -0.15)": work / f"small_target_w0.15_s{s0}" / "table.yaml",
        "random-search winner": work / f"random_s{s0}" / "table.yaml",
    }
    rng = random.Random(2026)
    for i in range(args.randoms):
        path = work / "random_networks" / f"r{i}.yaml"
        table = space.table(space.sample(rng), f"random_{i}")
        if not path.is_file():
            save_backbone_file(table, path)
        tables[f"random {i}"] = path

    def backbone(name: str) -> list[str]:
        if name in WIDTHS:
            return ["backbone=small", f"backbone.width_mult={WIDTHS[name]}"]
        return [f"backbone={tables[name]}"]

    plotted = [*WIDTHS, "nas (w -0.15)", "nas -> netadapt", *list(tables)[2:4]]
    multi_seed = {*WIDTHS, "nas (w -0.15)", "nas -> netadapt"}
    accs: dict[str, list[float]] = {}
    for name in [*WIDTHS, *tables]:
        for seed in seeds if name in multi_seed else seeds[:1]:
            slug = name.replace(" ", "_").replace("(", "").replace(")", "").replace(">", "")
            accs.setdefault(name, []).append(
                train(work / "runs" / f"{slug}_s{seed}", backbone(name), seed, epochs)
            )
    train_s = time.time() - started - search_s

    # Ranking: supernet accuracy as the search scores it vs stand-alone test top-1 (seed 0).
    from mnv3.cli import build_datamodule

    datamodule = build_datamodule(cfg["data"], num_workers=0)
    datamodule.prepare_data()
    supernet = SuperNet(
        space,
        datamodule.num_classes,
        dropout=float(cfg["head"].get("dropout", 0.2)),
        bn_momentum=cfg["backbone"].get("bn_momentum"),
    )
    supernet.load_state_dict(torch.load(supernet_file, map_location="cpu", weights_only=True))
    batches = int(cfg["search"]["calibration_batches"])
    torch.manual_seed(0)
    calibration = [
        b["image"] for _, b in zip(range(batches), datamodule.train_dataloader(), strict=False)
    ]
    held_out = list(datamodule.val_dataloader())
    in_space = {"small x1.0": load_backbone_file(CONFIG_DIR / "backbone" / "small_table.yaml")}
    in_space |= {n: load_backbone_file(p) for n, p in tables.items()}
    ranking = []
    for name, table in in_space.items():
        choices = space.decode(table)
        if choices is None:
            continue  # NetAdapt's widths leave the space
        ranking.append(
            {
                "network": name,
                "supernet_acc": round(
                    supernet_accuracy(supernet, choices, calibration, held_out), 4
                ),
                "standalone_top1_s0": round(accs[name][0], 4),
            }
        )
    proxy = torch.tensor([r["supernet_acc"] for r in ranking])
    truth = torch.tensor([r["standalone_top1_s0"] for r in ranking])
    tau = float(kendall_rank_corrcoef(proxy, truth))
    rho = float(spearman_corrcoef(proxy, truth))

    # Latency of the plotted networks, side by side.
    platform = Platform.from_config(cfg["platform"])
    classes = _num_classes(work / "runs" / f"small_x1.0_s{seeds[0]}")
    networks = {
        n: build_backbone("mobilenet_v3_small", width_mult=WIDTHS[n], num_classes=classes)
        if n in WIDTHS
        else build_backbone(
            "mobilenet_v3",
            table=table_to_plain(load_backbone_file(tables[n])),
            num_classes=classes,
        )
        for n in plotted
    }
    rounds = 20 if args.quick else args.rounds
    latency = platform.measure_interleaved(networks, rounds)
    ref = latency["small x1.0"].ms
    size = platform.input_size
    rows = [network_row(n, networks[n], latency[n].ms, ref, size, accs[n]) for n in plotted]
    curve = {r["network"]: (r["latency_ms"], r["top1_mean"]) for r in rows[:3]}
    seed_std = statistics.mean(r["top1_std"] for r in rows[:3]) or float("nan")
    verdicts = []
    for r in rows[3:5]:
        gap = above_curve(curve, r["latency_ms"], r["top1_mean"])
        verdicts.append(
            f"{r['network']}: "
            + (
                "outside the width curve's latency range"
                if gap is None
                else f"{gap:+.4f} top-1 vs the width curve at its latency "
                f"({gap / seed_std:+.1f} seed std)"
            )
        )

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
        f"- time: searches {search_s:.0f} s, training {train_s:.0f} s",
        f"- load average at the end: {load_average()}",
        "",
        "## 1. Does supernet accuracy rank networks as training them alone does?",
        "",
        "| network | supernet_acc | standalone_top1_s0 |",
        "|---|---|---|",
        *(f"| {r['network']} | {r['supernet_acc']} | {r['standalone_top1_s0']} |" for r in ranking),
        "",
        f"**Kendall tau-b {tau:+.3f}, Spearman {rho:+.3f} over {len(ranking)} networks.**",
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
        markdown_table(rows, list(rows[0])),
        "",
        *(f"**{v}.**" for v in verdicts),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    name = "bench_nas"
    write_results(args.out, name, report, rows)
    _plot(rows, args.out / f"{name}.png", f"{platform.name}, {size[0]}x{size[1]}")


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


def _plot(rows: list[dict], png: Path, platform: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    widths = rows[:3]
    series = [(widths, "o", "MobileNetV3-Small, width 0.5 / 0.75 / 1.0", "-")]
    for r, marker in zip(rows[3:], ("*", "P", "v", "^"), strict=False):
        label = r["network"] + (" (1 seed)" if r["top1_std"] == 0 else "")
        series.append(([r], marker, label, "none"))
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
