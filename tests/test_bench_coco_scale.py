"""bench/bench_coco_scale.py at a tiny size: the generated COCO file indexes to exactly what was
generated, and the detection task's mAP equals COCOeval's on the same inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_coco_scale as bench

IMAGES, BOXES, EVAL_IMAGES, DETS = 200, 1_500, 50, 40


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bench.GeneratedCounts]:
    path = tmp_path_factory.mktemp("coco") / "annotations" / "instances_train2017.json"
    return path, bench.write_annotation_file(path, IMAGES, BOXES, seed=3)


def test_index_holds_exactly_the_generated_images_boxes_and_crowd_regions(
    generated: tuple[Path, bench.GeneratedCounts],
) -> None:
    path, counts = generated
    index = bench.index_annotations(path)
    assert (len(index.image_ids), len(index.boxes), index.degenerate) == (IMAGES, BOXES, 0)
    assert int(index.iscrowd.sum()) == counts.crowd > 0
    assert int((np.diff(index.offsets) == 0).sum()) == counts.empty_images
    # COCO's 80 categories keep their sparse ids: 1..90 with ten unused.
    assert len(index.category_ids) == 80 and index.category_ids.max() == 90
    assert {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}.isdisjoint(index.category_ids.tolist())
    assert index.category_names[0] == "person"
    # Boxes lie inside their images, on the 1/4-pixel grid (float32 holds them exactly).
    sizes = np.array([counts.sizes[int(i)] for i in index.image_ids], dtype=np.float32)
    per_box = np.repeat(sizes, np.diff(index.offsets), axis=0)
    assert (index.boxes[:, :2] >= 0).all() and (index.boxes[:, 2:] <= per_box).all()
    assert np.array_equal(index.boxes * bench.BOX_GRID, np.round(index.boxes * bench.BOX_GRID))


@pytest.mark.parametrize("backend", bench.BACKENDS)
def test_task_map_equals_cocoeval_on_the_same_detections(
    generated: tuple[Path, bench.GeneratedCounts], backend: str
) -> None:
    path, counts = generated
    data = bench.make_eval_set(bench.index_annotations(path), counts.sizes, EVAL_IMAGES, DETS)
    assert len(data) == EVAL_IMAGES and len(data.det_scores) == EVAL_IMAGES * DETS
    reference = bench.map_cocoeval(data)
    task, _ = bench.map_torchmetrics(data, backend, batch=8)
    assert 0.05 < reference[0] < 0.95  # neither trivial nor perfect: matches and misses both
    assert np.abs(np.array(task) - np.array(reference)).max() < 1e-6
