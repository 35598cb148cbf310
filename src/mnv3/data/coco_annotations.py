"""COCO instances annotation files: where they lie, and the checked, flat index read from them.

Layout: ``<root>/annotations/instances_<split>2017.json`` and ``<root>/<split>2017/<file_name>``
for the standard splits ``train`` and ``val``; any other split name ``s`` means
``annotations/instances_<s>.json`` and ``<root>/<s>/`` (``minival2014``, a custom subset, ...).

What the index keeps of a file, and why:

- only the ``bbox``, ``area`` and ``iscrowd`` fields are read: decoding segmentation masks is what
  makes detection loading slow (torchvision issue 7494). ``area`` is the segmentation area, which
  COCOeval uses for its small / medium / large ranges.
- boxes with non-positive width or height are dropped and counted (the dataset warns once). Such
  a box can never be matched, so COCOeval on the raw json would count it as a miss; real COCO
  val2017 has none.
- a file that is not COCO detection json, an entry without a field the loader reads or with the
  wrong json type (a string or null id), a NaN or infinite coordinate or area, a negative area, a
  repeated image or category id, or an annotation naming an unknown image or category is a
  :class:`~mnv3.data.errors.DatasetError` naming the file and the entry: never scored.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from mnv3.data.errors import DatasetError

COCO_LAYOUT = (
    "a COCO tree <root>/annotations/instances_<split>2017.json with <root>/<split>2017/<images> "
    "(a split name other than train/val is used as is: annotations/instances_<split>.json, <split>/)"
)
# The json keys a detection annotation file must have (info and licenses are optional).
REQUIRED_KEYS: tuple[str, ...] = ("images", "annotations", "categories")
_STANDARD_SPLITS = ("train", "val", "test")
_FIELDS = {
    "images": ("id", "file_name"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


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
    index = load_index(coco_annotation_file(root, split))
    return [str(c) for c in index.category_ids.tolist()], list(index.category_names)


def label_to_category_id(category_ids: Sequence[int | str]) -> tuple[int, ...]:
    """The label -> COCO category id table for categories in label order; entry 0 is background."""
    return (0, *(int(c) for c in category_ids))


@dataclass(frozen=True)
class CocoIndex:
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


def load_index(path: Path) -> CocoIndex:
    """The parsed annotation file, cached by path, modification time and size.

    Raises:
        DatasetError: the file is missing, not json, or not valid COCO detection json.
    """
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DatasetError(
            f"annotation file {path} does not exist; expected {COCO_LAYOUT}"
        ) from None
    return _parse_annotation_file(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _parse_annotation_file(path: str, mtime_ns: int, size: int) -> CocoIndex:
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


def _check_fields(path: str, data: dict[str, Any]) -> None:
    """One sentence for the first entry that lacks a field the loader reads, or holds it with the
    wrong json type (a string or null id, a bbox that is not 4 numbers, a non-numeric area).

    Runs before pycocotools indexes the file: its index is keyed by these ids, so a list as an
    id would fail there with a traceback, and a string id would silently never match an integer.
    """
    for key, fields in _FIELDS.items():
        for position, entry in enumerate(data[key]):
            absent = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if absent:
                raise DatasetError(
                    f"annotation file {path}: {key}[{position}] lacks {', '.join(absent)}; "
                    f"every entry of {key} needs {', '.join(fields)}"
                )
            for field in fields:
                expected = _field_type_error(field, entry[field])
                if expected:
                    raise DatasetError(
                        f"annotation file {path}: {key}[{position}] has {field}="
                        f"{json.dumps(entry[field])[:60]}; expected {expected}"
                    )
            for field in _OPTIONAL_NUMBERS.get(key, ()):
                if field in entry and not _is_number(entry[field]):
                    raise DatasetError(
                        f"annotation file {path}: {key}[{position}] has {field}="
                        f"{json.dumps(entry[field])[:60]}; expected a number"
                    )


# Optional annotation fields the loader reads, when present (area falls back to the box's).
_OPTIONAL_NUMBERS = {"annotations": ("area", "iscrowd")}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _field_type_error(field: str, value: Any) -> str:
    """What ``field`` should hold when ``value`` is of the wrong json type, else ''."""
    if field.endswith("id"):
        return "" if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if field == "bbox":
        if isinstance(value, list) and len(value) == 4 and all(_is_number(v) for v in value):
            return ""
        return "4 numbers [x, y, width, height]"
    return "" if isinstance(value, str) else "a string"


def _build_index(path: str, coco: COCO) -> CocoIndex:
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
    columns = _annotation_columns(path, anns)
    position = _check_references(path, anns, columns, image_ids, category_ids)

    valid = (columns["xywh"][:, 2] > 0) & (columns["xywh"][:, 3] > 0)
    order = np.argsort(position[valid], kind="stable")
    kept_xywh = columns["xywh"][valid][order]
    boxes = np.concatenate([kept_xywh[:, :2], kept_xywh[:, :2] + kept_xywh[:, 2:]], axis=1)
    counts = np.bincount(position[valid], minlength=len(image_ids))
    arrays = {
        "category_ids": category_ids,
        "image_ids": image_ids,
        "file_names": file_names,
        "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "boxes": boxes.astype(np.float32),
        "category": columns["category"][valid][order],
        "iscrowd": columns["iscrowd"][valid][order],
        "area": columns["area"][valid][order].astype(np.float32),
    }
    for array in arrays.values():
        array.flags.writeable = False  # shared by every dataset built from the cache
    return CocoIndex(
        path=path,
        category_names=tuple(str(c["name"]) for c in cats),
        degenerate=int((~valid).sum()),
        **arrays,
    )


def _annotation_columns(path: str, anns: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The fields the loader reads, one array per field, in file order; types were checked by
    :func:`_check_fields`, values are checked here: a NaN or infinite coordinate or area, or a
    negative area of a kept box, is refused (scoring it would move mAP silently: a NaN x in every val box was
    measured to raise a 2-step model's mAP from 0.0045 to 0.506)."""
    image = np.array([a["image_id"] for a in anns], dtype=np.int64)
    category = np.array([a["category_id"] for a in anns], dtype=np.int64)
    xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(len(anns), 4)
    # COCOeval sizes ground truth by its `area` (the segmentation's); box area when absent.
    area = np.array(
        [a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], dtype=np.float64
    ).reshape(len(anns))
    # The area of a box dropped as degenerate (non-positive width or height) is never read.
    kept = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
    for name, bad in (
        ("a bbox with a non-finite number", ~np.isfinite(xywh).all(axis=1)),
        ("a non-finite area", kept & ~np.isfinite(area)),
        ("a negative area", kept & (area < 0)),
    ):
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DatasetError(
                f"annotation file {path}: annotation {anns[first]['id']} "
                f"(annotations[{first}]) has {name} (bbox {anns[first]['bbox']}, area "
                f"{anns[first].get('area')}); {int(bad.sum())} annotation(s) like it, expected "
                "finite numbers and an area >= 0"
            )
    return {
        "image": image,
        "category": category,
        "xywh": xywh,
        "iscrowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
        "area": area,
    }


def _check_references(
    path: str,
    anns: list[dict[str, Any]],
    columns: dict[str, np.ndarray],
    image_ids: np.ndarray,
    category_ids: np.ndarray,
) -> np.ndarray:
    """Each annotation's image position in ``image_ids``, once every image and category it names
    is known to be listed."""
    ann_image, category = columns["image"], columns["category"]
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
    return position
