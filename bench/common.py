"""What every benchmark script shares: a quiet allocator, interleaved timing with a bootstrap
interval of the ratio, the load other processes put on the machine, machine information, and
writing each table as markdown and CSV."""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision

from mnv3.cpus import cpu_model

MIN_ROUNDS = 10  # a row's time cap never stops it before this many rounds
BUSY_CORES = 0.1  # other processes above this many cores while a row is timed: flagged noisy


def write_results(out: Path, name: str, markdown: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``out/<name>.md`` (the printed table) and ``out/<name>.csv`` (one line per row)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    with (out / f"{name}.csv").open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


class OtherLoad:
    """Average number of cores that *other* processes kept busy between start() and stop().

    System-wide busy time from /proc/stat minus this process's own CPU time: it tells whether
    a latency was measured on a quiet machine. None where /proc/stat is unavailable.
    """

    def __init__(self) -> None:
        self._start: tuple[float, float, float] | None = None

    @staticmethod
    def _system_busy() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def start(self) -> None:
        busy = self._system_busy()
        self._start = None if busy is None else (busy, self._own(), time.perf_counter())

    def stop(self) -> float | None:
        busy = self._system_busy()
        if self._start is None or busy is None:
            return None
        busy0, own0, t0 = self._start
        wall = time.perf_counter() - t0
        return max(0.0, (busy - busy0) - (self._own() - own0)) / wall if wall > 0 else None


def time_interleaved(
    candidates: dict[str, Callable[[], object]], rounds: int, warmup: int, budget_s: float
) -> dict[str, list[float]]:
    """Per-call wall times (s) of each candidate, run in rounds of alternating order.

    Alternating (A B C, C B A, ...) makes machine noise and cache effects hit every candidate
    alike. Runs under ``torch.inference_mode()`` with the GC paused (a collection inside a timed
    call would land on one candidate only). Stops early once ``budget_s`` seconds are spent,
    after at least :data:`MIN_ROUNDS` rounds.
    """
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                candidates[name]()
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            deadline = time.perf_counter() + budget_s
            for r in range(rounds):
                if r >= MIN_ROUNDS and time.perf_counter() > deadline:
                    break
                for name in names if r % 2 == 0 else reversed(names):
                    fn = candidates[name]
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        finally:
            if gc_was_enabled:
                gc.enable()
    return times


def ratio_interval(
    num: Sequence[float], den: Sequence[float], resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% bootstrap interval of median(num) / median(den), resampling whole rounds."""
    rng = random.Random(seed)
    n = len(num)
    if n < 2:
        return (float("nan"), float("nan"))
    ratios = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(
            statistics.median(num[i] for i in idx) / statistics.median(den[i] for i in idx)
        )
    ratios.sort()
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


def load_average() -> str:
    """The 1/5/15-minute load averages, or "n/a" where the OS has none."""
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def machine_info(threads_all: int) -> list[tuple[str, str]]:
    """(key, value) lines that say where a benchmark ran, for its report."""
    return [
        ("CPU", cpu_model()),
        ("cores (os.cpu_count)", str(os.cpu_count())),
        ("torch threads by default", str(threads_all)),
        ("torch CPU capability", torch.backends.cpu.get_cpu_capability()),
        ("torch / torchvision", f"{torch.__version__} / {torchvision.__version__}"),
        ("python", f"{platform.python_version()} ({platform.platform()})"),
        ("load average at start (1/5/15 min)", load_average()),
    ]


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds with two decimals."""
    return f"{seconds * 1e3:.2f}"


def fmt_ratio(ratio: float, ci: tuple[float, float] | None = None) -> str:
    """A ratio with three decimals, and its interval when given."""
    text = f"{ratio:.3f}"
    return f"{text} [{ci[0]:.2f}-{ci[1]:.2f}]" if ci is not None else text


def add_timing_args(
    parser: argparse.ArgumentParser,
    rows: Sequence[str],
    rows_flag: str,
    default_rounds: int,
    default_warmup: int,
) -> None:
    """The options every latency script shares: output folder, smoke mode, rows, rounds,
    warm-up calls and the allocator switch."""
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few iterations only")
    parser.add_argument(
        rows_flag,
        nargs="+",
        default=None,
        metavar="ROW",
        help=f"rows to run (default all): {', '.join(rows)}",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help=f"timed rounds (default {default_rounds})"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help=f"warm-up calls (default {default_warmup})"
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc malloc's mmap / trim thresholds at their defaults (see pin_malloc)",
    )


def resolve_timing_args(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    requested: Sequence[str] | None,
    rows: Mapping[str, Any],
    rounds: tuple[int, int],
    warmup: tuple[int, int],
) -> list[Any]:
    """Fill ``args.rounds`` / ``args.warmup`` from (default, quick) pairs and return the rows
    asked for (all by default; names may also be comma-separated); unknown names are a usage
    error naming them."""
    keys = [k for item in requested or rows for k in item.split(",") if k]
    unknown = [k for k in keys if k not in rows]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; choose from {', '.join(rows)}")
    args.rounds = args.rounds or rounds[args.quick]
    args.warmup = args.warmup if args.warmup is not None else warmup[args.quick]
    return [rows[k] for k in keys]
