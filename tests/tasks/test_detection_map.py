"""The detection task's COCO mAP compute says what it scores before, and mAP and time after."""

from __future__ import annotations

import logging

import pytest
import torch

from mnv3.tasks.detection import coco_map_metric, compute_coco_map


def test_map_compute_logs_a_line_before_and_after(caplog: pytest.LogCaptureFixture) -> None:
    metric = coco_map_metric()
    boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0], [70.0, 20.0, 90.0, 40.0]])
    labels = torch.tensor([1, 2])
    for _ in range(3):  # three images, two detections each
        metric.update(
            [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": labels}],
            [{"boxes": boxes, "labels": labels}],
        )
    with caplog.at_level(logging.INFO, logger="mnv3.tasks.detection"):
        results = compute_coco_map(metric, "val")
    assert float(results["map"]) == pytest.approx(1.0)
    before, after = (r.getMessage() for r in caplog.records)
    assert before == "val: computing COCO mAP over 3 images, 6 detections ..."
    assert after.startswith("val: COCO mAP 1.0000 over 3 images in ") and after.endswith(" s")


def test_map_compute_is_silent_when_not_verbose(caplog: pytest.LogCaptureFixture) -> None:
    metric = coco_map_metric()
    metric.update(
        [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0).long()}],
        [{"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "labels": torch.tensor([1])}],
    )
    with caplog.at_level(logging.INFO, logger="mnv3.tasks.detection"):
        compute_coco_map(metric, "val", verbose=False)
    assert not caplog.records
