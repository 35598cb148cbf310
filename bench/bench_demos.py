"""The quick demos as a user runs them: the one place their run time and result come from.

Each demo of :data:`DEMOS` is started as its own process, exactly as the README says
(``python -m mnv3.<entry> experiment=<name>``, plus ``hydra.run.dir`` so its run folder is known),
and timed from start to exit. Its result is read back from the run folder the way every other
tool reads a finished run: the CSV log through :func:`mnv3.run_records.collect_runs`, or the
search's ``summary.json``. With the wall time go the peak memory, the CPU time, the machine
(CPU model, cores, torch), the date and the load other processes put on the machine, since this
2-core machine is often shared.

Writes ``bench/reference/demos.json`` (the record) and ``demos.md`` (a table of it), and renders
the README's demo table from the JSON between ``<!-- demos:begin -->`` and ``<!-- demos:end -->``
(:func:`render_readme_table`; ``tests/test_docs.py`` checks the README holds exactly that). A run
of some demos keeps the other demos' earlier records, each with its own date and machine.

    python bench/bench_demos.py                         # every demo whose experiment file exists
    python bench/bench_demos.py --demos textures_quick  # one demo; the others' records are kept
    python bench/bench_demos.py --render-only           # re-render demos.md and the README table
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "bench" / "reference"
DEMOS_JSON = REFERENCE / "demos.json"
README = REPO / "README.md"
MAKEFILE = REPO / "Makefile"
BEGIN, END = "<!-- demos:begin -->", "<!-- demos:end -->"


@dataclass(frozen=True)
class Metric:
    """One number a demo reports: ``how`` is ``best`` / ``final`` (of the CSV log's ``key``) or
    ``summary`` (``key`` of the run folder's ``summary.json``)."""

    label: str
    key: str
    how: str = "final"


@dataclass(frozen=True)
class Demo:
    """A quick demo: the experiment file it runs, with which entry point, and what it reports."""

    name: str
    entry: str
    what: str
    metrics: tuple[Metric, ...]


# The quick demos, in the README's order. A demo whose experiment file does not exist (yet) is
# skipped with a note; adding one is a line here.
DEMOS: tuple[Demo, ...] = (
    Demo(
        "textures_quick",
        "train",
        "classification: MobileNetV3-Small from scratch on generated textures",
        (Metric("test top-1", "test/acc1"), Metric("best val top-1", "val/acc1", "best")),
    ),
    Demo(
        "shapes_detect_quick",
        "train",
        "detection: SSDLite (Small, reduced tail) on generated COCO-layout shapes",
        (Metric("val mAP@0.5", "val/map_50"), Metric("val mAP", "val/map")),
    ),
    Demo(
        "shapes_segment_quick",
        "train",
        "segmentation: LR-ASPP (Small, reduced tail) on generated Cityscapes-layout streets",
        (Metric("val mIoU", "val/miou"),),
    ),
    Demo(
        "netadapt_small_quick",
        "search",
        "NetAdapt: Small to 75 % of its latency measured on this CPU",
        (
            Metric("latency side by side", "latency ratio (final side by side)", "summary"),
            Metric("as judged while searching", "latency ratio (judged each iteration)", "summary"),
            Metric("held-out top-1", "adapted held-out acc", "summary"),
        ),
    ),
    Demo(
        "xray_quick",
        "train",
        "chest X-rays: Small (one gray channel) from scratch on generated 12-bit films",
        (Metric("test AUROC", "test/auroc"), Metric("test AUPRC", "test/auprc")),
    ),
)


def config_dir() -> Path:
    """The project's Hydra config folder (where the experiment files are)."""
    from mnv3.cli import CONFIG_DIR

    return Path(CONFIG_DIR)


def make_targets(makefile: Path = MAKEFILE) -> dict[str, str]:
    """experiment name -> the ``make`` target whose recipe runs ``experiment=<name>``."""
    targets: dict[str, str] = {}
    current = None
    for line in makefile.read_text().splitlines():
        target = re.match(r"^([A-Za-z][\w-]*):", line)
        if target:
            current = target.group(1)
        elif line.startswith("\t") and current:
            for name in re.findall(r"experiment=([\w-]+)", line):
                targets.setdefault(name, current)
    return targets


def command_of(demo: Demo) -> str:
    """The command a user types for ``demo`` (the make target where one runs it)."""
    target = make_targets().get(demo.name)
    return f"make {target}" if target else f"python -m mnv3.{demo.entry} experiment={demo.name}"


# -- running one demo ------------------------------------------------------------------------------
def _machine() -> dict[str, Any]:
    import torch

    from mnv3.cpus import cpu_model

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _children_cpu_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _system_busy_s() -> float | None:
    """Seconds of CPU time the whole machine spent busy since boot (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def read_result(demo: Demo, run_dir: Path) -> list[dict[str, Any]]:
    """The numbers ``demo`` reports, read from its finished run folder.

    A metric the run did not log gets ``value`` None and an ``error`` naming where it was sought.
    ``<key>_ci_low`` / ``<key>_ci_high`` in the log become the metric's interval.
    """
    from mnv3.run_records import collect_runs

    runs = collect_runs(run_dir, wandb=False) if run_dir.is_dir() else []
    run = next((r for r in runs if r.path == run_dir), runs[0] if runs else None)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    out = []
    for metric in demo.metrics:
        value: float | None = None
        interval = None
        if metric.how == "summary":
            raw = summary.get(metric.key)
            value = float(raw) if isinstance(raw, int | float) else None
            where = str(summary_file)
        elif run is not None:
            value = run.best(metric.key) if metric.how == "best" else run.final(metric.key)
            low, high = run.final(f"{metric.key}_ci_low"), run.final(f"{metric.key}_ci_high")
            interval = None if math.isnan(low) or math.isnan(high) else [low, high]
            where = str(run_dir / "csv" / "metrics.csv")
        else:
            where = str(run_dir)
        if value is not None and math.isnan(value):
            value = None
        entry: dict[str, Any] = {"label": metric.label, "key": metric.key, "how": metric.how}
        entry["value"] = value
        entry["interval"] = interval
        if value is None:
            entry["error"] = f"{metric.key} not found in {where}"
        out.append(entry)
    return out


def run_demo(demo: Demo, runs_dir: Path, timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``demo`` as a user would, in its own process; its record for ``demos.json``."""
    run_dir = (runs_dir / demo.name).resolve()
    if run_dir.exists():
        shutil.rmtree(run_dir)  # this script's own earlier run of the demo
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", f"mnv3.{demo.entry}", f"experiment={demo.name}"]
    shown = run_dir.relative_to(REPO) if run_dir.is_relative_to(REPO) else run_dir
    argv.append(f"hydra.run.dir={shown}")
    data_dir = REPO / "data"
    data_before = {p.name for p in data_dir.iterdir()} if data_dir.is_dir() else set()
    record: dict[str, Any] = {
        "name": demo.name,
        "what": demo.what,
        "command": command_of(demo),
        "argv": [Path(argv[0]).name, *argv[1:]],
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _machine(),
        "load average at start (1/5/15 min)": _load_average(),
    }
    busy0, cpu0 = _system_busy_s(), _children_cpu_s()
    log_path = runs_dir / f"{demo.name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = None if timeout_s is None else t0 + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    busy1, cpu = _system_busy_s(), _children_cpu_s() - cpu0
    record["wall s"] = round(wall, 1)
    record["exit status"] = proc.returncode
    record["cpu s"] = round(cpu, 1)
    record["peak memory MiB"] = round(usage.ru_maxrss / 1024)  # Linux: KiB
    if busy0 is not None and busy1 is not None:
        # Cores other processes kept busy on average: the machine's busy time minus the demo's.
        record["other load (cores)"] = round(max(0.0, (busy1 - busy0) - cpu) / wall, 2)
    record["load average at end (1/5/15 min)"] = _load_average()
    data_after = {p.name for p in data_dir.iterdir()} if data_dir.is_dir() else set()
    record["data generated"] = sorted(data_after - data_before)
    log_path = log_path.resolve()
    record["log"] = str(log_path.relative_to(REPO) if log_path.is_relative_to(REPO) else log_path)
    record["metrics"] = read_result(demo, run_dir) if proc.returncode == 0 else []
    return record


# -- rendering -------------------------------------------------------------------------------------
def fmt_time(seconds: float) -> str:
    """``52 s`` or ``7 min 31 s``."""
    s = round(seconds)
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"


def fmt_metric(m: Mapping[str, Any]) -> str:
    """``test top-1 0.993``; a latency ratio as ``0.744x``; an interval in brackets."""
    if m.get("value") is None:
        return f"{m['label']} not logged"
    unit = "x" if "ratio" in m["key"] else ""
    text = f"{m['label']} {m['value']:.3f}{unit}"
    if m.get("interval"):
        low, high = m["interval"]
        text += f" [{low:.3f}-{high:.3f}]"
    return text


def fmt_result(record: Mapping[str, Any]) -> str:
    if record.get("exit status") != 0:
        return f"failed (exit status {record.get('exit status')}, log: `{record.get('log')}`)"
    return ", ".join(fmt_metric(m) for m in record["metrics"])


def _ordered(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    order = {d.name: i for i, d in enumerate(DEMOS)}
    return sorted(records, key=lambda r: order.get(r["name"], len(order)))


def _where(records: Sequence[Mapping[str, Any]]) -> str:
    """One sentence: the dates, machines and loads the records were measured under."""
    dates = sorted({r["date"][:10] for r in records})
    machines = sorted(
        {
            f"{r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}"
            for r in records
        }
    )
    loads = [r["load average at start (1/5/15 min)"][0] for r in records]
    others = [r["other load (cores)"] for r in records if r.get("other load (cores)") is not None]
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    text = f"Measured {when} on {'; '.join(machines)}"
    text += f", 1-minute load average {_span(loads)} at the start"
    if others:
        text += f"; other jobs kept {_span(others)} cores busy meanwhile"
    return text + "."


def _span(values: Sequence[float]) -> str:
    """``1.55`` or ``1.20-1.55``."""
    low, high = f"{min(values):.2f}", f"{max(values):.2f}"
    return low if low == high else f"{low}-{high}"


def render_readme_table(data: Mapping[str, Any]) -> str:
    """The README's demo table (between the markers) from ``demos.json``'s contents."""
    records = _ordered(data["demos"])
    lines = [
        "| command | what it does | result | wall time |",
        "|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| `{r['command']}` | {r['what']} | {fmt_result(r)} | {fmt_time(r['wall s'])} |"
        )
    lines.append("")
    lines.append(
        _where(records)
        + " Each demo is timed as a user runs it, data generation included where it "
        "was not yet on disk, by `python bench/bench_demos.py` "
        "([bench/reference/demos.md](bench/reference/demos.md))."
    )
    return "\n".join(lines)


def render_markdown(data: Mapping[str, Any]) -> str:
    """``demos.md``: every field of the record, one row per demo."""
    records = _ordered(data["demos"])
    lines = [
        "# Quick demos, timed as a user runs them (`python bench/bench_demos.py`)",
        "",
        "| command | result | wall | CPU time (share of wall) | peak memory | other load (cores) | "
        "load average at start | data generated | date | machine |",
        "|---|---|---:|---:|---:|---:|---|---|---|---|",
    ]
    for r in records:
        m = r["machine"]
        load = " / ".join(f"{v:.2f}" for v in r["load average at start (1/5/15 min)"] or [])
        lines.append(
            f"| `{r['command']}` | {fmt_result(r)} | {fmt_time(r['wall s'])} | "
            f"{fmt_time(r['cpu s'])} ({r['cpu s'] / r['wall s']:.2f}) | {r['peak memory MiB']} MiB | "
            f"{r.get('other load (cores)', 'n/a')} | {load} | "
            f"{', '.join(r['data generated']) or 'no (already on disk)'} | {r['date']} | "
            f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']} |"
        )
    lines += [
        "",
        "Wall time: from starting the process to its exit (imports, data generation when the data "
        "was not on disk, training, test). Other load: cores the machine spent busy outside the "
        "demo, on average over its run. Commands: "
        + "; ".join(f"`{r['command']}` = `{' '.join(r['argv'])}`" for r in records)
        + ".",
    ]
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the demo markers replaced by ``block``."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + block + "\n" + text[end:]


def readme_block(text: str) -> str:
    """What lies between the demo markers of ``text`` (without the surrounding newlines)."""
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip("\n")


def write_outputs(data: Mapping[str, Any], out: Path, readme: Path | None) -> None:
    from mnv3.deploy.common import atomic_write_json, atomic_write_text

    atomic_write_json(out / "demos.json", data)
    atomic_write_text(out / "demos.md", render_markdown(data))
    if readme is not None:
        atomic_write_text(readme, replace_block(readme.read_text(), render_readme_table(data)))


def main(argv: Sequence[str] | None = None) -> int:
    names = [d.name for d in DEMOS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demos", nargs="+", choices=names, default=None, help="default: all")
    parser.add_argument("--runs", type=Path, default=REPO / "bench" / "results" / "demo_runs")
    parser.add_argument("--out", type=Path, default=REFERENCE, help="where demos.json/.md go")
    parser.add_argument("--readme", type=Path, default=README, help="README to render into")
    parser.add_argument("--no-readme", action="store_true", help="leave the README as it is")
    parser.add_argument("--render-only", action="store_true", help="run nothing, re-render")
    parser.add_argument(
        "--reread",
        action="store_true",
        help="run nothing: read the results of the chosen demos again from their run folders "
        "(after a change to what a demo reports); times and machine stay as recorded",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per demo")
    args = parser.parse_args(argv)

    json_path = args.out / "demos.json"
    data = json.loads(json_path.read_text()) if json_path.is_file() else {"demos": []}
    failed = 0
    if args.reread:
        for record in data["demos"]:
            demo = next(d for d in DEMOS if d.name == record["name"])
            if args.demos is None or demo.name in args.demos:
                record["metrics"] = read_result(demo, (args.runs / demo.name).resolve())
    elif not args.render_only:
        chosen = [d for d in DEMOS if args.demos is None or d.name in args.demos]
        for demo in chosen:
            if not (config_dir() / "experiment" / f"{demo.name}.yaml").is_file():
                print(f"{demo.name}: no experiment file yet, skipped")
                continue
            print(f"{demo.name}: running {command_of(demo)} ...", flush=True)
            record = run_demo(demo, args.runs, args.timeout)
            print(f"{demo.name}: {fmt_result(record)} in {fmt_time(record['wall s'])}", flush=True)
            failed += record["exit status"] != 0 or any(
                m["value"] is None for m in record["metrics"]
            )
            data["demos"] = _ordered(
                [r for r in data["demos"] if r["name"] != demo.name] + [record]
            )
            # Written after each demo: an interrupted run keeps what it measured.
            write_outputs(data, args.out, None if args.no_readme else args.readme)
    write_outputs(data, args.out, None if args.no_readme else args.readme)
    print(render_readme_table(data))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
