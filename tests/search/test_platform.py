"""Where latency is measured: the timing rule (on a fake clock), the records, the config checks."""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mnv3.cli import CONFIG_DIR
from mnv3.cpus import cpu_model
from mnv3.errors import ConfigError
from mnv3.models import mobilenet_v3_small
from mnv3.search.platform import (
    _REFERENCE,
    RUNTIMES,
    Platform,
    batch_interval,
    lower_mean,
    median_interval,
    quantile,
    quantile_interval,
)


class FakeClock:
    """A clock that only moves when the timed call runs, by the next scheduled duration."""

    def __init__(self, durations: list[float]) -> None:
        self.now, self.durations = 0.0, itertools.cycle(durations)

    def call(self) -> None:
        self.now += next(self.durations)

    def timer(self) -> float:
        return self.now


def test_median_interval_is_the_binomial_order_statistics() -> None:
    # n = 100: ranks 50 -+ 1.96 * 10 / 2 = 9.8 -> 40 and 60 (0-based, floor / ceil)
    assert median_interval([float(v) for v in range(100)]) == (40.0, 60.0)
    assert median_interval([3.0]) == (3.0, 3.0)


def test_timing_stops_once_the_median_is_known_or_the_budget_is_spent() -> None:
    steady = FakeClock([0.002])
    platform = Platform("p", warmup=3, min_runs=25, max_runs=500, budget_s=100.0)
    times, low, high = platform.time_calls(steady.call, steady.timer)
    assert len(times) == 30  # the first check at a multiple of 10 after min_runs
    assert low == high == pytest.approx(0.002)
    noisy = FakeClock([0.001, 0.003])  # the median never settles to +-1 %
    times, low, high = platform.time_calls(noisy.call, noisy.timer)
    assert len(times) == 500 and (low, high) == (pytest.approx(0.001), pytest.approx(0.003))
    short = Platform("p", warmup=0, min_runs=10, max_runs=500, budget_s=0.05)
    times, _, _ = short.time_calls(noisy.call, noisy.timer)
    assert len(times) == 30  # 0.05 s of 2 ms calls: stopped at the first check past the budget


@pytest.mark.parametrize(
    ("override", "sentence"),
    [
        ({"runtime": "tflite"}, "platform.runtime='tflite' is unknown; expected one of torch"),
        ({"threads": 0}, "platform.threads=0; expected an integer >= 1"),
        ({"input_size": [16, 16]}, "platform.input_size=[16, 16]; expected [H, W], each at"),
        ({"cores": 2}, "platform.cores is not a platform setting; expected"),
    ],
)
def test_a_bad_platform_is_one_sentence(override: dict, sentence: str) -> None:
    with pytest.raises(ConfigError) as info:
        Platform.from_config({"name": "p", **override})
    assert str(info.value).startswith(sentence)


def test_every_shipped_platform_loads_and_names_a_runtime(tmp_path: Path) -> None:
    files = sorted((CONFIG_DIR / "platform").glob("*.yaml"))
    assert {f.stem for f in files} >= {"torch_cpu_1t", "onnxruntime_cpu_1t", "xnnpack_1t"}
    for f in files:
        cfg = OmegaConf.to_container(OmegaConf.load(f))
        assert isinstance(cfg, dict)
        platform = Platform.from_config({**cfg, "calibration": str(tmp_path / "c.json")})
        assert platform.name == f.stem and platform.runtime in RUNTIMES


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_a_measurement_carries_its_platform(runtime: str) -> None:
    import onnxruntime
    import torch

    platform = Platform(
        f"{runtime}_32", runtime=runtime, input_size=(32, 32), warmup=1, min_runs=5, max_runs=20
    )
    latency = platform.measure(mobilenet_v3_small(num_classes=4))
    version = torch.__version__ if runtime == "torch" else onnxruntime.__version__
    assert latency.runtime == f"{runtime} {version}" and latency.cpu == cpu_model()
    assert 10 <= latency.runs <= 20 and latency.low_ms <= latency.ms <= latency.high_ms
    assert (latency.threads, latency.input_size, latency.platform) == (1, (32, 32), f"{runtime}_32")
    assert json.loads(json.dumps(latency.to_plain()))["input_size"] == [32, 32]


def test_interleaved_measurement_times_every_network_every_round() -> None:
    platform = Platform("torch_32", input_size=(32, 32), warmup=1)
    nets = {"small": mobilenet_v3_small(num_classes=4), "wide": mobilenet_v3_small(width_mult=1.5)}
    latencies = platform.measure_interleaved(nets, rounds=6)
    assert list(latencies) == ["small", "wide"]
    assert all(v.runs == 6 and v.low_ms <= v.ms <= v.high_ms for v in latencies.values())
    assert {v.input_size for v in latencies.values()} == {(32, 32)}


def test_a_block_smaller_than_a_network_input_is_timed_by_onnxruntime() -> None:
    """The per-block table times parts on their own inputs (Small's last blocks see 7x7 at
    224): the exporters' stride-32 minimum is for whole networks only."""
    pytest.importorskip("onnxruntime")
    from mnv3.models import build_backbone

    block = build_backbone("mobilenet_v3_small", num_classes=0).blocks[-1]
    platform = Platform("ort", runtime="onnxruntime", warmup=1, min_runs=3, max_runs=5)
    latency = platform.measure(block, torch.randn(1, 96, 7, 7))
    assert latency.ms > 0 and latency.runtime.startswith("onnxruntime")


def test_quantile_interval_and_value_follow_the_order_statistics() -> None:
    times = [float(v) for v in range(100)]
    # q = 0.1, n = 100: ranks 10 -+ 1.96 * sqrt(100 * 0.1 * 0.9) = 5.88 -> 4 and 16
    assert quantile_interval(times, 0.1) == (4.0, 16.0)
    assert quantile_interval(times, 0.5) == median_interval(times)
    rng = torch.Generator().manual_seed(0)
    sample = torch.rand(37, generator=rng).tolist()
    for q in (0.1, 0.25, 0.5, 0.9):
        assert quantile(sample, q) == pytest.approx(torch.quantile(torch.tensor(sample), q).item())


def test_a_reference_scales_by_the_ratio_in_the_same_windows() -> None:
    platform = Platform("p", quantile=0.1, reference="mobilenet_v3_small", reference_ms=5.0)
    network, reference = [0.004 + 0.001 * i for i in range(10)], [0.002] * 10
    latency = platform._latency(network, "stand-in", "default", (224, 224), reference, 5.0)
    assert latency.raw_ms == pytest.approx(quantile(network, 0.1) * 1e3)
    assert latency.ratio == pytest.approx(quantile(network, 0.1) / 0.002)
    assert latency.ms == pytest.approx(latency.ratio * 5.0)
    # the interval is the ratio's, by batch means: 10 batches of one round, ratios 2.0 ... 6.5
    batches = [t / 0.002 for t in network]
    half = 2.262 * statistics.stdev(batches) / math.sqrt(10)
    assert (latency.low_ms, latency.high_ms) == pytest.approx(
        ((latency.ratio - half) * 5.0, (latency.ratio + half) * 5.0)
    )
    live = Platform(
        "p32",
        input_size=(32, 32),
        warmup=1,
        min_runs=5,
        max_runs=10,
        quantile=0.1,
        reference="mobilenet_v3_small",
        reference_ms=5.0,
    ).measure(mobilenet_v3_small(width_mult=0.5))
    assert live.ms == pytest.approx(live.ratio * 5.0) and live.reference == "mobilenet_v3_small"


def test_the_reference_is_calibrated_once_per_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mnv3.search import platform as module

    path = tmp_path / "calibration.json"
    settings = {
        "name": "p32",
        "input_size": [32, 32],
        "warmup": 1,
        "min_runs": 5,
        "max_runs": 10,
        "reference": "mobilenet_v3_small",
        "calibration": str(path),
    }
    first = Platform.from_config(settings)
    ms = first.reference_latency()
    other = Platform.from_config({**settings, "input_size": [64, 64]})
    other_ms = other.reference_latency()  # another fingerprint: its own entry, the first kept
    entries = json.loads(path.read_text())["entries"]
    assert [e["fingerprint"] for e in entries] == [first.fingerprint(), other.fingerprint()]
    assert [e["reference_ms"] for e in entries] == [ms, other_ms]
    module._CALIBRATED.clear()  # a fresh process: the numbers come from the file, unmeasured
    monkeypatch.setattr(Platform, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert Platform.from_config(settings).reference_latency() == ms
    assert other.reference_latency() == other_ms
    path.write_text("{not json")
    module._CALIBRATED.clear()
    with pytest.raises(ConfigError, match=r"calibration .*calibration.json cannot be read"):
        first.reference_latency()


@pytest.mark.parametrize(
    ("override", "sentence"),
    [
        ({"quantile": 1.5}, "platform.quantile=1.5; expected a number between 0 and 1"),
        ({"statistic": "mean"}, "platform.statistic='mean' is unknown; expected one of quantile"),
        ({"reference": "resnet50"}, "platform.reference='resnet50' is not a backbone; expected"),
        ({"reference_ms": -1}, "platform.reference_ms=-1; expected a positive number or null"),
    ],
)
def test_bad_timing_settings_are_one_sentence(override: dict, sentence: str) -> None:
    with pytest.raises(ConfigError) as info:
        Platform.from_config({"name": "p", **override})
    assert str(info.value).startswith(sentence)


def test_an_unresolved_calibration_path_is_refused_when_it_would_be_written() -> None:
    def shipped(name: str) -> dict:
        cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "platform" / f"{name}.yaml"))
        assert isinstance(cfg, dict) and "${" in cfg["calibration"]
        return cfg

    for name in ("torch_cpu_1t", "onnxruntime_cpu_1t", "xnnpack_1t"):
        # without a reference the path is never used
        Platform.from_config({**shipped(name), "reference": None})
        with pytest.raises(
            ConfigError, match=r"platform.calibration=.* is an unresolved interpolation"
        ):
            Platform.from_config(shipped(name))  # a reference: it would write there


class Sleeper(torch.nn.Module):
    """A module whose call takes a known time."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


def test_a_ratio_to_an_anchor_recovers_a_known_answer() -> None:
    platform = Platform("p", warmup=1, min_runs=10, max_runs=30, quantile=0.1, budget_s=1.0)
    x = torch.zeros(1, 3, 32, 32)
    ratio = platform.measure_ratio(Sleeper(0.004), x, Sleeper(0.002), torch.zeros(1, 8, 8, 8))
    assert 1.5 < ratio < 2.5  # 4 ms over 2 ms, plus what sleeping overshoots


def test_lower_mean_averages_the_fastest_calls() -> None:
    assert lower_mean([5.0, 1.0, 4.0, 2.0, 3.0], 0.5) == 2.0  # ceil(2.5) = 3 fastest: 1, 2, 3
    assert lower_mean([5.0, 1.0, 4.0, 2.0, 3.0], 0.1) == 1.0
    assert lower_mean([7.0], 0.5) == 7.0


def test_batch_means_widen_for_a_drifting_run() -> None:
    """The interval comes from 10 contiguous batches: the same calls in time order (a machine
    slowing down) give a wider one than shuffled, which order statistics cannot see."""
    drifting = [1.0 + 0.01 * i for i in range(100)]
    shuffled = drifting[:]
    torch.manual_seed(0)
    shuffled = [shuffled[i] for i in torch.randperm(100).tolist()]

    def mean_of(values: list[float]):
        return lambda start, stop: statistics.fmean(values[start:stop])

    low, high = batch_interval(mean_of(drifting), 100)
    batches = [statistics.fmean(drifting[10 * i : 10 * i + 10]) for i in range(10)]
    half = 2.262 * statistics.stdev(batches) / math.sqrt(10)
    centre = statistics.fmean(drifting)
    assert (low, high) == pytest.approx((centre - half, centre + half))
    shuffled_low, shuffled_high = batch_interval(mean_of(shuffled), 100)
    assert shuffled_high - shuffled_low < (high - low) / 2
    assert batch_interval(mean_of(drifting), 9) == (-math.inf, math.inf)  # under 10 rounds


class PairedClock:
    """A clock two calls share: each advances it by its own schedule, one step per round."""

    def __init__(self, network: list[float], reference: list[float]) -> None:
        self.now = 0.0
        self.network, self.reference = itertools.cycle(network), itertools.cycle(reference)

    def timer(self) -> float:
        return self.now

    def call_network(self) -> None:
        self.now += next(self.network)

    def call_reference(self) -> None:
        self.now += next(self.reference)


def test_with_a_reference_the_run_stops_when_the_ratio_is_known() -> None:
    """A machine slowing down 1 % per round: the network's own statistic never settles, its
    ratio to the reference timed in the same rounds (always 2) settles at the first check."""
    platform = Platform(
        "p", statistic="lower_mean", warmup=0, min_runs=30, max_runs=200, budget_s=100.0
    )
    slowing = [0.001 * (1 + 0.01 * i) for i in range(200)]
    clock = PairedClock([2 * t for t in slowing], slowing)
    calls = {"network": clock.call_network, _REFERENCE: clock.call_reference}
    times = platform._time_rounds(calls, None, clock.timer)
    assert len(times["network"]) == 30
    assert platform.estimate(times["network"], times[_REFERENCE]) == pytest.approx((2, 2, 2))
    alone = PairedClock([2 * t for t in slowing], [0.0])
    times = platform._time_rounds({"network": alone.call_network}, None, alone.timer)
    assert len(times["network"]) == 200


def test_the_reference_is_prepared_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ONNX or ExecuTorch export of the reference (or of the table's anchor block) costs
    seconds: every measurement after the first reuses the one this process prepared."""
    from mnv3.search import platform as module

    prepared: list[str] = []

    def counting(network: nn.Module, x: torch.Tensor, threads: int, scratch: Path):
        if scratch.name.startswith("mnv3_reference_"):
            prepared.append("reference")  # prepared once per process, under a name
        else:
            prepared.append("anchor" if scratch.name == "anchor" else "network")
        return RUNTIMES["torch"](network, x, threads, scratch)

    monkeypatch.setitem(RUNTIMES, "counting", counting)
    monkeypatch.setattr(module, "_PREPARED", {})
    platform = Platform(
        "p32",
        runtime="counting",
        input_size=(32, 32),
        warmup=1,
        min_runs=5,
        max_runs=10,
        reference="mobilenet_v3_small",
        reference_ms=5.0,
    )
    for _ in range(3):
        assert platform.measure(mobilenet_v3_small(width_mult=0.5)).ratio is not None
    assert prepared == ["reference", "network", "network", "network"]
    assert len(module._PREPARED) == 1
    # a named anchor (the per-block table's) likewise; an unnamed one is prepared every time
    block, x = torch.nn.Conv2d(3, 8, 3), torch.zeros(1, 3, 32, 32)
    for key in ("anchor", "anchor", None):
        platform.measure_ratio(block, x, torch.nn.Conv2d(3, 16, 3), x, anchor_key=key)
    assert prepared[4:] == ["reference", "network", "network", "network", "anchor"]
