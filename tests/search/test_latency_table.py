"""The per-block latency table: keys, cache, fingerprint, fit (with a stand-in platform)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mnv3.errors import ConfigError
from mnv3.models import build_backbone, count_params
from mnv3.search.latency_table import LatencyTable, network_parts
from mnv3.search.platform import Latency, Platform


class CountingPlatform(Platform):
    """Answers a module's parameter count / 1e4 as its 'latency', and counts the calls."""

    calls: list[int]

    def measure(self, network: torch.nn.Module, x: torch.Tensor | None = None) -> Latency:
        self.calls.append(1)
        ms = count_params(network) / 1e4
        size = self.input_size if x is None else (int(x.shape[-2]), int(x.shape[-1]))
        return Latency(ms, ms, ms, 1, self.name, "stand-in", self.threads, size, "cpu")


def _platform(name: str = "p") -> CountingPlatform:
    platform = CountingPlatform(name, input_size=(64, 64))
    object.__setattr__(platform, "calls", [])
    return platform


def test_parts_are_the_stem_every_block_the_last_conv_and_the_head() -> None:
    small = build_backbone("mobilenet_v3_small", num_classes=10)
    parts = network_parts(small, (64, 64))
    assert len(parts) == 1 + 11 + 1 + 1
    assert parts[0].key == "stem|3x64x64|16|hswish"
    assert parts[1].key == "block|16x32x32|16|16|k3|s2|d1|se1|relu|res0"
    assert parts[-1].key.startswith("head|576x")
    assert parts[5].key == parts[6].key  # Small's two identical (5, 240, 40) blocks share one entry
    dilated = network_parts(build_backbone("mobilenet_v3_small", output_stride=16), (64, 64))
    assert "|s1|d2|" in dilated[-2].key  # output stride 16: the last stage dilates, as built


def test_entries_are_measured_once_cached_and_summed(tmp_path: Path) -> None:
    platform = _platform()
    small = build_backbone("mobilenet_v3_small", num_classes=10)
    table = LatencyTable(platform, tmp_path / "lut.json")
    total = table.parts_sum(small)
    parts = network_parts(small, (64, 64))
    assert total == pytest.approx(sum(count_params(p.module) / 1e4 for p in parts))
    unique = len({p.key for p in parts})
    assert len(platform.calls) == table.measured == unique == 12
    table.fit([total], [total * 1.25], "scale")
    assert table.predict(small) == pytest.approx(total * 1.25)
    table.save()
    again = LatencyTable(platform, tmp_path / "lut.json")
    assert again.predict(small) == pytest.approx(total * 1.25) and again.measured == 0
    assert len(platform.calls) == unique  # everything came from the file


def test_fits_are_medians_and_a_file_keeps_one_table_per_platform(tmp_path: Path) -> None:
    table = LatencyTable(_platform())
    assert table.fit([2.0, 4.0, 10.0], [2.4, 4.8, 100.0], "scale") == (pytest.approx(1.2), 0.0)
    assert table.fit([2.0, 4.0, 10.0], [3.0, 5.0, 90.0], "constant") == (1.0, pytest.approx(1.0))
    path = tmp_path / "lut.json"
    one = LatencyTable(_platform("p"), path)
    one.entries, one.scale = {"stem": 1.5}, 2.0
    one.save()
    # the earlier layout, one table per file, still reads
    legacy = json.loads(path.read_text())["tables"][0]
    path.write_text(json.dumps(legacy))
    assert LatencyTable(_platform("p"), path).entries == {"stem": 1.5}
    other = LatencyTable(replace(_platform("p"), threads=4), path)  # another fingerprint
    assert other.entries == {} and other.scale == 1.0  # nothing of the other platform used
    other.entries = {"stem": 0.5}
    other.save()
    tables = json.loads(path.read_text())["tables"]
    assert [t["fingerprint"]["threads"] for t in tables] == [1, 4]  # the first one kept
    again = LatencyTable(_platform("p"), path)
    assert (again.entries, again.scale) == ({"stem": 1.5}, 2.0)
    for broken in ('{"tables": [{"fingerprint": {}}]}', "[1, 2]", "{not json"):
        path.write_text(broken)
        with pytest.raises(ConfigError, match=r"latency table .*lut.json cannot be read"):
            LatencyTable(_platform("p"), path)


def test_on_a_reference_platform_entries_are_ratios_to_an_anchor_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reference network beside every 0.1 ms block would dominate each round: each entry is
    its time over one block of the reference's, measured in the same rounds, and the fitted
    scale carries the sum into ms."""
    anchors: list[tuple[int, ...]] = []

    def ratio(
        self: Platform, network: torch.nn.Module, x: torch.Tensor, anchor, anchor_x, anchor_key
    ) -> float:
        anchors.append((tuple(anchor_x.shape), anchor_key))
        return 0.5

    monkeypatch.setattr(Platform, "measure_ratio", ratio)
    monkeypatch.setattr(Platform, "measure", lambda *a, **k: pytest.fail("timed alone"))
    platform = Platform("p", input_size=(64, 64), reference="mobilenet_v3_small", reference_ms=5.0)
    table = LatencyTable(platform)
    small = build_backbone("mobilenet_v3_small", num_classes=10)
    total = table.parts_sum(small)
    unique = len({p.key for p in network_parts(small, (64, 64))})
    assert total == pytest.approx(0.5 * len(network_parts(small, (64, 64))))
    # one anchor for every entry, named so that the process prepares (exports) it once
    assert len(anchors) == unique and len(set(anchors)) == 1 and anchors[0][1]
    table.fit([total], [7.0])
    assert table.predict(small) == pytest.approx(7.0)
    assert table.fingerprint()["reference"] == "mobilenet_v3_small"  # the units it predicts in
