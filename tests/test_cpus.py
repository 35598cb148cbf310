"""CPU sizing (mnv3.cpus): the usable CPUs from affinity and cgroup files in their on-disk
format, the plan "auto" makes of them, and a training config that records and applies it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import QUIET, TINY_DATA, compose_train
from mnv3.cli import size_cpus
from mnv3.cpus import (
    MAX_AUTO_WORKERS,
    UsableCpus,
    apply_cpu_plan,
    cgroup_cpu_quota,
    cpu_plan,
    processes_per_node,
    usable_cpus,
)
from mnv3.thread_tuner import ThreadTuner, thread_tuner


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_tightest_on_the_path(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc_cgroup"
    _write(proc, "0::/user.slice/job\n")
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "user.slice" / "cpu.max", "250000 100000\n")
    _write(root / "user.slice" / "job" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(2.5)
    _write(root / "user.slice" / "job" / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(1.5)


def test_cgroup_v1_quota_and_no_quota(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc_cgroup"
    _write(proc, "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(root, proc) is None
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "300000\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(3.0)
    assert cgroup_cpu_quota(tmp_path / "absent", tmp_path / "absent_proc") is None


def test_usable_cpus_follow_affinity_and_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    allowed = os.sched_getaffinity(0)
    assert usable_cpus().affinity == len(allowed)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        one = usable_cpus()
    finally:
        os.sched_setaffinity(0, allowed)
    assert (one.affinity, one.count) == (1, 1)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert usable_cpus().count == 1


@pytest.mark.parametrize(
    ("cpus", "processes", "threads", "workers"),
    [
        (1, 1, 1, 0),  # one CPU: load in the main process
        (2, 1, 1, 1),  # the measured best on 2 cores, alone and beside busy processes
        (4, 1, 2, 2),
        (16, 1, 8, MAX_AUTO_WORKERS),
        (64, 1, 64 - MAX_AUTO_WORKERS, MAX_AUTO_WORKERS),
        (16, 4, 2, 2),  # 4 DDP processes share the node
        (2, 4, 1, 0),  # more processes than CPUs: 1 thread each, never 0
    ],
)
def test_auto_plan(cpus: int, processes: int, threads: int, workers: int) -> None:
    plan = cpu_plan(processes=processes, usable=UsableCpus(cpus, cpus, None))
    assert (plan.threads, plan.num_workers, plan.interop_threads) == (threads, workers, 1)
    assert plan.threads + plan.num_workers <= max(1, cpus // processes)


def test_explicit_numbers_are_kept_and_bad_ones_named() -> None:
    usable = UsableCpus(2, 2, None)
    plan = cpu_plan(threads=3, interop_threads=2, num_workers=0, usable=usable)
    assert (plan.threads, plan.interop_threads, plan.num_workers) == (3, 2, 0)
    assert cpu_plan(threads=4, usable=usable).num_workers == 1  # workers still auto
    with pytest.raises(ValueError, match=r"cpu.threads=0: expected 'auto' or an integer >= 1"):
        cpu_plan(threads=0, usable=usable)
    with pytest.raises(ValueError, match=r"data.num_workers=True"):
        cpu_plan(num_workers=True, usable=usable)


def test_processes_per_node(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert processes_per_node({"devices": 2, "strategy": "ddp"}) == 2
    assert processes_per_node({"devices": [0, 1, 2]}) == 3
    assert processes_per_node({"devices": "auto", "accelerator": "cpu"}) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert processes_per_node({"devices": 1}) == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")  # each SLURM task has its own CPUs
    assert processes_per_node({"devices": 4}) == 1


def test_train_config_records_and_applies_the_plan(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    cfg = compose_train(tmp_path, [*TINY_DATA, *QUIET, "cpu.threads=3", "data.num_workers=auto"])
    try:
        plan = size_cpus(cfg)
        assert torch.get_num_threads() == 3
    finally:
        apply_cpu_plan(plan.__class__(**{**plan.as_config(), "threads": before}))
    resolved = cfg.cpu.resolved
    assert (resolved.threads, resolved.num_workers) == (3, plan.num_workers)
    assert resolved.usable_cpus == usable_cpus().count
    assert cfg.cpu.threads == 3 and cfg.data.num_workers == "auto"  # the request stays


def _drive(tuner: ThreadTuner, cost: dict[int, float], steps: int, start: int = 0) -> list[int]:
    """Run ``steps`` simulated steps whose time depends on the thread count; the counts used."""
    used, threads = [], tuner.current
    for step in range(start, start + steps):
        used.append(threads)
        threads = tuner.observe(cost[threads], step)
        assert torch.get_num_threads() == threads
    return used


def test_thread_tuner_follows_the_machine() -> None:
    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner([1, 2], start=1, first_probe=8, min_period=40)
        quiet = {1: 1.0, 2: 0.7}  # 2 threads faster alone
        used = _drive(tuner, quiet, 60)
        assert tuner.current == 2 and used[-1] == 2 and tuner.history[0][1] == 2
        busy = {1: 1.2, 2: 12.0}  # beside busy processes: 2 threads wait at every barrier
        used = _drive(tuner, busy, 200, start=60)
        assert tuner.current == 1
        slow_steps = sum(1 for t in used if t == 2)
        # The slowdown itself starts a probe within a few steps; each later probe of 2 threads
        # stops after its first slow step.
        assert slow_steps <= 10
        assert tuner.period > tuner.min_period  # confirmations back off
    finally:
        torch.set_num_threads(before)


def test_thread_tuner_is_only_added_when_there_is_a_choice() -> None:
    plan = cpu_plan(usable=UsableCpus(2, 2, None)).as_config()
    assert plan["thread_candidates"] == [1, 2]
    assert thread_tuner({"resolved": plan}, "cpu") is not None
    assert thread_tuner({"resolved": plan, "tune_threads": False}, "cpu") is None
    fixed = cpu_plan(threads=2, usable=UsableCpus(2, 2, None)).as_config()
    assert thread_tuner({"resolved": fixed}, "cpu") is None
    assert thread_tuner({"resolved": plan}, "gpu") is None
