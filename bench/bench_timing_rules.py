"""Which timing rule repeats across fresh processes: raw call times, every statistic on them.

Run ``python bench/bench_timing_rules.py --out bench/results`` (``--quick``: 2 processes, 60
rounds). Each of ``--processes`` fresh Python processes builds MobileNetV3-Small and -Large,
warms them up and times ``--rounds`` rounds that call each once, in alternating order (what
:class:`mnv3.search.platform.Platform` does beside a reference), on one thread at 224x224, and
hands back every call's time. Every candidate statistic of ``Platform`` (a quantile, the mean
of the fastest calls, each alone or as Large's ratio to Small in the same rounds) is then
computed on the first 50, 200 and all rounds of every process, so the rules are compared on the
same calls. Reported per rule and round count: the spread (max / min - 1) over all processes,
the mean spread over every choice of 5 of them (the issue's "five fresh processes agree within
3 %") and the share of those choices within 3 %; and, per process, how much the rule moves
between its own first, middle and last third (drift within a process, which the batch-means
interval of ``Platform`` sees and an order-statistic interval does not). docs/search.md quotes
the run that chose ``torch_cpu_1t``'s rule.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common import load_average, machine_info, write_results

from mnv3.search.platform import lower_mean, quantile

NETWORKS = ("mobilenet_v3_small", "mobilenet_v3_large")

# one fresh process: build both networks, warm up, time alternating rounds, print the seconds
CHILD = """
import json, sys, time
import torch
from mnv3.cpus import pin_malloc
from mnv3.models import build_backbone
pin_malloc()
torch.set_num_threads(1)
x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
names, rounds = json.loads(sys.argv[1]), int(sys.argv[2])
nets = [build_backbone(n, num_classes=1000).eval() for n in names]
times = [[] for _ in nets]
with torch.inference_mode():
    for net in nets:
        for _ in range(10):
            net(x)
    order = list(range(len(nets)))
    for r in range(rounds):
        for i in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            nets[i](x)
            times[i].append(time.perf_counter() - t0)
print(json.dumps(times))
"""

Rule = Callable[[list[float], list[float]], float]  # (Small's times, Large's times) -> Large's ms


def _ms(stat: Callable[[list[float]], float]) -> Rule:
    return lambda small, large: stat(large) * 1e3


def _ratio(stat: Callable[[list[float]], float]) -> Rule:
    """Large's statistic over Small's in the same rounds (times a constant: spreads are ratios)."""
    return lambda small, large: stat(large) / stat(small)


STATISTICS: dict[str, Callable[[list[float]], float]] = {
    "median": lambda t: quantile(t, 0.5),
    "10th percentile": lambda t: quantile(t, 0.1),
    "25th percentile": lambda t: quantile(t, 0.25),
    "mean of the fastest half": lambda t: lower_mean(t, 0.5),
    "mean of the fastest quarter": lambda t: lower_mean(t, 0.25),
}
RULES: dict[str, Rule] = {
    **{f"{name}, alone": _ms(stat) for name, stat in STATISTICS.items()},
    **{f"{name}, beside Small": _ratio(stat) for name, stat in STATISTICS.items()},
}


def fresh_process_times(rounds: int) -> dict[str, list[float]]:
    """Every call's seconds per network from one new Python process (imports and all)."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(NETWORKS), str(rounds)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(zip(NETWORKS, json.loads(out.strip().splitlines()[-1]), strict=True))


def spread(values: list[float]) -> float:
    """max / min - 1."""
    return max(values) / min(values) - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--processes", type=int, default=10, help="fresh processes")
    parser.add_argument("--rounds", type=int, default=600, help="rounds per process")
    parser.add_argument("--quick", action="store_true", help="2 processes, 60 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.processes, args.rounds = 2, 60
    start = time.perf_counter()
    info = machine_info(1)
    runs = []
    for i in range(args.processes):
        runs.append(fresh_process_times(args.rounds))
        small = runs[-1][NETWORKS[0]]
        print(f"[bench_timing_rules] process {i}: Small median {quantile(small, 0.5) * 1e3:.2f} ms")
    counts = sorted({min(50, args.rounds), min(200, args.rounds), args.rounds})
    subset = min(5, args.processes)
    rows, lines = [], []
    for rule, compute in RULES.items():
        cells = []
        for n in counts:
            values = [compute(r[NETWORKS[0]][:n], r[NETWORKS[1]][:n]) for r in runs]
            chosen = [spread(list(c)) for c in itertools.combinations(values, subset)]
            within = sum(s <= 0.03 for s in chosen) / len(chosen)
            rows.append(
                {
                    "rule": rule,
                    "rounds": n,
                    "spread_all": spread(values),
                    f"mean_spread_of_{subset}": statistics.fmean(chosen),
                    "share_within_3pct": within,
                    "values": " ".join(f"{v:.4g}" for v in values),
                }
            )
            cells.append(f"{spread(values):.1%} / {statistics.fmean(chosen):.1%} / {within:.0%}")
        third = args.rounds // 3
        drift = statistics.fmean(
            spread(
                [
                    compute(
                        r[NETWORKS[0]][k * third : (k + 1) * third],
                        r[NETWORKS[1]][k * third : (k + 1) * third],
                    )
                    for k in range(3)
                ]
            )
            for r in runs
        )
        lines.append(f"| {rule} | {' | '.join(cells)} | {drift:.1%} |")
    elapsed = time.perf_counter() - start
    header = " | ".join(f"{n} rounds" for n in counts)
    report = f"""# Timing rules on the same calls: MobileNetV3-Large in {args.processes} fresh processes

Command: `python {" ".join([sys.argv[0], *(argv or sys.argv[1:])])}`; total time {elapsed:.0f} s

{chr(10).join(f"- {k}: {v}" for k, v in info)}
- load average at end: {load_average()}
- each process: Small and Large, 1 thread, 224x224, {args.rounds} alternating rounds

Per rule: spread over all {args.processes} processes / mean spread over every {subset} of them /
share of those {subset}-process choices within 3 % (the goal); last column: the mean spread of
each process's own three thirds ({third} rounds each). "Beside Small" is Large's statistic over
Small's in the same rounds.

| rule (Large) | {header} | within a process |
|---|{"---|" * len(counts)}---|
{chr(10).join(lines)}
"""
    print(report)
    write_results(args.out, "bench_timing_rules", report, rows)
    print(f"wrote {args.out}/bench_timing_rules.md and .csv", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
