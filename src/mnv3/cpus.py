"""How many CPUs this process may use, and how mnv3 sizes torch threads and DataLoader workers.

A process may use fewer CPUs than the host has: ``taskset`` / SLURM / Kubernetes restrict its
affinity, and a cgroup CPU quota (``docker --cpus``, Kubernetes limits) caps its time.
``os.cpu_count()`` sees neither. :func:`usable_cpus` reads both.

Why size at all (measured, docs/cpu.md): PyTorch's OpenMP threads meet at a barrier after
every parallel op. When the machine is shared, one of them is often descheduled, and the
others spin at the barrier until it runs again. The default ``make train`` epochs (2 cores,
2 torch threads, no workers) took 18.7 s alone and 195 s beside two busy processes (10x);
with 1 torch thread and 1 DataLoader worker, 20.4 s alone and 34.1 s beside them (1.7x).

:func:`cpu_plan` turns the config's requests (``cpu.threads``, ``cpu.interop_threads``,
``data.num_workers``: an integer, or ``"auto"``) into numbers; :func:`apply_cpu_plan` sets
torch's. Nothing here imports Hydra, Lightning or wandb.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform as platform_module
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

AUTO = "auto"
# Most DataLoader workers "auto" starts: past this, more workers rarely feed a model faster.
MAX_AUTO_WORKERS = 8
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class UsableCpus:
    """The CPUs a process may use: ``count`` = min(affinity, ceil(cgroup quota)), at least 1."""

    count: int
    affinity: int
    quota: float | None  # CPUs' worth of time per period; None: no quota

    @property
    def source(self) -> str:
        """Where ``count`` comes from, in words (the run's log and config show it)."""
        quota = "no cgroup CPU quota" if self.quota is None else f"cgroup quota {self.quota:g} CPUs"
        return f"affinity {self.affinity} CPUs, {quota}"


@dataclass(frozen=True)
class CpuPlan:
    """Resolved CPU settings of one training or evaluation process."""

    usable_cpus: int
    source: str
    processes: int  # processes of this run sharing the usable CPUs (DDP on one node)
    threads: int
    interop_threads: int
    num_workers: int
    # Thread counts a training run may switch among as it measures (mnv3.thread_tuner); just
    # ``[threads]`` when the config gives a number.
    thread_candidates: tuple[int, ...] = ()

    def as_config(self) -> dict[str, Any]:
        """Plain values for the run's saved config (``cpu.resolved``)."""
        plain = asdict(self)
        plain["thread_candidates"] = list(self.thread_candidates or (self.threads,))
        return plain

    def describe(self) -> str:
        """One line for the run's log."""
        share = f", shared by {self.processes} processes" if self.processes > 1 else ""
        return (
            f"CPUs: {self.usable_cpus} usable ({self.source}{share}): "
            f"{self.threads} torch threads, {self.interop_threads} inter-op, "
            f"{self.num_workers} DataLoader workers per process"
        )


def cpu_model() -> str:
    """The CPU's model name (with family and model numbers where /proc/cpuinfo has them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform_module.processor() or platform_module.machine()
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    name = info.get("model name", platform_module.machine())
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def pin_malloc() -> str:
    """Keep glibc malloc from handing big activation buffers back to the OS after every call.

    By default glibc serves large blocks with mmap and trims freed heap memory, so a
    MobileNetV2 forward at 224 page-faults ~3000 times (its 4.8 MB expansion maps are
    re-faulted and re-zeroed on every call): ~25% of its eager latency, and a heap-state
    lottery that moved ours/torchvision by +-8% between runs. Fixed thresholds (what jemalloc
    or tcmalloc do anyway) remove that noise for both sides alike. Returns what was done.
    """
    if not sys.platform.startswith("linux"):
        return "platform default"
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1
        ok = libc.mallopt(m_trim_threshold, 1 << 30) == 1 and ok
    except (OSError, AttributeError):
        return "platform default (no glibc mallopt)"
    if not ok:
        return "glibc default (mallopt refused)"
    return "glibc, mallopt M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=1 GiB"


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """Controller -> cgroup path of this process (``""`` is the cgroup v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(","):
            paths[controller] = parts[2]
    return paths


def _ancestors(root: Path, path: str) -> list[Path]:
    """``root/path`` and each folder above it up to ``root``: a quota may sit on any of them."""
    folders = [root]
    current = root
    for part in [p for p in path.split("/") if p]:
        current = current / part
        folders.append(current)
    return folders[::-1]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_quota(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The tightest CPU quota on this process's cgroup or its parents, in CPUs; None if none.

    cgroup v2: ``cpu.max`` holds ``"<quota> <period>"`` or ``"max <period>"``. cgroup v1:
    ``cpu/cpu.cfs_quota_us`` (-1: none) over ``cpu.cfs_period_us``.
    """
    paths = _cgroup_paths(proc_cgroup)
    quotas: list[float] = []
    if "" in paths:
        for folder in _ancestors(root, paths[""]):
            fields = (_read(folder / "cpu.max") or "").split()
            if len(fields) == 2 and fields[0] != "max":
                quotas.append(int(fields[0]) / int(fields[1]))
    for controller in ("cpu", "cpu,cpuacct"):
        if "cpu" not in paths:
            break
        for folder in _ancestors(root / controller, paths["cpu"]):
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota and period and int(quota) > 0 and int(period) > 0:
                quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def usable_cpus() -> UsableCpus:
    """The CPUs this process may use (affinity and cgroup quota; not the host's core count).

    Under SLURM, ``SLURM_CPUS_PER_TASK`` also caps it (where the cluster does not bind tasks
    to their CPUs, the affinity alone would be the whole node).
    """
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows: no affinity call
        affinity = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        quota = float(slurm) if quota is None else min(quota, float(slurm))
    count = affinity if quota is None else min(affinity, max(1, math.ceil(quota)))
    return UsableCpus(count=max(1, count), affinity=affinity, quota=quota)


def processes_per_node(trainer: dict[str, Any]) -> int:
    """How many processes of one run share this node's CPUs, from the trainer config.

    A launcher that starts one process per task says so itself: SLURM tasks have their own
    CPUs (1 here), torchrun sets ``LOCAL_WORLD_SIZE``. Otherwise Lightning's DDP starts one
    process per device (``trainer.devices``: a count, or a list of devices).
    """
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit():
        return max(1, int(local))
    devices = trainer.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        return max(1, len(devices))
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    if devices in ("auto", -1, "-1") and trainer.get("accelerator", "cpu") != "cpu":
        import torch

        return max(1, torch.cuda.device_count())  # Lightning's "auto": every visible GPU
    return 1


def _requested(value: Any, key: str, minimum: int) -> int | None:
    """None for ``"auto"`` (or null), else the integer asked for."""
    if value is None or value == AUTO:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r}: expected 'auto' or an integer >= {minimum}")
    return value


def cpu_plan(
    threads: Any = AUTO,
    interop_threads: Any = AUTO,
    num_workers: Any = AUTO,
    processes: int = 1,
    usable: UsableCpus | None = None,
) -> CpuPlan:
    """Numbers for ``"auto"`` requests, integers kept as given.

    Each of ``processes`` (DDP processes on this node) gets ``usable // processes`` CPUs, at
    least 1. Of those, "auto" gives half to DataLoader workers (at most
    :data:`MAX_AUTO_WORKERS`; none with 1 CPU) and the rest to torch's intra-op threads; the
    inter-op pool gets 1 thread (a model's forward is one chain of ops). On 2 CPUs that is 1
    worker and 1 thread, the setting that holds up beside busy processes. With "auto" threads,
    ``thread_candidates`` also offers 1 and the whole share, for a training run to measure
    (:class:`mnv3.thread_tuner.ThreadTuner`): 2 threads are faster on a quiet 2-core machine.
    """
    usable = usable or usable_cpus()
    share = max(1, usable.count // max(1, processes))
    workers = _requested(num_workers, "data.num_workers", 0)
    if workers is None:
        workers = min(share // 2, MAX_AUTO_WORKERS)
    intra = _requested(threads, "cpu.threads", 1)
    candidates: tuple[int, ...] = (intra,) if intra is not None else ()
    if intra is None:
        intra = max(1, share - workers)
        candidates = tuple(sorted({1, intra, share}))
    inter = _requested(interop_threads, "cpu.interop_threads", 1) or 1
    return CpuPlan(
        usable_cpus=usable.count,
        source=usable.source,
        processes=max(1, processes),
        threads=intra,
        interop_threads=inter,
        num_workers=workers,
        thread_candidates=candidates,
    )


def apply_cpu_plan(plan: CpuPlan) -> None:
    """Set torch's intra-op threads, and its inter-op threads while that can still be set.

    The inter-op pool can be sized once per process, before any inter-op work; a process that
    already started it (a notebook, a second run in one multirun process) keeps its pool.
    """
    import torch

    torch.set_num_threads(plan.threads)
    if torch.get_num_interop_threads() != plan.interop_threads:
        # Already started: keep it (it only runs torch.jit.fork / async work).
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(plan.interop_threads)
