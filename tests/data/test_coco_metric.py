"""torchmetrics' MeanAveragePrecision, fed from CocoDetection's eval_target, equals COCOeval.

The reference is pycocotools' ``COCOeval`` run the official way: on the annotation json and a
results json (written by :func:`mnv3.data.coco.coco_results`, so sparse category ids and xywh
boxes are exercised too). The set has objects of every COCO size range, crowd regions (with
detections on them, which COCOeval ignores), images without objects, a segmentation ``area``
that differs from the box area, and one image with more than 100 detections. torchmetrics is
given COCOeval's own IoU and recall thresholds (:data:`mnv3.data.coco.COCO_RECALL_THRESHOLDS`):
its float32 defaults give other AP numbers, which the last test shows.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params
from torchmetrics.detection import MeanAveragePrecision

from mnv3.data.coco import (
    COCO_IOU_THRESHOLDS,
    COCO_RECALL_THRESHOLDS,
    COCO_SUMMARY_KEYS,
    CocoDetection,
    coco_results,
    write_coco_results,
)
from mnv3.data.coco_annotations import coco_annotation_file

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

CATEGORY_IDS = (2, 7, 11)
OBJECTS_PER_CATEGORY = (20, 30, 40)
CROWD_REGIONS = 7
WIDTH, HEIGHT = 320, 240
NUM_IMAGES = 24
EMPTY_IMAGES = (5, 17)
CROWDED_IMAGE = 9  # gets more than 100 detections


def _random_box(rng: np.random.Generator) -> list[float]:
    """A box whose side spans small (< 32 px) to large (> 96 px) objects, inside the image."""
    w, h = np.exp(rng.uniform(np.log(6), np.log(200), 2))
    x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
    # float32 values, so the json and the tensors hold the very same numbers.
    return [float(np.float32(v)) for v in (x, y, w, h)]


def _ground_truth(rng: np.random.Generator) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    images = [
        {"id": i, "file_name": f"{i}.png", "width": WIDTH, "height": HEIGHT}
        for i in range(1, NUM_IMAGES + 1)
    ]
    # Multiples of 10 objects per category put recall values exactly on COCO's recall
    # thresholds (0.1, 0.2, ...), where float32 thresholds would pick another precision.
    categories = np.repeat(CATEGORY_IDS, OBJECTS_PER_CATEGORY)
    crowded = np.ones(CROWD_REGIONS, dtype=np.int64)
    kinds = np.concatenate([categories, -crowded])  # -1: a crowd region, category drawn below
    occupied = [i for i in range(1, NUM_IMAGES + 1) if i not in EMPTY_IMAGES]
    owners = rng.choice(occupied, size=len(kinds))
    owners[: len(occupied)] = occupied  # every non-empty image gets at least one object
    annotations = []
    for order in np.argsort(owners, kind="stable"):
        box = _random_box(rng)
        crowd = int(kinds[order] < 0)
        category = int(rng.choice(CATEGORY_IDS)) if crowd else int(kinds[order])
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": int(owners[order]),
                "category_id": category,
                "bbox": box,
                # A mask covers part of its box; COCO sizes objects by the mask.
                "area": float(np.float32(box[2] * box[3] * rng.uniform(0.4, 0.95))),
                "iscrowd": crowd,
            }
        )
    return images, annotations


def _detections(
    rng: np.random.Generator, annotations: list[dict[str, Any]]
) -> dict[int, list[tuple[list[float], int, float]]]:
    """Per image: (xyxy box, category id, score) from perturbed ground truth and false alarms."""
    found: dict[int, list[tuple[list[float], int, float]]] = {
        i: [] for i in range(1, NUM_IMAGES + 1)
    }
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        copies = 2 if ann["iscrowd"] else int(rng.random() < 0.85)
        for _ in range(copies):
            jitter = rng.normal(0, 0.07, 4) * [w, h, w, h]
            x0, y0 = x + jitter[0], y + jitter[1]
            x1, y1 = x + w + jitter[2], y + h + jitter[3]
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            category = ann["category_id"]
            if rng.random() < 0.1:
                category = int(rng.choice([c for c in CATEGORY_IDS if c != category]))
            found[ann["image_id"]].append(([x0, y0, x1, y1], category, rng.uniform(0.2, 1.0)))
    for image_id in found:
        extra = 110 if image_id == CROWDED_IMAGE else int(rng.poisson(1.5))
        for _ in range(extra):
            x, y, w, h = _random_box(rng)
            category = int(rng.choice(CATEGORY_IDS))
            found[image_id].append(([x, y, x + w, y + h], category, rng.uniform(0.0, 0.6)))
    # Continuous scores are distinct, so COCOeval and torchmetrics rank detections alike.
    return found


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The generated set on disk, its detections and COCOeval's 12 summary numbers."""
    root = tmp_path_factory.mktemp("coco_metric")
    rng = np.random.default_rng(2024)
    images, annotations = _ground_truth(rng)
    categories = [{"id": c, "name": f"thing{c}"} for c in CATEGORY_IDS]
    json_path = coco_annotation_file(root, "val")
    json_path.parent.mkdir(parents=True)
    json_path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    (root / "val2017").mkdir()
    for entry in images:
        Image.new("RGB", (WIDTH, HEIGHT)).save(root / "val2017" / entry["file_name"])

    dataset = CocoDetection(root, "val")
    to_label = {c: label for label, c in enumerate(dataset.label_to_category_id) if label}
    detections = _detections(rng, annotations)
    predictions, targets, image_ids = [], [], []
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample is not None
        dets = detections[sample["image_id"]]
        predictions.append(
            {
                "boxes": torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([to_label[d[1]] for d in dets], dtype=torch.int64),
                "scores": torch.tensor([d[2] for d in dets], dtype=torch.float32),
            }
        )
        targets.append(sample["eval_target"])
        image_ids.append(sample["image_id"])

    results_path = write_coco_results(
        root / "detections.json",
        coco_results(predictions, image_ids, dataset.label_to_category_id),
    )
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(json_path))
        coco_eval = COCOeval(truth, truth.loadRes(str(results_path)), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {
        "predictions": predictions,
        "targets": targets,
        "reference": dict(zip(COCO_SUMMARY_KEYS, coco_eval.stats.tolist(), strict=True)),
        "crowd": sum(a["iscrowd"] for a in annotations),
        "detections": sum(len(d) for d in detections.values()),
    }


def _torchmetrics(
    evaluation: dict[str, Any],
    backend: str,
    targets: list[dict[str, torch.Tensor]] | None = None,
    coco_thresholds: bool = True,
) -> dict[str, float]:
    thresholds = (
        {
            "iou_thresholds": list(COCO_IOU_THRESHOLDS),
            "rec_thresholds": list(COCO_RECALL_THRESHOLDS),
        }
        if coco_thresholds
        else {}
    )
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=backend, **thresholds)
    metric.warn_on_many_detections = False  # the crowded image is there on purpose
    metric.update(evaluation["predictions"], targets or evaluation["targets"])
    result = metric.compute()
    return {key: float(result[key]) for key in COCO_SUMMARY_KEYS}


def test_the_generated_set_exercises_every_coco_summary_number(evaluation: dict[str, Any]) -> None:
    reference = evaluation["reference"]
    assert evaluation["crowd"] >= 3 and evaluation["detections"] > 200
    # Every size range is populated (-1 would mean none) and nothing is trivially 0 or 1.
    assert all(0.05 < value < 0.95 for value in reference.values()), reference
    assert reference["map_50"] > reference["map_75"]
    assert reference["mar_100"] > reference["mar_10"] > reference["mar_1"]  # crowded image


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_mean_average_precision_equals_cocoeval(evaluation: dict[str, Any], backend: str) -> None:
    if backend == "faster_coco_eval":
        pytest.importorskip("faster_coco_eval")
    ours = _torchmetrics(evaluation, backend)
    assert ours == pytest.approx(evaluation["reference"], abs=1e-6)


def test_without_crowd_and_area_the_numbers_are_not_cocos(evaluation: dict[str, Any]) -> None:
    """The check above can fail: targets stripped of iscrowd and area give other numbers."""
    stripped = [{"boxes": t["boxes"], "labels": t["labels"]} for t in evaluation["targets"]]
    plain = _torchmetrics(evaluation, "pycocotools", stripped)
    reference = evaluation["reference"]
    differing = [k for k in COCO_SUMMARY_KEYS if abs(plain[k] - reference[k]) > 1e-3]
    assert {"map", "map_small", "map_medium"} <= set(differing), differing


def test_cocoeval_thresholds_are_the_ones_pycocotools_uses() -> None:
    params = Params(iouType="bbox")
    assert list(COCO_IOU_THRESHOLDS) == params.iouThrs.tolist()
    assert list(COCO_RECALL_THRESHOLDS) == params.recThrs.tolist()


def test_torchmetrics_default_thresholds_are_not_cocoeval(evaluation: dict[str, Any]) -> None:
    """Why the thresholds are passed: torchmetrics' float32 defaults shift AP on this set."""
    default = _torchmetrics(evaluation, "pycocotools", coco_thresholds=False)
    reference = evaluation["reference"]
    assert max(abs(default[k] - reference[k]) for k in COCO_SUMMARY_KEYS) > 1e-4
