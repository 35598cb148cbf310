"""Where latency is measured: the timing rule (on a fake clock), the records, the config checks."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from omegaconf import OmegaConf

from mnv3.cli import CONFIG_DIR
from mnv3.cpus import cpu_model
from mnv3.errors import ConfigError
from mnv3.models import mobilenet_v3_small
from mnv3.search.platform import RUNTIMES, Platform, median_interval


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


def test_every_shipped_platform_loads_and_names_a_runtime() -> None:
    files = sorted((CONFIG_DIR / "platform").glob("*.yaml"))
    assert {f.stem for f in files} >= {"torch_cpu_1t", "onnxruntime_cpu_1t", "xnnpack_1t"}
    for f in files:
        platform = Platform.from_config(OmegaConf.to_container(OmegaConf.load(f)))  # type: ignore[arg-type]
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
