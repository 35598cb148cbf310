"""Training beside other busy processes: wall time quiet, beside N busy loops, quiet again.

Run ``python bench/bench_contention.py --out bench/results`` (a few minutes per demo on 2 cores).
Each demo (``make train`` / ``train-detect`` / ``train-segment``, shortened to ``--epochs``) runs
under each CPU setting in the order quiet, busy, quiet; "busy" starts ``--busy`` pure-Python
loops (one core each, what a second job or a CI neighbour does) before the run and stops them
after. The ratio is busy time over the mean of the two quiet times, so a drift of the machine
during the benchmark shows as the two quiet times disagreeing (both are printed).

Settings: ``auto`` is mnv3's default (``cpu.threads=auto data.num_workers=auto``,
``mnv3/cpus.py``); ``all-cores`` is what it did before: as many torch threads as
``os.cpu_count()`` and 2 DataLoader workers. ``--settings`` picks others as
``name:key=value,key=value``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import load_average, machine_info, write_results

DEMOS = {
    "classify": "textures_quick",
    "detect": "shapes_detect_quick",
    "segment": "shapes_segment_quick",
}
SETTINGS = {
    "auto": [],
    "all-cores": [f"cpu.threads={os.cpu_count() or 1}", "data.num_workers=2"],
}
BUSY_LOOP = "while True: pass"


def _parse_settings(items: list[str]) -> dict[str, list[str]]:
    chosen: dict[str, list[str]] = {}
    for item in items:
        if item in SETTINGS:
            chosen[item] = SETTINGS[item]
            continue
        name, _, overrides = item.partition(":")
        if not overrides:
            raise SystemExit(f"--settings {item}: expected a known name or name:key=value,...")
        chosen[name] = overrides.split(",")
    return chosen


def _run_demo(experiment: str, epochs: int, overrides: list[str], workdir: Path) -> float:
    """Wall seconds of one training run (the whole command: start-up, fit, test)."""
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    command = [
        sys.executable,
        "-m",
        "mnv3.train",
        f"experiment={experiment}",
        f"trainer.max_epochs={epochs}",
        "callbacks.progress_bar=none",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-15:])
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{tail}")
    return seconds


def _busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--demos", nargs="+", choices=sorted(DEMOS), default=sorted(DEMOS))
    parser.add_argument("--settings", nargs="+", default=["auto", "all-cores"])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each demo run")
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside the run")
    parser.add_argument("--goal", type=float, default=2.5, help="busy / quiet goal of 'auto'")
    args = parser.parse_args()
    settings = _parse_settings(args.settings)

    started, load_start = time.perf_counter(), load_average()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for demo in args.demos:
            experiment = DEMOS[demo]
            _run_demo(experiment, 1, ["data.num_workers=0"], workdir)  # writes the data once
            for name, overrides in settings.items():
                quiet1 = _run_demo(experiment, args.epochs, overrides, workdir)
                loops = _busy(args.busy)
                try:
                    busy = _run_demo(experiment, args.epochs, overrides, workdir)
                finally:
                    for loop in loops:
                        loop.kill()
                        loop.wait()
                quiet2 = _run_demo(experiment, args.epochs, overrides, workdir)
                ratio = busy / ((quiet1 + quiet2) / 2)
                rows.append(
                    {
                        "demo": demo,
                        "setting": name,
                        "overrides": " ".join(overrides) or "(defaults)",
                        "quiet_s": round(quiet1, 1),
                        "busy_s": round(busy, 1),
                        "quiet_again_s": round(quiet2, 1),
                        "busy_over_quiet": round(ratio, 2),
                    }
                )
                print(rows[-1], flush=True)

    lines = [
        "# Training beside busy processes",
        "",
        f"Command: `python {shlex.join(sys.argv)}`",
        f"Date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}; "
        f"total time {time.perf_counter() - started:.0f} s",
        "",
        *(
            f"- {k}: {v}"
            for k, v in machine_info(os.cpu_count() or 1)
            if not k.startswith("load average")  # read at the end here; the start's is below
        ),
        f"- load average at start (1/5/15 min): {load_start}",
        "",
        f"Each demo runs {args.epochs} epochs (`trainer.max_epochs={args.epochs}`, W&B off), "
        f"quiet, then beside {args.busy} busy Python loops, then quiet again; wall seconds of "
        "the whole command. Ratio: busy / mean of the two quiet runs.",
        "",
        "| Demo | Setting | Overrides | Quiet s | Busy s | Quiet again s | Busy / quiet |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['demo']} | {r['setting']} | `{r['overrides']}` | {r['quiet_s']} | "
            f"{r['busy_s']} | {r['quiet_again_s']} | {r['busy_over_quiet']} |"
        )
    lines.append("")
    by_key = {(r["demo"], r["setting"]): r for r in rows}
    for (demo, setting), r in by_key.items():
        if setting != "auto":
            continue
        verdict = "PASS" if float(r["busy_over_quiet"]) <= args.goal else "FAIL"
        lines.append(
            f"- {verdict}: {demo}, auto: busy / quiet {r['busy_over_quiet']} (goal <= {args.goal})"
        )
        before = by_key.get((demo, "all-cores"))
        if before is not None:
            quiet = (float(r["quiet_s"]) + float(r["quiet_again_s"])) / 2
            quiet_before = (float(before["quiet_s"]) + float(before["quiet_again_s"])) / 2
            verdict = "PASS" if quiet <= quiet_before * 1.05 else "FAIL"
            lines.append(
                f"- {verdict}: {demo}, auto quiet {quiet:.1f} s vs all-cores {quiet_before:.1f} s "
                f"(x{quiet / quiet_before:.2f}; goal: no worse, 5% noise allowed)"
            )
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    write_results(args.out, "bench_contention", markdown, rows)


if __name__ == "__main__":
    main()
