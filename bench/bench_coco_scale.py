"""COCO at train2017 scale: indexing the annotation file, and mAP over 5,000 images x 100
detections, with time and peak memory.

Run ``python bench/bench_coco_scale.py --out bench/results`` (about 10 minutes and 4 GiB on
2 cores; it leaves the 432 MiB json in ``<out>/annotations/``, and nothing without ``--out``; a
tiny run: ``--images 500 --boxes 3600 --eval-images 100``). Steps:

1. **Generate** (seeded, numpy) a COCO instances json the size of train2017: 118,287 images,
   860,001 boxes, COCO's 80 categories with their non-contiguous ids (1..90) and names, image
   sizes as COCO's (long side 640 mostly), object sizes spread over small / medium / large as
   COCO's, a segmentation polygon per object (RLE for the ~1 % crowd regions), so the file is
   about as large as the real one (~450 MB). Boxes lie on a 1/4-pixel grid, exact in float32.
2. **Index** it as the training data path does: :func:`mnv3.data.coco_annotations.load_index`
   (what :class:`~mnv3.data.coco.CocoDetection` calls): json read, field checks, pycocotools
   index, flat arrays. The index must hold exactly the generated counts.
3. **mAP** over ``--eval-images`` images of the index (their true boxes, crowd flags and
   areas, as ``eval_target``) with ``--dets`` detections each (jittered copies of true boxes,
   duplicates, random boxes; on a 1/64-pixel grid): (a) as the detection task does it
   (:func:`mnv3.tasks.detection.coco_map_metric`, updated in validation-sized batches, then
   :func:`~mnv3.tasks.detection.compute_coco_map`, which prints the progress lines), for each
   ``--backends``; (b) pycocotools' COCOeval directly on the same inputs (ground truth from the
   index, detections through :func:`mnv3.data.coco.coco_results`, as the results json holds
   them). The table gives each one's largest difference to COCOeval over the 12 summary numbers.

Each measured step runs in a fresh Python process, so its memory is its own. Peak memory is the
resident high-water mark, C and Python allocations alike (tracemalloc would miss pycocotools' and
torch's): Linux's ``VmHWM`` of the step's process, reset just before the step (``clear_refs``),
given as the peak and as the rise over the resident size just before the step (imports and
inputs loaded). Where ``/proc`` is absent, ``getrusage(RUSAGE_SELF).ru_maxrss``, which on Linux
would also count the parent's size when the child was started: hence ``VmHWM`` first.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import machine_info, write_results

from mnv3.data.coco_annotations import CocoIndex, load_index
from mnv3.report import markdown_table

# COCO train2017 (instances_train2017.json): images and annotations.
TRAIN2017_IMAGES = 118_287
TRAIN2017_BOXES = 860_001
VAL_IMAGES = 5_000  # the size of val2017: the split validation scores
DETECTIONS_PER_IMAGE = 100  # COCO scores the best 100 per image
VAL_BATCH = 24  # conf/data/coco.yaml batch_size: how validation feeds the metric
CROWD_FRACTION = 0.01  # crowd regions among COCO's annotations (~1 %)
PERSON_FRACTION = 0.3  # COCO's most frequent category, about 30 % of all boxes
BOX_GRID = 4  # true boxes on a 1/4-pixel grid: the same numbers in json, float32 and xywh
DET_GRID = 64  # detections on a 1/64-pixel grid: xyxy -> xywh is exact in float32 and float64
_CHUNK = 50_000  # annotations formatted per json chunk (bounds the generator's memory)
BACKENDS = ("pycocotools", "faster_coco_eval")

log = logging.getLogger("bench_coco_scale")


# -- 1. the annotation file ----------------------------------------------------------------------
def coco_categories() -> tuple[np.ndarray, list[str]]:
    """COCO's 80 object categories: their ids (1..90, ten unused) and names, ascending by id,
    read from torchvision's COCO weights' metadata (91 entries, ``N/A`` where an id is unused)."""
    from torchvision.models.detection import SSDLite320_MobileNet_V3_Large_Weights

    names = SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.meta["categories"]
    used = [i for i, name in enumerate(names) if i > 0 and name != "N/A"]
    return np.array(used, dtype=np.int64), [names[i] for i in used]


@dataclass(frozen=True)
class GeneratedCounts:
    """What a generated file holds, to check the index against, and its image sizes (which
    the index does not keep) to place detections inside the images."""

    images: int
    boxes: int
    crowd: int
    empty_images: int
    categories: int
    bytes: int
    sizes: dict[int, tuple[int, int]]  # image id -> (width, height)


def _image_sizes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(width, height) per image: COCO's long side is 640 for nearly all images, the short side
    mostly 480 / 427 / 426 / 424 / 360, a third of them portrait."""
    short = rng.choice([480, 427, 426, 424, 428, 360, 512, 640, 400], n)
    short = np.where(rng.random(n) < 0.05, rng.integers(240, 640, n), short)
    long = np.where(rng.random(n) < 0.03, rng.integers(300, 640, n), 640)
    short = np.minimum(short, long)
    portrait = rng.random(n) < 0.3
    return np.where(portrait, short, long), np.where(portrait, long, short)


def _objects(
    rng: np.random.Generator, width: np.ndarray, height: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (x, y, w, h) inside images of the given sizes, on a 1/BOX_GRID pixel grid, and the
    object's segmentation area (0.4-0.9 of the box's). The box side is log-normal around 50 px:
    by segmentation area about 42 % small (< 32^2), 36 % medium, 22 % large, as COCO's."""
    n = len(width)
    side = np.exp(rng.normal(np.log(50.0), 1.1, n))
    aspect = np.exp(rng.normal(0.0, 0.6, n))  # width / height
    w = np.clip(side * np.sqrt(aspect), 2.0, width)
    h = np.clip(side / np.sqrt(aspect), 2.0, height)
    x = rng.random(n) * (width - w)
    y = rng.random(n) * (height - h)
    xywh = np.round(np.stack([x, y, w, h], axis=1) * BOX_GRID) / BOX_GRID
    xywh[:, 2:] = np.maximum(xywh[:, 2:], 1.0 / BOX_GRID)
    xywh[:, 2] = np.minimum(xywh[:, 2], width - xywh[:, 0])
    xywh[:, 3] = np.minimum(xywh[:, 3], height - xywh[:, 1])
    # A polygon covers part of its box: COCO's segmentation area is below the box area.
    area = np.round(xywh[:, 2] * xywh[:, 3] * rng.uniform(0.4, 0.9, n), 2)
    return xywh, area


def _polygons(
    rng: np.random.Generator, xywh: np.ndarray, vertices: np.ndarray
) -> list[list[float]]:
    """One polygon per box around its inscribed ellipse, ``vertices[k]`` corners, in COCO's
    ``[x1, y1, x2, y2, ...]`` form with two decimals (drawn for all boxes at once)."""
    owner = np.repeat(np.arange(len(xywh)), vertices)
    angle = rng.random(len(owner))
    angle = angle[np.lexsort((angle, owner))] * 2 * np.pi  # ascending within each polygon
    radius = rng.uniform(0.6, 1.0, len(owner))
    x, y, w, h = (xywh[owner, j] for j in range(4))
    px = x + w / 2 * (1 + radius * np.cos(angle))
    py = y + h / 2 * (1 + radius * np.sin(angle))
    flat = np.round(np.stack([px, py], axis=1).reshape(-1), 2).tolist()
    ends = np.cumsum(2 * vertices).tolist()
    return [flat[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def _crowd_rle(rng: np.random.Generator, width: int, height: int) -> dict[str, Any]:
    """An uncompressed RLE mask as COCO stores crowd regions (counts summing to w x h)."""
    runs = rng.integers(1, 400, int(rng.integers(40, 300)))
    runs[-1] += max(0, width * height - int(runs.sum()))
    return {"counts": runs.tolist(), "size": [int(height), int(width)]}


def _annotation_chunks(
    rng: np.random.Generator,
    image_ids: np.ndarray,
    owner: np.ndarray,
    width: np.ndarray,
    height: np.ndarray,
    category_ids: np.ndarray,
) -> Iterator[tuple[str, int]]:
    """The annotations as json text, chunk by chunk (comma-joined objects), and the crowd count
    of each chunk. File order is shuffled, as an index must not rely on it."""
    total = len(owner)
    weights = np.ones(len(category_ids))
    weights[1:] = 1.0 / np.arange(1, len(category_ids)) ** 0.8  # the rest by a Zipf-like tail
    weights[1:] *= (1 - PERSON_FRACTION) / weights[1:].sum()
    weights[0] = PERSON_FRACTION  # id 1, person
    order = rng.permutation(total)
    for start in range(0, total, _CHUNK):
        rows = order[start : start + _CHUNK]
        img = owner[rows]
        xywh, area = _objects(rng, width[img], height[img])
        category = rng.choice(category_ids, len(rows), p=weights)
        crowd = rng.random(len(rows)) < CROWD_FRACTION
        polygons = _polygons(rng, xywh, rng.integers(8, 48, len(rows)))
        boxes_xywh, areas, image_of = xywh.tolist(), area.tolist(), img.tolist()
        entries = []
        for k, row in enumerate(rows.tolist()):
            i = image_of[k]
            segmentation: Any = (
                _crowd_rle(rng, int(width[i]), int(height[i])) if crowd[k] else [polygons[k]]
            )
            entries.append(
                {
                    "segmentation": segmentation,
                    "area": areas[k],
                    "iscrowd": int(crowd[k]),
                    "image_id": int(image_ids[i]),
                    "bbox": boxes_xywh[k],
                    "category_id": int(category[k]),
                    "id": row + 1,
                }
            )
        yield json.dumps(entries, separators=(",", ":"))[1:-1], int(crowd.sum())


def write_annotation_file(path: Path, images: int, boxes: int, seed: int = 0) -> GeneratedCounts:
    """Write a COCO instances json of ``images`` images and ``boxes`` boxes to ``path``.

    Boxes are spread over images with gamma-distributed rates (a negative binomial count per
    image: a few empty images, a long tail of crowded ones, ~7.3 boxes on average as COCO).
    Images are listed in random order with unique sparse ids, as COCO's are.
    """
    rng = np.random.default_rng(seed)
    category_ids, names = coco_categories()
    image_ids = np.sort(rng.choice(max(600_000, 5 * images), images, replace=False)) + 1
    width, height = _image_sizes(rng, images)
    rate = rng.gamma(5.0, 1.0, images)
    owner = rng.choice(images, boxes, p=rate / rate.sum())
    empty = images - len(np.unique(owner))
    listed = rng.permutation(images)
    image_entries = ",".join(
        json.dumps(
            {
                "license": int(1 + i % 8),
                "file_name": f"{int(image_ids[i]):012d}.jpg",
                "coco_url": f"http://images.cocodataset.org/train2017/{int(image_ids[i]):012d}.jpg",
                "height": int(height[i]),
                "width": int(width[i]),
                "date_captured": f"2013-11-{1 + i % 28:02d} 12:{i % 60:02d}:00",
                "id": int(image_ids[i]),
            },
            separators=(",", ":"),
        )
        for i in listed.tolist()
    )
    categories = json.dumps(
        [
            {"supercategory": "object", "id": int(c), "name": n}
            for c, n in zip(category_ids, names, strict=True)
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    crowd = 0
    with path.open("w", encoding="utf-8") as f:
        f.write('{"info":{"description":"generated at COCO train2017 scale","version":"1.0"},')
        f.write('"licenses":[],"images":[' + image_entries + '],"annotations":[')
        for k, (text, chunk_crowd) in enumerate(
            _annotation_chunks(rng, image_ids, owner, width, height, category_ids)
        ):
            f.write(("," if k else "") + text)
            crowd += chunk_crowd
        f.write('],"categories":' + categories + "}")
    sizes = dict(
        zip(image_ids.tolist(), zip(width.tolist(), height.tolist(), strict=True), strict=True)
    )
    return GeneratedCounts(
        images, boxes, crowd, empty, len(category_ids), path.stat().st_size, sizes
    )


# -- 2. the index --------------------------------------------------------------------------------
def index_annotations(path: Path) -> CocoIndex:
    """The training data path's index of ``path``, parsed now (the per-process cache cleared)."""
    from mnv3.data.coco_annotations import _parse_annotation_file

    _parse_annotation_file.cache_clear()
    return load_index(path)


def index_nbytes(index: CocoIndex) -> int:
    """Bytes the index's arrays keep for the dataset (and every forked DataLoader worker)."""
    arrays = (getattr(index, f.name) for f in fields(index))
    return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))


# -- 3. the evaluation inputs --------------------------------------------------------------------
@dataclass
class EvalSet:
    """Ground truth and detections of the scored images as flat arrays, image i's rows at
    ``[gt_offsets[i], gt_offsets[i+1])`` and ``[det_offsets[i], det_offsets[i+1])``; labels
    are 1..K (the task's), ``category_ids[label - 1]`` the COCO id. Saved to one ``.npz`` so
    each measuring process reads its inputs without the whole index."""

    image_ids: np.ndarray  # int64 (N,), ascending
    category_ids: np.ndarray  # int64 (K,)
    gt_offsets: np.ndarray
    gt_boxes: np.ndarray  # float32 (G, 4) xyxy
    gt_labels: np.ndarray  # int64 (G,)
    gt_crowd: np.ndarray  # int64 (G,)
    gt_area: np.ndarray  # float32 (G,)
    det_offsets: np.ndarray
    det_boxes: np.ndarray  # float32 (D, 4) xyxy
    det_scores: np.ndarray  # float32 (D,)
    det_labels: np.ndarray  # int64 (D,)

    def save(self, path: Path) -> None:
        """All arrays to ``path`` (npz)."""
        np.savez(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: Path) -> EvalSet:
        """The set :meth:`save` wrote."""
        with np.load(path) as data:
            return cls(**{f.name: data[f.name] for f in fields(cls)})

    def __len__(self) -> int:
        return len(self.image_ids)

    def batches(
        self, size: int
    ) -> Iterator[tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]]:
        """(detections, eval targets) per batch of ``size`` images, as the detection task's
        validation step hands them to the metric."""
        for start in range(0, len(self), size):
            preds, targets = [], []
            for i in range(start, min(start + size, len(self))):
                g = slice(self.gt_offsets[i], self.gt_offsets[i + 1])
                d = slice(self.det_offsets[i], self.det_offsets[i + 1])
                preds.append(
                    {
                        "boxes": torch.from_numpy(self.det_boxes[d]),
                        "scores": torch.from_numpy(self.det_scores[d]),
                        "labels": torch.from_numpy(self.det_labels[d]),
                    }
                )
                targets.append(
                    {
                        "boxes": torch.from_numpy(self.gt_boxes[g]),
                        "labels": torch.from_numpy(self.gt_labels[g]),
                        "iscrowd": torch.from_numpy(self.gt_crowd[g]),
                        "area": torch.from_numpy(self.gt_area[g]),
                    }
                )
            yield preds, targets


def _detections(
    rng: np.random.Generator,
    gt: np.ndarray,
    gt_labels: np.ndarray,
    size: tuple[int, int],
    n: int,
    num_labels: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` detections for one image: a jittered copy of each true box (the right label 9 times
    in 10), a looser duplicate of a third of them, random boxes for the rest; copies score
    higher on average. Boxes on a 1/DET_GRID pixel grid, inside the image, never empty."""
    width, height = size
    keep = min(len(gt), n)
    dup = np.flatnonzero(rng.random(keep) < 0.33)[: max(0, n - keep)]
    source = np.concatenate([np.arange(keep), dup])
    sources = gt[source].reshape(-1, 4)
    wh = sources[:, 2:] - sources[:, :2]
    noise = np.concatenate([np.full(keep, 0.08), np.full(len(dup), 0.25)])[:, None]
    centre = (sources[:, :2] + sources[:, 2:]) / 2 + rng.normal(
        0, 1, (len(sources), 2)
    ) * wh * noise
    wh = wh * np.exp(rng.normal(0, 1, (len(sources), 2)) * noise)
    jittered = np.concatenate([centre - wh / 2, centre + wh / 2], axis=1)
    labels = gt_labels[source].copy()
    wrong = rng.random(len(labels)) < 0.1
    labels[wrong] = rng.integers(1, num_labels + 1, int(wrong.sum()))
    scores = np.concatenate([rng.beta(4, 2, keep), rng.beta(2, 3, len(dup))])
    rest = n - len(sources)
    side = np.exp(rng.normal(np.log(40.0), 1.1, (rest, 1))) * np.exp(rng.normal(0, 0.4, (rest, 2)))
    corner = rng.random((rest, 2)) * np.array([width, height])
    random_boxes = np.concatenate([corner, corner + side], axis=1)
    boxes = np.concatenate([jittered, random_boxes])
    boxes = np.clip(boxes, 0, [width, height, width, height])
    boxes = np.round(boxes * DET_GRID) / DET_GRID
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1.0 / DET_GRID)
    labels = np.concatenate([labels, rng.integers(1, num_labels + 1, rest)])
    scores = np.concatenate([scores, rng.beta(1, 4, rest)])
    return boxes.astype(np.float32), scores.astype(np.float32), labels.astype(np.int64)


def make_eval_set(
    index: CocoIndex, sizes: dict[int, tuple[int, int]], images: int, dets: int, seed: int = 0
) -> EvalSet:
    """``images`` images of the index (a seeded sample, ascending by id: the metric numbers
    images in update order, COCOeval by id, so both see one order) with their true boxes, and
    ``dets`` generated detections for each.

    Args:
        sizes: image id -> (width, height), to keep detections inside each image.
    """
    rng = np.random.default_rng(seed + 1)
    picked = np.sort(rng.choice(len(index.image_ids), min(images, len(index.image_ids)), False))
    labels_of = {int(c): k + 1 for k, c in enumerate(index.category_ids.tolist())}
    label = np.array([labels_of[int(c)] for c in index.category], dtype=np.int64)
    gt_rows = [np.arange(index.offsets[i], index.offsets[i + 1]) for i in picked]
    rows = np.concatenate(gt_rows) if gt_rows else np.zeros(0, np.int64)
    det_boxes, det_scores, det_labels = [], [], []
    for i, r in zip(picked.tolist(), gt_rows, strict=True):
        size = sizes[int(index.image_ids[i])]
        boxes, scores, labels = _detections(
            rng, index.boxes[r], label[r], size, dets, len(index.category_ids)
        )
        det_boxes.append(boxes)
        det_scores.append(scores)
        det_labels.append(labels)
    return EvalSet(
        image_ids=index.image_ids[picked].copy(),
        category_ids=index.category_ids.copy(),
        gt_offsets=np.concatenate([[0], np.cumsum([len(r) for r in gt_rows])]).astype(np.int64),
        gt_boxes=index.boxes[rows].copy(),
        gt_labels=label[rows],
        gt_crowd=index.iscrowd[rows].astype(np.int64),
        gt_area=index.area[rows].copy(),
        det_offsets=np.arange(len(picked) + 1, dtype=np.int64) * dets,
        det_boxes=np.concatenate(det_boxes).reshape(-1, 4),
        det_scores=np.concatenate(det_scores),
        det_labels=np.concatenate(det_labels),
    )


# -- 4. the two ways to score --------------------------------------------------------------------
def map_torchmetrics(
    data: EvalSet, backend: str = "pycocotools", batch: int = VAL_BATCH
) -> tuple[list[float], float]:
    """COCO's 12 summary numbers as the detection task computes them, and the seconds
    ``compute()`` took: :func:`~mnv3.tasks.detection.coco_map_metric` updated batch by batch,
    then :func:`~mnv3.tasks.detection.compute_coco_map` (its progress lines included)."""
    from mnv3.data.coco import COCO_SUMMARY_KEYS
    from mnv3.tasks.detection import coco_map_metric, compute_coco_map

    metric = coco_map_metric(backend)
    for preds, targets in data.batches(batch):
        metric.update(preds, targets)
    start = time.perf_counter()
    results = compute_coco_map(metric, "bench")
    seconds = time.perf_counter() - start
    return [float(results[k]) for k in COCO_SUMMARY_KEYS], seconds


def map_cocoeval(data: EvalSet) -> list[float]:
    """COCO's 12 summary numbers from pycocotools' COCOeval run directly: ground truth as a COCO
    dataset (COCO category ids, xywh, the index's area and crowd flags), detections as the
    results json entries :func:`mnv3.data.coco.coco_results` writes, loaded by ``loadRes``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from mnv3.data.coco import coco_results

    table = [0, *data.category_ids.tolist()]
    xywh = data.gt_boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    image_of = np.repeat(data.image_ids, np.diff(data.gt_offsets))
    annotations = [
        {
            "id": k + 1,
            "image_id": int(image_of[k]),
            "category_id": table[int(data.gt_labels[k])],
            "bbox": xywh[k].tolist(),
            "area": float(data.gt_area[k]),
            "iscrowd": int(data.gt_crowd[k]),
        }
        for k in range(len(xywh))
    ]
    ground_truth = {
        "images": [{"id": int(i)} for i in data.image_ids],
        "annotations": annotations,
        "categories": [{"id": int(c), "name": str(c)} for c in data.category_ids],
    }
    predictions = [
        {
            "boxes": data.det_boxes[a:b],
            "scores": data.det_scores[a:b],
            "labels": data.det_labels[a:b],
        }
        for a, b in zip(data.det_offsets[:-1], data.det_offsets[1:], strict=True)
    ]
    results = coco_results(predictions, data.image_ids.tolist(), table)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = ground_truth
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results) if results else COCO()
        evaluation = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [float(v) for v in evaluation.stats]


# -- measuring in a fresh process ----------------------------------------------------------------
def _proc_status_bytes(key: str) -> int | None:
    """A ``kB`` line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None without it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # KiB on Linux


def reset_peak_rss() -> None:
    """Start the resident high-water mark afresh at the current size (Linux ``clear_refs`` 5);
    where that is refused the mark keeps the process's earlier peak (imports)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def current_rss_bytes() -> int:
    """Resident size now (``VmRSS``); the high-water mark so far where /proc is absent."""
    return _proc_status_bytes("VmRSS") or _ru_maxrss_bytes()


def peak_rss_bytes() -> int:
    """This process's resident high-water mark: ``VmHWM`` (its own address space only), else
    ``ru_maxrss``."""
    return _proc_status_bytes("VmHWM") or _ru_maxrss_bytes()


def _start_step() -> tuple[int, float]:
    """(resident bytes, clock) at the start of a measured step, the peak mark reset."""
    reset_peak_rss()
    return current_rss_bytes(), time.perf_counter()


def run_step(args: argparse.Namespace) -> dict[str, Any]:
    """One measured step in this (fresh) process; its record (seconds, peak memory, result)."""
    record: dict[str, Any] = {"step": args.step}
    if args.step == "index":
        before, start = _start_step()
        index = index_annotations(args.annotations)
        seconds = time.perf_counter() - start
        peak = peak_rss_bytes()
        record |= {
            "images": len(index.image_ids),
            "boxes": len(index.boxes),
            "crowd": int(index.iscrowd.sum()),
            "categories": len(index.category_ids),
            "empty_images": int((np.diff(index.offsets) == 0).sum()),
            "degenerate": index.degenerate,
            "index_bytes": index_nbytes(index),
        }
        # Not measured: the scored images' inputs, for the mAP steps' own processes.
        sizes = {int(k): (w, h) for k, (w, h) in json.loads(args.sizes.read_text()).items()}
        data = make_eval_set(index, sizes, args.eval_images, args.dets, args.seed)
        data.save(args.eval_set)
    else:
        data = EvalSet.load(args.eval_set)
        before, start = _start_step()
        if args.step == "cocoeval":
            stats = map_cocoeval(data)
            compute = float("nan")
        else:
            stats, compute = map_torchmetrics(data, args.step, args.batch)
        seconds = time.perf_counter() - start
        peak = peak_rss_bytes()
        record |= {
            "stats": stats,
            "compute_s": compute,
            "images": len(data),
            "detections": len(data.det_scores),
        }
    return record | {"seconds": seconds, "peak_bytes": peak, "rise_bytes": peak - before}


def _child(step: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run ``step`` in a fresh interpreter (its stderr, with the progress lines, passes through)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        record_file = Path(handle.name)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--step",
        step,
        "--annotations",
        str(args.annotations),
        "--eval-set",
        str(work / "eval_set.npz"),
        "--sizes",
        str(work / "image_sizes.json"),
        "--seed",
        str(args.seed),
        "--record",
        str(record_file),
        "--eval-images",
        str(args.eval_images),
        "--dets",
        str(args.dets),
        "--batch",
        str(args.batch),
    ]
    try:
        subprocess.run(command, check=True)
        return json.loads(record_file.read_text())
    finally:
        record_file.unlink(missing_ok=True)


# -- the report ----------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def report(
    args: argparse.Namespace,
    machine: Sequence[tuple[str, str]],
    generated: GeneratedCounts,
    generate_s: float,
    index: dict[str, Any],
    scores: dict[str, dict[str, Any]],
) -> tuple[str, list[dict[str, Any]]]:
    """The markdown report and its rows (one per measured step)."""
    reference = scores["cocoeval"]["stats"]
    rows: list[dict[str, Any]] = [
        {
            "step": "index: load_index (json read, checks, pycocotools index, arrays)",
            "work": f"{index['images']:,} images, {index['boxes']:,} boxes",
            "seconds": f"{index['seconds']:.1f}",
            "peak RSS MiB": _mib(index["peak_bytes"]),
            "rise MiB": _mib(index["rise_bytes"]),
            "mAP": "",
            "max diff to COCOeval": "",
        }
    ]
    for step, record in scores.items():
        diff = max(abs(a - b) for a, b in zip(record["stats"], reference, strict=True))
        name = (
            "mAP: COCOeval directly (pycocotools)"
            if step == "cocoeval"
            else f"mAP: as the task (torchmetrics, {step}, class_metrics)"
        )
        compute = record["compute_s"]
        seconds = f"{record['seconds']:.1f}"
        if compute == compute:  # not NaN: the task's path, updates then compute()
            seconds += f" (compute {compute:.1f})"
        rows.append(
            {
                "step": name,
                "work": f"{record['images']:,} images x {args.dets} dets",
                "seconds": seconds,
                "peak RSS MiB": _mib(record["peak_bytes"]),
                "rise MiB": _mib(record["rise_bytes"]),
                "mAP": f"{record['stats'][0]:.6f}",
                "max diff to COCOeval": f"{diff:.1e}",
            }
        )
    checks = (
        f"generated {generated.images:,} images ({generated.empty_images:,} without a box), "
        f"{generated.boxes:,} boxes ({generated.crowd:,} crowd), {generated.categories} "
        f"categories, {generated.bytes / 2**20:,.0f} MiB of json in {generate_s:.0f} s; the "
        f"index holds {index['images']:,} images, {index['boxes']:,} boxes ({index['crowd']:,} "
        f"crowd, {index['degenerate']} dropped), {index['empty_images']:,} images without a box; "
        f"its arrays keep {_mib(index['index_bytes'])} MiB"
    )
    lines = [
        "# COCO at train2017 scale: index and mAP (`python bench/bench_coco_scale.py`)",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in machine),
        "",
        f"Command: `python bench/bench_coco_scale.py --images {args.images} --boxes "
        f"{args.boxes} --eval-images {args.eval_images} --dets {args.dets} --seed {args.seed}`. "
        "Each step in a fresh process; peak RSS = that process's resident high-water mark "
        "during the step (Linux VmHWM, reset at the step's start), rise = the peak minus the "
        "resident size at the step's start (imports and inputs loaded). The task's path: "
        f"updates in batches of {args.batch}, then compute().",
        "",
        markdown_table(rows, list(rows[0])),
        "",
        checks + ".",
        "",
    ]
    return "\n".join(lines), rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (``--step`` is the measuring child's, not for users)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: temp)")
    parser.add_argument("--images", type=int, default=TRAIN2017_IMAGES)
    parser.add_argument("--boxes", type=int, default=TRAIN2017_BOXES)
    parser.add_argument("--eval-images", type=int, default=VAL_IMAGES)
    parser.add_argument("--dets", type=int, default=DETECTIONS_PER_IMAGE, help="per image")
    parser.add_argument("--batch", type=int, default=VAL_BATCH, help="images per metric update")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS, help="torchmetrics'"
    )
    parser.add_argument("--step", choices=["index", "cocoeval", *BACKENDS], help=argparse.SUPPRESS)
    parser.add_argument("--annotations", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--eval-set", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate, then index and score, each measured in its own process; print and write the
    table to ``<out>/bench_coco_scale.md`` (and ``.csv``)."""
    args = parse_args(argv)
    # Only this script's and mnv3's progress lines (faster_coco_eval logs its every summary).
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("mnv3", log.name):
        logging.getLogger(name).setLevel(logging.INFO)
    if args.step is not None:  # a measuring child
        args.record.write_text(json.dumps(run_step(args)))
        return 0
    machine = machine_info(torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="bench_coco_scale_") as temporary:
        work = Path(temporary)
        out = args.out or work
        args.annotations = out / "annotations" / "instances_train2017.json"
        log.info("generating %d images, %d boxes: %s", args.images, args.boxes, args.annotations)
        start = time.perf_counter()
        generated = write_annotation_file(args.annotations, args.images, args.boxes, args.seed)
        generate_s = time.perf_counter() - start
        (work / "image_sizes.json").write_text(json.dumps(generated.sizes))
        log.info("indexing (%.0f MiB) in a fresh process", generated.bytes / 2**20)
        index = _child("index", args, work)
        expected = (generated.images, generated.boxes, generated.crowd, 0)
        got = (index["images"], index["boxes"], index["crowd"], index["degenerate"])
        if got != expected:
            raise SystemExit(
                f"the index holds {got} (images, boxes, crowd, dropped), not {expected}"
            )
        scores = {step: _child(step, args, work) for step in ["cocoeval", *args.backends]}
        text, rows = report(args, machine, generated, generate_s, index, scores)
        print(text)
        write_results(out, "bench_coco_scale", text, rows)
        log.info("wrote %s", out / "bench_coco_scale.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
