"""COCO object detection read from its real layout, and COCO results json written back.

Layout: ``<root>/annotations/instances_<split>2017.json`` and ``<root>/<split>2017/<file_name>``
for the standard splits ``train`` and ``val``; any other split name ``s`` means
``annotations/instances_<s>.json`` and ``<root>/<s>/`` (``minival2014``, a custom subset, ...).

What the loader does with the annotations, and why:

- category ids (sparse, 1-90 in COCO) become contiguous labels ``1..K`` in ascending id order;
  label 0 is the background, as torchvision's detectors count it. ``label_to_category_id`` maps
  back (entry 0 is 0: background has no COCO id).
- crowd regions (``iscrowd=1``) are left out of the training targets but kept in ``eval_target``:
  COCOeval ignores detections that match them instead of counting them as false positives.
- boxes with non-positive width or height are dropped (from training and evaluation targets) and
  counted, one warning per dataset. Such a box can never be matched, so COCOeval on the raw json
  would count it as a miss; real COCO val2017 has none.
- only the ``bbox``, ``area`` and ``iscrowd`` fields are read: decoding segmentation masks is what
  makes detection loading slow (torchvision issue 7494). ``area`` is the segmentation area, which
  COCOeval uses for its small / medium / large ranges.
- images named in the json but missing on disk are counted, warned about once (with the first few
  names) and left out; the run goes on.

Per-image data lives in a few numpy arrays (offsets into flat annotation arrays), not in lists of
dicts: DataLoader workers are forked, and touching millions of Python objects would copy the
parent's memory into every worker (see :mod:`mnv3.data.folder`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mnv3.data.errors import (
    DatasetError,
    MissingImageWarning,
    UnreadableImageError,
    UnreadableImageWarning,
)
from mnv3.data.io import load_rgb

COCO_LAYOUT = (
    "a COCO tree <root>/annotations/instances_<split>2017.json with <root>/<split>2017/<images> "
    "(a split name other than train/val is used as is: annotations/instances_<split>.json, <split>/)"
)
# The json keys a detection annotation file must have (info and licenses are optional).
REQUIRED_KEYS: tuple[str, ...] = ("images", "annotations", "categories")
_STANDARD_SPLITS = ("train", "val", "test")
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


def coco_split_dir(split: str) -> str:
    """The image folder (and annotation file stem) of ``split``: ``train`` -> ``train2017``."""
    return f"{split}2017" if split in _STANDARD_SPLITS else split


def coco_annotation_file(root: str | os.PathLike[str], split: str) -> Path:
    """Path of the instances annotation file of ``split`` under ``root`` (it may not exist)."""
    return Path(root) / "annotations" / f"instances_{coco_split_dir(split)}.json"


def coco_image_dir(root: str | os.PathLike[str], split: str) -> Path:
    """Folder the ``file_name`` entries of ``split`` are relative to."""
    return Path(root) / coco_split_dir(split)


def coco_has_split(root: str | os.PathLike[str], split: str) -> bool:
    """True if ``root`` has the annotation file of ``split`` (its images are checked on load)."""
    return coco_annotation_file(root, split).is_file()


def coco_classes(root: str | os.PathLike[str], split: str = "train") -> tuple[list[str], list[str]]:
    """The object categories of ``split``: (category ids as strings, names), ascending by id.

    Entry ``i`` is label ``i + 1`` (0 is the background). Reads the annotation file once; the
    parsed index is cached, so building the dataset afterwards does not read it again.

    Raises:
        DatasetError: the annotation file is missing, not json, or not COCO detection json.
    """
    index = _load_index(coco_annotation_file(root, split))
    return [str(c) for c in index.category_ids.tolist()], list(index.category_names)


def label_to_category_id(category_ids: Sequence[int | str]) -> tuple[int, ...]:
    """The label -> COCO category id table for categories in label order; entry 0 is background."""
    return (0, *(int(c) for c in category_ids))


@dataclass(frozen=True)
class _CocoIndex:
    """One annotation file, parsed into flat read-only arrays; annotations grouped by image."""

    path: str
    category_ids: np.ndarray  # int64 (K,), ascending
    category_names: tuple[str, ...]
    image_ids: np.ndarray  # int64 (N,), ascending
    file_names: np.ndarray  # bytes (N,)
    offsets: np.ndarray  # int64 (N + 1,): annotations of image i are [offsets[i], offsets[i + 1])
    boxes: np.ndarray  # float32 (A, 4) xyxy in original image pixels
    category: np.ndarray  # int64 (A,) COCO category id
    iscrowd: np.ndarray  # bool (A,)
    area: np.ndarray  # float32 (A,)
    degenerate: int  # boxes dropped for non-positive width or height


def _load_index(path: Path) -> _CocoIndex:
    """The parsed annotation file, cached by path, modification time and size."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DatasetError(
            f"annotation file {path} does not exist; expected {COCO_LAYOUT}"
        ) from None
    return _parse_annotation_file(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _parse_annotation_file(path: str, mtime_ns: int, size: int) -> _CocoIndex:
    # mtime_ns and size only key the cache: a rewritten file is parsed again.
    del mtime_ns, size
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(
            f"annotation file {path} is not json ({error}); expected COCO detection json with "
            f"{', '.join(REQUIRED_KEYS)}"
        ) from None
    if not isinstance(data, dict):
        raise DatasetError(
            f"annotation file {path} holds a json {type(data).__name__}, not an object with "
            f"{', '.join(REQUIRED_KEYS)}"
        )
    missing = [key for key in REQUIRED_KEYS if not isinstance(data.get(key), list)]
    if missing:
        raise DatasetError(
            f"annotation file {path} lacks the list(s) {', '.join(missing)}; expected COCO "
            f"detection json with {', '.join(REQUIRED_KEYS)}"
        )
    _check_fields(path, data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return _build_index(path, coco)


_FIELDS = {
    "images": ("id", "file_name"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def _check_fields(path: str, data: dict[str, Any]) -> None:
    """One sentence for the first entry that lacks a field the loader reads."""
    for key, fields in _FIELDS.items():
        for position, entry in enumerate(data[key]):
            absent = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if absent:
                raise DatasetError(
                    f"annotation file {path}: {key}[{position}] lacks {', '.join(absent)}; "
                    f"every entry of {key} needs {', '.join(fields)}"
                )


def _build_index(path: str, coco: COCO) -> _CocoIndex:
    cats = sorted(coco.cats.values(), key=lambda c: int(c["id"]))
    category_ids = np.array([int(c["id"]) for c in cats], dtype=np.int64)
    if len(np.unique(category_ids)) != len(category_ids):
        raise DatasetError(f"annotation file {path} lists a category id twice in categories")
    image_ids = np.array(sorted(coco.imgs), dtype=np.int64)
    if len(image_ids) != len(coco.dataset["images"]):
        raise DatasetError(f"annotation file {path} lists an image id twice in images")
    file_names = np.array(
        [os.fsencode(str(coco.imgs[int(i)]["file_name"])) for i in image_ids], dtype=np.bytes_
    )

    anns = coco.dataset["annotations"]
    ann_image = np.array([int(a["image_id"]) for a in anns], dtype=np.int64)
    category = np.array([int(a["category_id"]) for a in anns], dtype=np.int64)
    try:
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(len(anns), 4)
    except (TypeError, ValueError):
        raise DatasetError(
            f"annotation file {path} has a bbox that is not 4 numbers [x, y, width, height]"
        ) from None
    iscrowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    # COCOeval sizes ground truth by its `area` (the segmentation's); box area when absent.
    area = np.array(
        [a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], dtype=np.float64
    ).reshape(len(anns))

    position = np.searchsorted(image_ids, ann_image)
    if len(image_ids):
        known_image = image_ids[np.minimum(position, len(image_ids) - 1)] == ann_image
    else:
        known_image = np.zeros(len(anns), dtype=bool)
    if not known_image.all():
        bad = int(np.flatnonzero(~known_image)[0])
        raise DatasetError(
            f"annotation file {path}: annotation {anns[bad]['id']} names image_id "
            f"{ann_image[bad]}, which is not in images"
        )
    known_category = np.isin(category, category_ids)
    if not known_category.all():
        bad = int(np.flatnonzero(~known_category)[0])
        raise DatasetError(
            f"annotation file {path}: annotation {anns[bad]['id']} names category_id "
            f"{category[bad]}, which is not in categories"
        )

    valid = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
    order = np.argsort(position[valid], kind="stable")
    kept_xywh = xywh[valid][order]
    boxes = np.concatenate([kept_xywh[:, :2], kept_xywh[:, :2] + kept_xywh[:, 2:]], axis=1)
    counts = np.bincount(position[valid], minlength=len(image_ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    arrays = {
        "category_ids": category_ids,
        "image_ids": image_ids,
        "file_names": file_names,
        "offsets": offsets,
        "boxes": boxes.astype(np.float32),
        "category": category[valid][order],
        "iscrowd": iscrowd[valid][order],
        "area": area[valid][order].astype(np.float32),
    }
    for array in arrays.values():
        array.flags.writeable = False  # shared by every dataset built from the cache
    return _CocoIndex(
        path=path,
        category_names=tuple(str(c["name"]) for c in cats),
        degenerate=int((~valid).sum()),
        **arrays,
    )


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
        index = _load_index(self.annotation_file)
        self._index = index

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

        if not self.image_dir.is_dir():
            raise DatasetError(
                f"image folder {self.image_dir} does not exist; expected {COCO_LAYOUT}"
            )
        on_disk = _present(self.image_dir, index.file_names)
        self.missing_images = int((~on_disk).sum())
        if len(on_disk) and not on_disk.any():
            raise DatasetError(
                f"none of the {len(on_disk)} images listed in {self.annotation_file} is under "
                f"{self.image_dir}; expected {COCO_LAYOUT}"
            )
        if self.missing_images:
            shown = [os.fsdecode(n) for n in index.file_names[~on_disk][:_MISSING_NAMES_SHOWN]]
            warnings.warn(
                f"{self.missing_images} of {len(on_disk)} images listed in "
                f"{self.annotation_file} are missing under {self.image_dir} and left out "
                f"(first: {', '.join(shown)})",
                MissingImageWarning,
                stacklevel=2,
            )
        self._boxes_per_image = np.diff(index.offsets)
        image_of_box = np.repeat(np.arange(len(on_disk)), self._boxes_per_image)
        self._crowd_per_image = np.bincount(image_of_box[index.iscrowd], minlength=len(on_disk))
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

        self.degenerate_boxes = index.degenerate
        if index.degenerate:
            warnings.warn(
                f"{index.degenerate} box(es) with non-positive width or height in "
                f"{self.annotation_file} were dropped",
                DegenerateBoxWarning,
                stacklevel=2,
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
        path = self.path(index)
        try:
            image = load_rgb(path)
        except UnreadableImageError as error:
            warnings.warn(f"skipping {error}", UnreadableImageWarning, stacklevel=2)
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
