"""Where latency is measured: a runtime, a thread count and an input size (the ``platform`` group).

The paper measures every candidate on the phone it targets (§4: Pixel 1 big core, TFLite); a
user's target is their own CPU and runtime. A :class:`Platform` turns a network into the callable
that runtime executes (:data:`RUNTIMES`: PyTorch eager, onnxruntime, ExecuTorch's XNNPACK, each
built with :mod:`mnv3.deploy`) and times it: warm-up calls, then single calls until the reported
statistic (:data:`STATISTICS`: a quantile, or the mean of the calls below one) is known to
``precision`` (a 95 % interval) or ``max_runs`` is reached.
Every :class:`Latency` records the CPU model, the runtime and its version, the threads and the
input size beside the number, so a latency never travels without its platform.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
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
    """One measured latency (ms: the platform's statistic of single batch-1 calls) and where.

    On a platform with a ``reference`` network, ``ratio`` is this network's statistic over the
    reference's in the same time windows and ``ms`` is ``ratio * reference_ms`` (the interval
    is the ratio's); ``raw_ms`` is always the network's own number (``ms`` without a reference).
    """

    ms: float
    low_ms: float  # ~95 % interval of the statistic (or of the ratio), scaled like ms
    high_ms: float
    runs: int
    platform: str
    runtime: str
    threads: int
    input_size: tuple[int, int]
    cpu: str
    allocator: str = "default"
    quantile: float = 0.5
    statistic: str = "quantile"
    raw_ms: float | None = None
    ratio: float | None = None
    reference: str | None = None

    def to_plain(self) -> dict[str, Any]:
        """Plain types for a CSV row, a JSON cache or a W&B log."""
        plain = asdict(self)
        plain["input_size"] = list(self.input_size)
        return plain


def quantile_interval(times: list[float], q: float = 0.5, z: float = 1.96) -> tuple[float, float]:
    """The ~95 % distribution-free interval of the ``q`` quantile of ``times`` (binomial order
    statistics: ranks n q -+ z sqrt(n q (1 - q))), as (low, high)."""
    ordered = sorted(times)
    n = len(ordered)
    half = z * math.sqrt(n * q * (1 - q))
    low = max(math.floor(n * q - half), 0)
    high = min(math.ceil(n * q + half), n - 1)
    return ordered[low], ordered[high]


def median_interval(times: list[float], z: float = 1.96) -> tuple[float, float]:
    """The ~95 % distribution-free interval of the median of ``times`` (ranks n/2 -+ z sqrt(n)/2)."""
    return quantile_interval(times, 0.5, z)


def quantile(times: list[float], q: float) -> float:
    """The ``q`` quantile of ``times`` (linear between order statistics; q = 0.5 is the median)."""
    ordered = sorted(times)
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def lower_mean(times: list[float], q: float) -> float:
    """The mean of the fastest ``ceil(n q)`` of ``times`` (q = 0.5: the fastest half): the calls a
    busy machine did not slow down, averaged, which repeats better than one order statistic
    (docs/search.md measures it)."""
    ordered = sorted(times)
    k = max(1, math.ceil(len(ordered) * q))
    return sum(ordered[:k]) / k


# t_{0.975} for (batches - 1) degrees of freedom: the batch-means interval below
_BATCHES, _T975 = 10, 2.262


def batch_interval(statistic: Callable[[int, int], float], n: int) -> tuple[float, float]:
    """The ~95 % batch-means interval of a statistic of ``n`` consecutive rounds:
    ``statistic(start, stop)`` is computed on the whole run and on 10 contiguous batches, and
    their spread (Student t, 9 degrees of freedom) gives the interval's half width. The batches
    are consecutive in time, so a machine whose speed drifts during the run widens it, as it
    widens the spread between fresh processes (order statistics assume independent calls)."""
    size = n // _BATCHES
    if size < 1:  # fewer rounds than batches: nothing yet says how far off the value may be
        return -math.inf, math.inf
    centre = statistic(0, n)
    values = [statistic(i * size, (i + 1) * size) for i in range(_BATCHES)]
    mean = sum(values) / _BATCHES
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (_BATCHES - 1))
    half = _T975 * spread / math.sqrt(_BATCHES)
    return centre - half, centre + half


@dataclass(frozen=True)
class Statistic:
    """How a run of timed calls becomes one number: ``value(times, q)``, and ``interval(times,
    q)`` for a single series of independent calls (None: batch means, :func:`batch_interval`).
    A ratio to a reference always takes the batch-means interval."""

    value: Callable[[list[float], float], float]
    interval: Callable[[list[float], float], tuple[float, float]] | None


STATISTICS: dict[str, Statistic] = {
    "quantile": Statistic(quantile, quantile_interval),
    "lower_mean": Statistic(lower_mean, None),
}


# reference_ms calibrated in this process, per calibration file (or per platform without one)
_CALIBRATED: dict[str, float] = {}
# The reference (and the per-block table's anchor) as each runtime runs it, prepared once per
# process (runtime, threads, name, input shape): an ONNX or ExecuTorch export costs seconds, and
# every measurement on a platform with a reference times one. The scratch folder lives as long
# as the process.
_PREPARED: dict[tuple[Any, ...], tuple[Call, tempfile.TemporaryDirectory[str]]] = {}


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
    precision: float = 0.01  # stop when the quantile's interval is within +-1 %
    budget_s: float = 20.0  # and at most this long per network
    # Fixed glibc malloc thresholds for the whole process (mnv3.cpus.pin_malloc): without them
    # the same network measured 5.60 and 6.03 ms in two fresh processes.
    pin_malloc: bool = True
    # The statistic reported (STATISTICS): "quantile", the ``quantile`` quantile (0.5: the
    # median; 0.1 keeps the calls a busy machine did not interrupt), or "lower_mean", the mean
    # of the calls at or below it (bench/bench_latency_table.py measures the rules).
    statistic: str = "quantile"
    quantile: float = 0.5
    # A backbone (registry name) timed beside every network in the same windows: a shared
    # machine's speed moves both alike, so the ratio repeats where plain numbers do not.
    reference: str | None = None
    # The reference's latency in ms that ratios are multiplied by; null: measured alone once and
    # kept in ``calibration`` (a JSON file) so every later process uses the same number.
    reference_ms: float | None = None
    calibration: str | None = None

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
        if cfg.get("statistic", "quantile") not in STATISTICS:
            raise ConfigError(
                f"platform.statistic={cfg.get('statistic')!r} is unknown; expected one of "
                f"{', '.join(STATISTICS)}"
            )
        q = cfg.get("quantile", 0.5)
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q < 1:
            raise ConfigError(f"platform.quantile={q!r}; expected a number between 0 and 1")
        reference = cfg.get("reference")
        if reference is not None:
            from mnv3.models.backbone import BACKBONES

            if reference not in BACKBONES:
                raise ConfigError(
                    f"platform.reference={reference!r} is not a backbone; expected one of "
                    f"{', '.join(sorted(BACKBONES))} or null"
                )
        calibration = cfg.get("calibration")
        if reference is not None and calibration is not None and "${" in str(calibration):
            raise ConfigError(
                f"platform.calibration={calibration!r} is an unresolved interpolation; expected "
                "a file path (resolve the config first, or set platform.calibration)"
            )
        ref_ms = cfg.get("reference_ms")
        if ref_ms is not None and (
            isinstance(ref_ms, bool) or not isinstance(ref_ms, int | float) or ref_ms <= 0
        ):
            raise ConfigError(
                f"platform.reference_ms={ref_ms!r}; expected a positive number or null"
            )
        plain = {**dict(cfg), "input_size": (int(size[0]), int(size[1])), "quantile": float(q)}
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

    def estimate(
        self, times: list[float], reference: list[float] | None = None
    ) -> tuple[float, float, float]:
        """The statistic of ``times`` (or, with ``reference`` timed in the same rounds, the
        ratio of the two statistics) and its ~95 % interval, as (value, low, high)."""
        rule = STATISTICS[self.statistic]
        if reference is None and rule.interval is not None:
            low, high = rule.interval(times, self.quantile)
            return rule.value(times, self.quantile), low, high
        n = min(len(times), len(reference) if reference is not None else len(times))

        def statistic(start: int, stop: int) -> float:
            value = rule.value(times[start:stop], self.quantile)
            if reference is None:
                return value
            return value / rule.value(reference[start:stop], self.quantile)

        value = statistic(0, n)
        low, high = batch_interval(statistic, n)
        return value, low, high

    def settled(self, times: list[float], reference: list[float] | None = None) -> bool:
        """Whether the statistic of ``times`` (its ratio to ``reference``) is known to
        ``precision`` (95 % interval)."""
        value, low, high = self.estimate(times, reference)
        return high - low <= 2 * self.precision * value

    def time_calls(
        self, call: Call, timer: Callable[[], float] = time.perf_counter
    ) -> tuple[list[float], float, float]:
        """Warm up, then time single calls until the statistic is known to ``precision``, the
        budget is spent or ``max_runs`` is reached; returns (seconds per call, interval)."""
        times = self._time_rounds({"network": call}, None, timer)["network"]
        _, low, high = self.estimate(times)
        return times, low, high

    def _time_rounds(
        self,
        calls: Mapping[str, Call],
        rounds: int | None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> dict[str, list[float]]:
        """Warm every call up, then time rounds that call each once, in alternating order (a
        machine whose speed drifts moves them all alike). ``rounds`` fixed, or None: until the
        first call's statistic (its ratio to the reference, if one is timed) has ``settled``, the
        budget is spent or ``max_runs`` is reached."""
        for call in calls.values():
            for _ in range(self.warmup):
                call()
        times: dict[str, list[float]] = {name: [] for name in calls}
        first, reference = times[next(iter(calls))], times.get(_REFERENCE)
        order = list(calls.items())
        start = timer()
        r = 0
        while len(first) < (self.max_runs if rounds is None else rounds):
            for name, call in order if r % 2 == 0 else order[::-1]:
                t0 = timer()
                call()
                times[name].append(timer() - t0)
            r += 1
            n = len(first)
            check = rounds is None and n >= self.min_runs and n % 10 == 0
            if check and (self.settled(first, reference) or timer() - start > self.budget_s):
                break
        return times

    def _run(
        self,
        networks: Mapping[str, nn.Module],
        rounds: int | None,
        x: torch.Tensor | None = None,
        anchor: tuple[nn.Module, torch.Tensor] | None = None,
        anchor_key: str | None = None,
    ) -> dict[str, Latency]:
        """Prepare ``networks`` and time them in the same rounds, beside ``anchor`` (a module and
        its input: every latency gets its ratio to it; with ``anchor_key``, prepared once per
        process) or else the platform's reference (the ratio, and ms scaled to the calibrated
        reference)."""
        allocator = pin_malloc() if self.pin_malloc else "default"
        previous = torch.get_num_threads()
        reference_ms = None
        reference_call = None
        if anchor is None and self.reference:
            reference_ms = self.reference_latency()
            reference_call = self._prepared(
                f"reference {self.reference}", self._reference_network, self.example_input()
            )
        elif anchor is not None and anchor_key is not None:
            module = anchor[0]
            reference_call = self._prepared(anchor_key, lambda: module, anchor[1])
        try:
            with tempfile.TemporaryDirectory(prefix="mnv3_platform_") as scratch:
                calls, runtime = {}, ""
                for i, (name, network) in enumerate(networks.items()):
                    folder = Path(scratch) / str(i)
                    folder.mkdir()
                    calls[name], runtime = self.prepare(network, folder, x)
                if reference_call is not None:
                    calls[_REFERENCE] = reference_call
                elif anchor is not None:
                    (Path(scratch) / "anchor").mkdir()
                    calls[_REFERENCE] = self.prepare(
                        anchor[0], Path(scratch) / "anchor", anchor[1]
                    )[0]
                times = self._time_rounds(calls, rounds)
        finally:
            torch.set_num_threads(previous)
        size = self.input_size if x is None else (int(x.shape[-2]), int(x.shape[-1]))
        reference = times.pop(_REFERENCE, None)
        return {
            name: self._latency(values, runtime, allocator, size, reference, reference_ms)
            for name, values in times.items()
        }

    def measure_ratio(
        self,
        network: nn.Module,
        x: torch.Tensor,
        anchor: nn.Module,
        anchor_x: torch.Tensor,
        anchor_key: str | None = None,
    ) -> float:
        """``network``'s time on ``x`` over ``anchor``'s on ``anchor_x``, timed in the same rounds
        until the ratio is known to ``precision``: a unitless number that a machine's drifting
        speed leaves alone (the per-block table's entries on a platform with a reference).
        ``anchor_key`` names an anchor that stays the same in this process: it is then prepared
        (on onnxruntime and XNNPACK: exported) once and reused, as the reference is."""
        latency = self._run(
            {"network": network}, None, x, anchor=(anchor, anchor_x), anchor_key=anchor_key
        )["network"]
        assert latency.ratio is not None
        return latency.ratio

    def measure_interleaved(
        self, networks: Mapping[str, nn.Module], rounds: int
    ) -> dict[str, Latency]:
        """Latencies of several networks timed in the same time windows: each of ``rounds``
        rounds calls every network once (and the reference, if any), in alternating order, so
        a machine whose speed drifts (a shared VM) moves them all alike and their ranking
        survives."""
        return self._run(networks, rounds)

    def measure(self, network: nn.Module, x: torch.Tensor | None = None) -> Latency:
        """Batch-1 latency of ``network`` on this platform (on ``x``, default the platform's
        example input), with where it was measured: timed until its quantile is known to
        ``precision`` or the budget is spent, beside the reference if the platform has one."""
        return self._run({"network": network}, None, x)["network"]

    def _latency(
        self,
        times: list[float],
        runtime: str,
        allocator: str,
        input_size: tuple[int, int],
        reference: list[float] | None = None,
        reference_ms: float | None = None,
    ) -> Latency:
        """The record of timed calls (seconds): the statistic and its interval in ms, and where;
        with a reference, the ratio of the two statistics (and its interval) scaled to the
        calibrated reference."""
        own, low, high = self.estimate(times)
        ms, low_ms, high_ms, ratio = own * 1e3, low * 1e3, high * 1e3, None
        if reference is not None:
            ratio, low, high = self.estimate(times, reference)
            # ms per unit of ratio: the calibrated reference, else this run's own number
            unit = reference_ms if reference_ms is not None else ms / ratio
            ms, low_ms, high_ms = ratio * unit, low * unit, high * unit
        return Latency(
            ms=ms,
            low_ms=low_ms,
            high_ms=high_ms,
            runs=len(times),
            platform=self.name,
            runtime=runtime,
            threads=self.threads,
            input_size=input_size,
            cpu=cpu_model(),
            allocator=allocator,
            quantile=self.quantile,
            statistic=self.statistic,
            raw_ms=own * 1e3,
            ratio=ratio,
            reference=self.reference,
        )

    def _reference_network(self) -> nn.Module:
        from mnv3.models import build_backbone

        assert self.reference is not None
        return build_backbone(self.reference, num_classes=1000)

    def _prepared(self, name: str, build: Callable[[], nn.Module], x: torch.Tensor) -> Call:
        """The module ``build`` returns, as this platform's runtime calls it on ``x``, prepared
        (exported) once per process under ``name`` (:data:`_PREPARED`) and reused by every later
        measurement: the reference, and the per-block table's anchor."""
        key = (self.runtime, self.threads, name, tuple(x.shape))
        if key not in _PREPARED:
            scratch = tempfile.TemporaryDirectory(prefix="mnv3_reference_")
            call, _ = self.prepare(build(), Path(scratch.name), x)
            _PREPARED[key] = (call, scratch)
        return _PREPARED[key][0]

    def fingerprint(self) -> dict[str, Any]:
        """What a calibrated reference latency depends on: CPU, runtime, threads, input, rule."""
        return {
            "cpu": cpu_model(),
            "platform": self.name,
            "runtime": self.runtime,
            "threads": self.threads,
            "input_size": list(self.input_size),
            "statistic": self.statistic,
            "quantile": self.quantile,
            "reference": self.reference,
            "torch": torch.__version__,
        }

    def record(self, calibrated: bool = True) -> dict[str, Any]:
        """What this platform's milliseconds depend on, as plain JSON values: the fingerprint
        (CPU, runtime, threads, input, timing rule, reference) and, if ``calibrated``, the
        reference's calibrated ms (the unit every ratio is multiplied by; None without a
        reference). A search keeps it in its state."""
        plain = self.fingerprint()
        if calibrated:
            plain["reference_ms"] = self.reference_latency() if self.reference else None
        return json.loads(json.dumps(plain))

    def check_resumed(
        self, saved: Mapping[str, Any] | None, state_file: Path, calibrated: bool = True
    ) -> None:
        """Refuse, in one sentence, to resume the search of ``state_file`` on a platform that
        measures differently from the one it started on (``saved``, its :meth:`record`): the
        new milliseconds would not compare with its saved ones. ``calibrated=False`` compares
        the fingerprint only (no calibration is read or made: the CLI's check before it saves
        the run's config). States written before the record existed (``saved`` None) are taken
        as they are."""
        if saved is None:
            return
        now = self.record(calibrated)
        keys = {*now, *(key for key in saved if calibrated or key != "reference_ms")}
        changed = [key for key in sorted(keys) if saved.get(key) != now.get(key)]
        if changed:
            key = changed[0]
            raise ConfigError(
                f"{state_file}: this search measured with {key}={saved.get(key)!r} and this run "
                f"would measure with {key}={now.get(key)!r}; expected the platform it started "
                "with, so that its milliseconds compare with the saved ones (a new search needs "
                "a new run folder)"
            )

    def reference_latency(self) -> float:
        """The reference network's latency (ms) that ratios are scaled by: ``reference_ms`` if
        set, else the ``calibration`` file's entry for this platform's fingerprint, else
        measured alone now (to ``precision``, three times the budget) and added to that file,
        so every later process on this platform scales by the same number."""
        if self.reference_ms is not None:
            return float(self.reference_ms)
        key = json.dumps([self.calibration, self.fingerprint()], sort_keys=True)
        if key in _CALIBRATED:
            return _CALIBRATED[key]
        path = Path(self.calibration) if self.calibration else None
        entries: list[dict[str, Any]] = []
        if path is not None and path.is_file():
            try:
                entries = list(json.loads(path.read_text())["entries"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"platform calibration {path} cannot be read ({exc!r}); delete it"
                ) from None
        for entry in entries:
            if entry.get("fingerprint") == self.fingerprint():
                _CALIBRATED[key] = float(entry["reference_ms"])
                return _CALIBRATED[key]
        alone = replace(self, reference=None, budget_s=3 * self.budget_s)
        latency = alone.measure(self._reference_network())
        _CALIBRATED[key] = latency.ms
        if path is not None:
            from mnv3.deploy.common import atomic_write_json

            entry = {"fingerprint": self.fingerprint(), "reference_ms": latency.ms}
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"entries": [*entries, entry | latency.to_plain()]})
        return latency.ms


_REFERENCE = "\0reference"  # the reference's key among timed calls (no user name is this)
