"""Where latency is measured: a runtime, a thread count and an input size (the ``platform`` group).

The paper measures every candidate on the phone it targets (§4: Pixel 1 big core, TFLite); a
user's target is their own CPU and runtime. A :class:`Platform` turns a network into the callable
that runtime executes (:data:`RUNTIMES`: PyTorch eager, onnxruntime, ExecuTorch's XNNPACK, each
built with :mod:`mnv3.deploy`) and times it: warm-up calls, then single calls until the median is
known to ``precision`` (95 % order-statistic interval of the median) or ``max_runs`` is reached.
Every :class:`Latency` records the CPU model, the runtime and its version, the threads and the
input size beside the number, so a latency never travels without its platform.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnv3.cpus import cpu_model, pin_malloc
from mnv3.errors import ConfigError

Call = Callable[[], object]
# runtime name -> (network, example input, threads, scratch folder) -> (callable, runtime version)
Runtime = Callable[[nn.Module, torch.Tensor, int, Path], tuple[Call, str]]


def _torch(network: nn.Module, x: torch.Tensor, threads: int, scratch: Path) -> tuple[Call, str]:
    """The network as PyTorch runs it: eval mode, inference mode, ``threads`` intra-op threads."""
    network = network.eval()

    def call() -> object:
        with torch.inference_mode():
            return network(x)

    torch.set_num_threads(threads)
    return call, f"torch {torch.__version__}"


def _onnxruntime(
    network: nn.Module, x: torch.Tensor, threads: int, scratch: Path
) -> tuple[Call, str]:
    """The network exported to ONNX (fixed batch) and run by an onnxruntime CPU session."""
    import onnxruntime

    from mnv3.deploy import export_onnx, onnx_session, run_onnx

    path = export_onnx(network.eval(), scratch / "network.onnx", x, dynamic_batch=False)
    session, images = onnx_session(path, threads=threads), x.numpy()
    return (lambda: run_onnx(session, images)), f"onnxruntime {onnxruntime.__version__}"


_XNNPACK_THREADS: list[int] = []  # the process-wide threadpool size, once set


def _xnnpack(network: nn.Module, x: torch.Tensor, threads: int, scratch: Path) -> tuple[Call, str]:
    """The network as an ExecuTorch program with the XNNPACK delegate (what runs on a phone).

    ExecuTorch's XNNPACK threadpool is process-wide and cannot be resized once a program is
    loaded (resizing deadlocked executorch 1.5.1), so one process measures one thread count.
    """
    from importlib.metadata import version

    from executorch.extension.pybindings import portable_lib

    from mnv3.deploy import export_pte, load_pte, run_pte

    if not _XNNPACK_THREADS:
        portable_lib._unsafe_reset_threadpool(threads)
        _XNNPACK_THREADS.append(threads)
    elif _XNNPACK_THREADS[0] != threads:
        raise ConfigError(
            f"platform.threads={threads} but this process already measures XNNPACK with "
            f"{_XNNPACK_THREADS[0]} threads; expected one thread count per process"
        )
    method = load_pte(export_pte(network.eval(), scratch / "network.pte", x))
    return (lambda: run_pte(method, x)), f"executorch {version('executorch')} (XNNPACK)"


RUNTIMES: dict[str, Runtime] = {"torch": _torch, "onnxruntime": _onnxruntime, "xnnpack": _xnnpack}


@dataclass(frozen=True)
class Latency:
    """One measured latency (median ms of single batch-1 calls) and where it was measured."""

    ms: float
    low_ms: float  # 95 % interval of the median (order statistics)
    high_ms: float
    runs: int
    platform: str
    runtime: str
    threads: int
    input_size: tuple[int, int]
    cpu: str
    allocator: str = "default"

    def to_plain(self) -> dict[str, Any]:
        """Plain types for a CSV row, a JSON cache or a W&B log."""
        plain = asdict(self)
        plain["input_size"] = list(self.input_size)
        return plain


def median_interval(times: list[float], z: float = 1.96) -> tuple[float, float]:
    """The ~95 % distribution-free interval of the median of ``times`` (binomial order
    statistics: ranks n/2 -+ z sqrt(n)/2), as (low, high)."""
    ordered = sorted(times)
    n = len(ordered)
    half = z * math.sqrt(n) / 2
    low = max(math.floor(n / 2 - half), 0)
    high = min(math.ceil(n / 2 + half), n - 1)
    return ordered[low], ordered[high]


@dataclass(frozen=True)
class Platform:
    """A runtime, its threads and the input size; the timing rule every measurement follows."""

    name: str
    runtime: str = "torch"
    threads: int = 1
    input_size: tuple[int, int] = (224, 224)
    warmup: int = 10
    min_runs: int = 30
    max_runs: int = 1000
    precision: float = 0.01  # stop when the median's interval is within +-1 %
    budget_s: float = 20.0  # and at most this long per network
    # Fixed glibc malloc thresholds for the whole process (mnv3.cpus.pin_malloc): without them
    # the same network measured 5.60 and 6.03 ms in two fresh processes.
    pin_malloc: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Platform:
        """The platform of a ``platform`` group entry, refused in one sentence where it is wrong."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(
                f"platform.{unknown[0]} is not a platform setting; expected {', '.join(sorted(known))}"
            )
        if cfg.get("runtime", "torch") not in RUNTIMES:
            raise ConfigError(
                f"platform.runtime={cfg.get('runtime')!r} is unknown; expected one of "
                f"{', '.join(RUNTIMES)}"
            )
        for key, least in (("threads", 1), ("warmup", 0), ("min_runs", 1), ("max_runs", 1)):
            value = cfg.get(key, least)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"platform.{key}={value!r}; expected an integer >= {least}")
        size = cfg.get("input_size", [224, 224])
        size = [size, size] if isinstance(size, int) else list(size)
        if len(size) != 2 or not all(isinstance(v, int) and v >= 32 for v in size):
            raise ConfigError(f"platform.input_size={size!r}; expected [H, W], each at least 32")
        plain = {**dict(cfg), "input_size": (int(size[0]), int(size[1]))}
        return cls(**plain)

    def example_input(self, channels: int = 3) -> torch.Tensor:
        """The batch-1 input every measurement on this platform uses (fixed seed)."""
        generator = torch.Generator().manual_seed(0)
        return torch.randn(1, channels, *self.input_size, generator=generator)

    def prepare(
        self, network: nn.Module, scratch: Path, x: torch.Tensor | None = None
    ) -> tuple[Call, str]:
        """The callable this platform's runtime executes for ``network`` on ``x`` (default: the
        platform's example input), and the runtime's version."""
        x = self.example_input() if x is None else x
        return RUNTIMES[self.runtime](network, x, self.threads, scratch)

    def time_calls(
        self, call: Call, timer: Callable[[], float] = time.perf_counter
    ) -> tuple[list[float], float, float]:
        """Warm up, then time single calls until the median is known to ``precision``, the
        budget is spent or ``max_runs`` is reached; returns (seconds per call, interval)."""
        for _ in range(self.warmup):
            call()
        times: list[float] = []
        start = timer()
        low = high = 0.0
        while len(times) < self.max_runs:
            t0 = timer()
            call()
            times.append(timer() - t0)
            if len(times) >= self.min_runs and len(times) % 10 == 0:
                low, high = median_interval(times)
                median = statistics.median(times)
                if high - low <= 2 * self.precision * median or timer() - start > self.budget_s:
                    break
        low, high = median_interval(times)
        return times, low, high

    def measure_interleaved(
        self, networks: Mapping[str, nn.Module], rounds: int
    ) -> dict[str, Latency]:
        """Median latencies of several networks timed in the same time windows: each of
        ``rounds`` rounds calls every network once, in alternating order, so a machine whose
        speed drifts (a shared VM) moves them all alike and their ranking survives."""
        allocator = pin_malloc() if self.pin_malloc else "default"
        previous = torch.get_num_threads()
        times: dict[str, list[float]] = {name: [] for name in networks}
        try:
            with tempfile.TemporaryDirectory(prefix="mnv3_platform_") as scratch:
                calls, runtime = {}, ""
                for i, (name, network) in enumerate(networks.items()):
                    folder = Path(scratch) / str(i)
                    folder.mkdir()
                    calls[name], runtime = self.prepare(network, folder)
                for call in calls.values():
                    for _ in range(self.warmup):
                        call()
                order = list(calls.items())
                for r in range(rounds):
                    for name, call in order if r % 2 == 0 else order[::-1]:
                        t0 = time.perf_counter()
                        call()
                        times[name].append(time.perf_counter() - t0)
        finally:
            torch.set_num_threads(previous)
        return {
            name: self._latency(values, runtime, allocator, self.input_size)
            for name, values in times.items()
        }

    def _latency(
        self, times: list[float], runtime: str, allocator: str, input_size: tuple[int, int]
    ) -> Latency:
        """The record of timed calls (seconds): median and its interval in ms, and where."""
        low, high = median_interval(times)
        return Latency(
            ms=statistics.median(times) * 1e3,
            low_ms=low * 1e3,
            high_ms=high * 1e3,
            runs=len(times),
            platform=self.name,
            runtime=runtime,
            threads=self.threads,
            input_size=input_size,
            cpu=cpu_model(),
            allocator=allocator,
        )

    def measure(self, network: nn.Module, x: torch.Tensor | None = None) -> Latency:
        """Median batch-1 latency of ``network`` on this platform (on ``x``, default the
        platform's example input), with where it was measured."""
        allocator = pin_malloc() if self.pin_malloc else "default"
        previous = torch.get_num_threads()
        try:
            with tempfile.TemporaryDirectory(prefix="mnv3_platform_") as scratch:
                call, runtime = self.prepare(network, Path(scratch), x)
                times, _, _ = self.time_calls(call)
        finally:
            torch.set_num_threads(previous)
        size = self.input_size if x is None else (int(x.shape[-2]), int(x.shape[-1]))
        return self._latency(times, runtime, allocator, size)
