"""COCO object detection read from its real layout, and COCO results json written back.

The annotation files, their layout and the checked index read from them are
:mod:`mnv3.data.coco_annotations`; this module turns that index into training and evaluation
samples, and predictions into COCO results json. What the dataset does, and why:

- category ids (sparse, 1-90 in COCO) become contiguous labels ``1..K`` in ascending id order;
  label 0 is the background, as torchvision's detectors count it. ``label_to_category_id`` maps
  back (entry 0 is 0: background has no COCO id).
- crowd regions (``iscrowd=1``) are left out of the training targets but kept in ``eval_target``:
  COCOeval ignores detections that match them instead of counting them as false positives.
- boxes with non-positive width or height (dropped by the index) are counted, one warning per
  dataset.
- images named in the json but missing on disk are counted, warned about once (with the first few
  names) and left out; the run goes on.

:data:`COCO` is the ``coco`` dataset family (detection); its option ``keep_empty`` keeps training
images without a box.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mnv3.data.coco_annotations import (
    COCO_LAYOUT,
    CocoIndex,
    coco_annotation_file,
    coco_classes,
    coco_has_split,
    coco_image_dir,
    label_to_category_id,
    load_index,
)
from mnv3.data.errors import DatasetError, MissingImageWarning
from mnv3.data.family import TRAIN_SPLIT, DatasetFamily, DatasetSpec, SplitKind, split_on_disk
from mnv3.data.io import load_rgb, skip_unreadable

# COCOeval's own thresholds (pycocotools ``Params.setDetParams``) as Python floats, for
# torchmetrics' MeanAveragePrecision. Its defaults come from a float32 ``torch.linspace``
# (0.2 -> 0.19999999), which moves the precision lookup wherever a recall lands exactly on a
# threshold: measured 6e-4 mAP away from COCOeval on 80 real COCO images.
COCO_IOU_THRESHOLDS: tuple[float, ...] = tuple(np.linspace(0.5, 0.95, 10).tolist())
COCO_RECALL_THRESHOLDS: tuple[float, ...] = tuple(np.linspace(0.0, 1.0, 101).tolist())
# COCO's twelve summary numbers in ``COCOeval.stats`` order, as torchmetrics names them.
COCO_SUMMARY_KEYS: tuple[str, ...] = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)
_MISSING_NAMES_SHOWN = 5

Sample = dict[str, Any]
DetectionTransform = Callable[[Sample], Sample]


class DegenerateBoxWarning(UserWarning):
    """Warned once per dataset whose annotations hold boxes with non-positive width or height."""


class CocoDetection(Dataset[Sample | None]):
    """COCO detection images with their boxes; yields the sample dict of the detection task.

    A sample (``None`` when the image file cannot be decoded, after one
    :class:`~mnv3.data.errors.UnreadableImageWarning`)::

        {"image": tv_tensors.Image uint8 (3, H, W),
         "boxes": tv_tensors.BoundingBoxes float32 (N, 4) XYXY, canvas_size=(H, W),
         "labels": int64 (N,) in 1..K,
         "image_id": int, "orig_size": (H, W),
         "eval_target": {"boxes": float32 (M, 4) xyxy in original pixels, "labels": int64 (M,),
                         "iscrowd": int64 (M,), "area": float32 (M,)}}

    ``boxes`` / ``labels`` are the training targets: crowd regions left out, boxes clipped to the
    image. ``eval_target`` holds every kept annotation, crowd included, as plain tensors, which
    ``torchvision.transforms.v2`` passes through untouched, so it stays in original pixels.

    Args:
        root: the COCO root (see :data:`COCO_LAYOUT`).
        split: ``"train"``, ``"val"`` or a custom split name.
        transform: applied to the whole sample dict (e.g. a detection preset).
        train: a training split: images without any training box are dropped unless
            ``keep_empty``. Evaluation splits keep every image.
        keep_empty: keep training images that have no (non-crowd) box: pure background examples.
        category_ids: the categories to label with, in label order (the training split's, so
            that a category absent from this split does not shift the labels); ``None`` uses this
            file's categories.

    Raises:
        DatasetError: the annotation file is missing or not COCO detection json, the image folder
            is missing, no listed image is on disk, no image is left to use, or the file has a
            category outside ``category_ids``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        transform: DetectionTransform | None = None,
        train: bool = False,
        keep_empty: bool = False,
        category_ids: Sequence[int | str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.train = bool(train)
        self.keep_empty = bool(keep_empty)
        self.annotation_file = coco_annotation_file(root, split)
        self.image_dir = coco_image_dir(root, split)
        self._index: CocoIndex = load_index(self.annotation_file)
        self._label_categories(category_ids)
        self._select_images(self._images_on_disk())
        self.degenerate_boxes = self._index.degenerate
        if self.degenerate_boxes:
            warnings.warn(
                f"{self.degenerate_boxes} box(es) with non-positive width or height in "
                f"{self.annotation_file} were dropped",
                DegenerateBoxWarning,
                stacklevel=2,
            )

    def _label_categories(self, category_ids: Sequence[int | str] | None) -> None:
        """Labels 1..K for the categories (``category_ids`` in label order, or this file's)."""
        index = self._index
        ids = index.category_ids if category_ids is None else np.array(category_ids, np.int64)
        if category_ids is not None:
            foreign = np.setdiff1d(index.category_ids, ids)
            if len(foreign):
                raise DatasetError(
                    f"annotation file {self.annotation_file} has category id(s) "
                    f"{', '.join(map(str, foreign[:5].tolist()))} that are not among the "
                    f"{len(ids)} training categories; expected the training split's categories"
                )
            names = dict(zip(index.category_ids.tolist(), index.category_names, strict=True))
            self.category_names = [names.get(int(c), str(int(c))) for c in ids]
        else:
            self.category_names = list(index.category_names)
        self.category_ids = [int(c) for c in ids]
        self.label_to_category_id = label_to_category_id(self.category_ids)
        by_id = np.argsort(ids, kind="stable")
        self._labels = by_id[np.searchsorted(ids[by_id], index.category)].astype(np.int64) + 1

    def _images_on_disk(self) -> np.ndarray:
        """Which listed images exist (bool per image); the missing ones are warned about once."""
        if not self.image_dir.is_dir():
            raise DatasetError(
                f"image folder {self.image_dir} does not exist; expected {COCO_LAYOUT}"
            )
        file_names = self._index.file_names
        on_disk = _present(self.image_dir, file_names)
        self.missing_images = int((~on_disk).sum())
        if len(on_disk) and not on_disk.any():
            raise DatasetError(
                f"none of the {len(on_disk)} images listed in {self.annotation_file} is under "
                f"{self.image_dir}; expected {COCO_LAYOUT}"
            )
        if self.missing_images:
            shown = [os.fsdecode(n) for n in file_names[~on_disk][:_MISSING_NAMES_SHOWN]]
            warnings.warn(
                f"{self.missing_images} of {len(on_disk)} images listed in "
                f"{self.annotation_file} are missing under {self.image_dir} and left out "
                f"(first: {', '.join(shown)})",
                MissingImageWarning,
                stacklevel=3,
            )
        return on_disk

    def _select_images(self, on_disk: np.ndarray) -> None:
        """The samples: images on disk, less training images without a training box (unless
        ``keep_empty``)."""
        self._boxes_per_image = np.diff(self._index.offsets)
        image_of_box = np.repeat(np.arange(len(on_disk)), self._boxes_per_image)
        crowd = self._index.iscrowd
        self._crowd_per_image = np.bincount(image_of_box[crowd], minlength=len(on_disk))
        has_training_box = self._boxes_per_image > self._crowd_per_image
        keep = on_disk & (has_training_box | (not self.train) | self.keep_empty)
        self.empty_images_dropped = int((on_disk & ~keep).sum())
        self._positions = np.flatnonzero(keep).astype(np.int64)
        if not len(self._positions):
            raise DatasetError(
                f"annotation file {self.annotation_file} leaves no image to use ({len(on_disk)} "
                f"listed, {self.empty_images_dropped} without boxes dropped); expected images "
                f"with boxes under {self.image_dir}"
            )

    def __len__(self) -> int:
        return len(self._positions)

    @property
    def num_categories(self) -> int:
        """K, the number of object categories (labels 1..K)."""
        return len(self.category_ids)

    @property
    def num_classes(self) -> int:
        """K + 1: the categories plus the background, as torchvision's detectors count classes."""
        return len(self.category_ids) + 1

    @property
    def classes(self) -> list[str]:
        """Category ids as strings, in label order (label = index + 1)."""
        return [str(c) for c in self.category_ids]

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids of the samples, in sample order."""
        return self._index.image_ids[self._positions].tolist()

    def stats(self) -> dict[str, int]:
        """Counts worth logging: images and boxes kept, and what was left out and why."""
        crowd = int(self._crowd_per_image[self._positions].sum())
        boxes = int(self._boxes_per_image[self._positions].sum())
        return {
            "images": len(self),
            "boxes": boxes - crowd,
            "crowd_boxes": crowd,
            "missing_images": self.missing_images,
            "empty_images_dropped": self.empty_images_dropped,
            "degenerate_boxes": self.degenerate_boxes,
        }

    def path(self, index: int) -> str:
        """Path of sample ``index``'s image file."""
        name = self._index.file_names[self._positions[index]]
        return os.path.join(self.image_dir, os.fsdecode(name))

    def __getitem__(self, index: int) -> Sample | None:
        image = skip_unreadable(load_rgb, self.path(index))
        if image is None:
            return None
        sample = self._sample(index, image)
        return self.transform(sample) if self.transform is not None else sample

    def _sample(self, index: int, image: torch.Tensor) -> Sample:
        position = int(self._positions[index])
        start, end = self._index.offsets[position], self._index.offsets[position + 1]
        boxes = torch.from_numpy(self._index.boxes[start:end].copy())
        labels = torch.from_numpy(self._labels[start:end].copy())
        iscrowd = torch.from_numpy(self._index.iscrowd[start:end].copy())
        height, width = (int(v) for v in image.shape[-2:])

        train_boxes = boxes[~iscrowd]
        train_boxes[:, 0::2] = train_boxes[:, 0::2].clamp(0, width)
        train_boxes[:, 1::2] = train_boxes[:, 1::2].clamp(0, height)
        # A box lying wholly outside the image has nothing left after clipping.
        inside = (train_boxes[:, 2] > train_boxes[:, 0]) & (train_boxes[:, 3] > train_boxes[:, 1])
        return {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(
                train_boxes[inside], format="XYXY", canvas_size=(height, width)
            ),
            "labels": labels[~iscrowd][inside],
            "image_id": int(self._index.image_ids[position]),
            "orig_size": (height, width),
            "eval_target": {
                "boxes": boxes,
                "labels": labels,
                "iscrowd": iscrowd.to(torch.int64),
                "area": torch.from_numpy(self._index.area[start:end].copy()),
            },
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"images={len(self)}, categories={self.num_categories})"
        )


def _present(image_dir: Path, file_names: np.ndarray) -> np.ndarray:
    """Which of ``file_names`` exist under ``image_dir``: one directory listing, not N stats."""
    with os.scandir(image_dir) as entries:
        listed = {os.fsencode(e.name) for e in entries}
    present = np.fromiter((n in listed for n in file_names), dtype=bool, count=len(file_names))
    # Names with a sub-folder are not in the top-level listing: check those one by one.
    nested = np.flatnonzero(np.char.find(file_names, b"/") >= 0)
    for i in nested:
        present[i] = (image_dir / os.fsdecode(file_names[i])).is_file()
    return present


def coco_results(
    predictions: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    label_to_category_id: Sequence[int],
) -> list[dict[str, Any]]:
    """Detections as COCO results json entries ``{image_id, category_id, bbox, score}``.

    Args:
        predictions: one ``{"boxes": (N, 4) xyxy in original image pixels, "scores": (N,),
            "labels": (N,) in 1..K}`` per image (tensors or arrays).
        image_ids: the COCO image id of each prediction.
        label_to_category_id: label -> COCO category id (``CocoDetection.label_to_category_id``).

    Returns:
        One dict per detection, ``bbox`` as ``[x, y, width, height]``, in prediction order.

    Raises:
        ValueError: lengths differ, or a label is 0 (background) or beyond the table.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"{len(predictions)} predictions but {len(image_ids)} image ids")
    table = np.asarray(label_to_category_id, dtype=np.int64)
    results: list[dict[str, Any]] = []
    for prediction, image_id in zip(predictions, image_ids, strict=True):
        boxes = _numpy(prediction["boxes"], np.float64).reshape(-1, 4)
        scores = _numpy(prediction["scores"], np.float64).reshape(-1)
        labels = _numpy(prediction["labels"], np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels"
            )
        if len(labels) and (labels.min() < 1 or labels.max() >= len(table)):
            raise ValueError(
                f"image {image_id}: labels must be in 1..{len(table) - 1}, got "
                f"{labels.min()}..{labels.max()}"
            )
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        categories = table[labels]
        results += [
            {
                "image_id": int(image_id),
                "category_id": int(c),
                "bbox": [float(v) for v in box],
                "score": float(s),
            }
            for box, s, c in zip(xywh, scores, categories, strict=True)
        ]
    return results


def _numpy(value: Any, dtype: type) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def write_coco_results(path: str | os.PathLike[str], results: Sequence[Mapping[str, Any]]) -> Path:
    """Write COCO results json atomically (a temporary file renamed into place); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(list(results), file)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


# --- The COCO detection family: annotations/instances_<split>2017.json + <split>2017/ -----------

# Training images without a (non-crowd) box: pure background examples, off as in torchvision.
_DETECTION_OPTIONS: dict[str, Any] = {"keep_empty": False}


def _coco_classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    # COCO lists the same 80 categories in every split's json: with val2017 alone on disk
    # (evaluating released weights), the val json gives the labels training would have used.
    if not coco_has_split(spec.root, TRAIN_SPLIT) and coco_has_split(spec.root, spec.val_split):
        return coco_classes(spec.root, spec.val_split)
    return coco_classes(spec.root, TRAIN_SPLIT)


def _coco_build(spec: DatasetSpec, kind: SplitKind, transform: DetectionTransform) -> Dataset:
    category_ids, _ = _coco_classes(spec)
    return CocoDetection(
        spec.root,
        spec.folder(kind),
        transform,
        train=kind == "train",
        keep_empty=bool(spec.option("keep_empty")),
        category_ids=category_ids,
    )


COCO = DatasetFamily(
    _coco_classes,
    _coco_build,
    split_on_disk(coco_has_split),
    COCO_LAYOUT,
    task="detection",
    options=_DETECTION_OPTIONS,
)
