"""The benchmark scripts' machinery: references, timing order, intervals, detection workload."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_dense
import bench_deploy
import bench_train
from common import ratio_interval, time_interleaved

from mnv3.models import count_params


def test_small_ssdlite_reference_matches_ours_end_to_end_and_raw() -> None:
    pair = bench_dense.ssdlite_pair("mobilenet_v3_small")
    assert count_params(pair.ours) == count_params(pair.ref)
    assert not pair.ref.training and not pair.ref_network.training
    with torch.inference_mode():
        run_ours, run_ref, diff, detections = bench_dense.candidates(pair, "end_to_end", (240, 320))
        got, expected = run_ours(), run_ref()
        assert detections > 10  # calibrated BN: scores spread, many boxes pass the threshold
        assert diff(got, expected) == 0.0
        assert got[0]["boxes"][:, 2].max() <= 320 and got[0]["boxes"][:, 3].max() <= 240
        run_ours, run_ref, diff, _ = bench_dense.candidates(pair, "network", (240, 320))
        raw = run_ours()
        assert raw["cls_logits"].shape == (1, 3234, bench_dense.SSD_CLASSES)
        assert diff(raw, run_ref()) < 1e-5
    # A difference in labels has no pairing: infinite, so the row refuses to time.
    other = [{**got[0], "labels": got[0]["labels"].flip(0)}]
    assert bench_dense.detection_diff(other, got) == float("inf")


def test_interleaved_rounds_alternate_order_and_interval_brackets_the_ratio() -> None:
    calls: list[str] = []
    times = time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        rounds=4,
        warmup=1,
        budget_s=60,
    )
    assert calls == ["a", "b", *["a", "b", "b", "a", "a", "b", "b", "a"]]  # warm-up, then rounds
    assert len(times["a"]) == len(times["b"]) == 4
    g = torch.Generator().manual_seed(0)
    den = (1 + 0.1 * torch.rand(200, generator=g)).tolist()
    num = [
        2 * d * (1 + 0.01 * float(e))
        for d, e in zip(den, torch.randn(200, generator=g), strict=True)
    ]
    lo, hi = ratio_interval(num, den)
    assert lo < 2.0 < hi and hi - lo < 0.05


def test_quick_dense_run_writes_markdown_and_csv(tmp_path: Path) -> None:
    assert (
        bench_dense.main(
            ["--quick", "--rows", "ssd-small-net", "--no-paper", "--out", str(tmp_path)]
        )
        == 0
    )
    text = (tmp_path / "bench_dense.md").read_text()
    assert "SSDLite Small reduced, network only" in text
    with (tmp_path / "bench_dense.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["row"] == "ssd-small-net" and row["params_ours"] == row["params_tv"]
    assert float(row["ratio_1t"]) > 0 and int(row["rounds"]) == bench_dense.QUICK_ROUNDS
    with pytest.raises(SystemExit):
        bench_dense.parse_args(["--rows", "ssd-tiny"])


def test_detection_batches_hold_valid_targets() -> None:
    workload = bench_train.WORKLOADS["ssdlite-small"]
    (batch,) = workload.make_batches(1)
    assert batch["image"].shape == (workload.batch, 3, 320, 320)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    torch.testing.assert_close(torch.stack(batch["image01"]) * 2 - 1, batch["image"])
    for boxes, labels in zip(batch["boxes"], batch["labels"], strict=True):
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.max() <= 320
        assert labels.min() >= 1 and labels.max() <= bench_train.DET_CLASSES


@pytest.mark.parametrize("key", ["ssdlite-small", "lraspp-large"])
def test_every_plain_loop_trains_on_its_workloads_batches(key: str) -> None:
    workload = bench_train.WORKLOADS[key]
    (batch,) = workload.make_batches(1)
    for build in workload.plain.values():
        loss = build()(batch)  # a finite, positive loss: the batch is a valid training input
        assert torch.isfinite(loss) and loss > 0


def test_quick_deploy_run_writes_markdown_csv_and_plot(tmp_path: Path) -> None:
    argv = ["--quick", "--rows", "small-minimal", "--paths", "eager", "optimised"]
    assert bench_deploy.main([*argv, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "bench_deploy.md").read_text()
    assert "Small minimal" in text and "## Physical limit" in text
    assert "not selected (--paths)" not in text  # only the selected paths are listed
    assert (tmp_path / "bench_deploy.png").read_bytes()[:4] == b"\x89PNG"
    with (tmp_path / "bench_deploy.csv").open() as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["eager", "torchvision", "optimised"]  # torchvision always joins
    assert float(rows["torchvision"]["ratio_1t_tv"]) == 1.0
    assert float(rows["optimised"]["t1_ms"]) > 0 and int(rows["eager"]["file_bytes"]) > 0
    assert rows["eager"]["params"] == rows["torchvision"]["params"]
    with pytest.raises(SystemExit):
        bench_deploy.parse_args(["--rows", "tiny"])


def test_deploy_batch_rows_time_every_path_at_that_batch(tmp_path: Path) -> None:
    argv = ["--quick", "--rows", "small-minimal", "--paths", "eager", "--batch", "3"]
    assert bench_deploy.main([*argv, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "bench_deploy_b3.md").read_text()
    assert "Method: batch 3" in text and "N/A: the goals are at batch 1" not in text  # no row
    with (tmp_path / "bench_deploy_b3.csv").open() as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert rows["eager"]["batch"] == "3"
    line = next(x for x in text.splitlines() if x.startswith("| Small minimal"))
    cells = [c.strip() for c in line.split("|")]
    assert float(cells[7]) == pytest.approx(3 / (float(cells[6]) / 1e3), rel=0.01)  # img/s
    with pytest.raises(SystemExit):
        bench_deploy.parse_args(["--batch", "0"])


def test_reduced_tail_rows_pair_ours_with_torchvisions_same_network() -> None:
    ours, ref, reference = bench_deploy.ROWS_BY_KEY["small-reduced"].build()
    assert ref is not None and "reduced_tail=True" in reference
    assert count_params(ours) == count_params(ref)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-4
