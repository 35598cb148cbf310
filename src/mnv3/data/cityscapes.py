"""Cityscapes semantic segmentation read from its real layout, with the official label tables.

Layout: ``<root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and, for each
image, ``<root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png``.

What the loader does, and why:

- training ids are computed from the ``labelIds`` maps with the table of cityscapesScripts'
  ``helpers/labels.py`` (:data:`CITYSCAPES_LABELS`); shipped ``labelTrainIds`` files are never
  read: they are derived data and can disagree with the table (the real val frame under
  ``../shared/data`` differs on 77 border pixels).
- the 19 evaluated classes become ids 0..18 in the table's order; every other id (void classes,
  parking, guard rail, ..., license plate -1) becomes :data:`IGNORE_INDEX` (255). A subset of the
  19 classes (``classes=``) renumbers the kept ones 0..K-1 in the same order and ignores the rest.
- an image whose label file is missing is an error when the split is listed (cheap: one directory
  listing per city); a label map whose size differs from its image, or that holds ids outside the
  table (0..33 and -1), is an error when that sample is loaded, since only decoding tells.
- the sample list is one numpy byte array of ``<city>/<stem>`` names, not a list of Python
  strings: DataLoader workers are forked and touching many Python objects copies the parent's
  memory into each of them (see :mod:`mnv3.data.folder`).

:data:`CITYSCAPES` is the ``cityscapes`` dataset family (segmentation, official colours as its
palette); its option ``train_classes`` picks a subset of the 19 classes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mnv3.data.errors import DatasetError, UnreadableImageError, require_root
from mnv3.data.family import DatasetFamily, DatasetSpec, SplitKind, split_on_disk
from mnv3.data.io import load_rgb, skip_unreadable

IMAGE_DIR = "leftImg8bit"
LABEL_DIR = "gtFine"
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
CITYSCAPES_LAYOUT = (
    "a Cityscapes tree <root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png with "
    "<root>/gtFine/<split>/<city>/*_gtFine_labelIds.png for every image"
)
# Pixels of this value take no part in the loss or the metric (torchmetrics ignore_index).
IGNORE_INDEX = 255
_MISSING_SHOWN = 3

Sample = dict[str, Any]
SegmentationTransform = Callable[[Sample], Sample]


class CityscapesLabel(NamedTuple):
    """One row of cityscapesScripts' label table: name, labelId, trainId (255: not evaluated),
    and the official colour of colour-coded label images."""

    name: str
    id: int
    train_id: int
    colour: tuple[int, int, int]


# cityscapesScripts helpers/labels.py, ids 0..33 and -1 (license plate: never drawn into the
# label images, kept so an id table that uses it maps it to ignore).
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = (
    CityscapesLabel("unlabeled", 0, 255, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, 255, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, 255, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, 255, (0, 0, 0)),
    CityscapesLabel("static", 4, 255, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, 255, (111, 74, 0)),
    CityscapesLabel("ground", 6, 255, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, (244, 35, 232)),
    CityscapesLabel("parking", 9, 255, (250, 170, 160)),
    CityscapesLabel("rail track", 10, 255, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, 255, (180, 165, 180)),
    CityscapesLabel("bridge", 15, 255, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, 255, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, 255, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, (0, 60, 100)),
    CityscapesLabel("caravan", 29, 255, (0, 0, 90)),
    CityscapesLabel("trailer", 30, 255, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, (119, 11, 32)),
    CityscapesLabel("license plate", -1, 255, (0, 0, 142)),
)
MIN_LABEL_ID = -1
MAX_LABEL_ID = 33

_EVALUATED = sorted((lab for lab in CITYSCAPES_LABELS if lab.train_id != 255), key=lambda x: x[2])
# The 19 evaluated classes in trainId order, their labelIds and their official colours.
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(lab.name for lab in _EVALUATED)
CITYSCAPES_LABEL_IDS: tuple[int, ...] = tuple(lab.id for lab in _EVALUATED)
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = tuple(lab.colour for lab in _EVALUATED)
_BY_NAME = {lab.name: lab for lab in _EVALUATED}


def check_classes(classes: Sequence[str] | None) -> tuple[str, ...]:
    """The training classes: ``None`` means the 19; a subset is put in Cityscapes' trainId order.

    Raises:
        DatasetError: a name that is not one of the 19 evaluated classes, or a repeated or empty list.
    """
    if classes is None:
        return CITYSCAPES_CLASSES
    names = [str(c) for c in classes]
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown or not names or len(set(names)) != len(names):
        raise DatasetError(
            f"train_classes={names!r} must list distinct Cityscapes classes "
            f"(unknown: {', '.join(unknown) or 'none'}); expected names among "
            f"{', '.join(CITYSCAPES_CLASSES)}"
        )
    return tuple(n for n in CITYSCAPES_CLASSES if n in names)


def label_id_table(classes: Sequence[str] | None = None) -> np.ndarray:
    """labelId -> training id lookup, indexed by ``labelId - MIN_LABEL_ID`` (so -1 is entry 0).

    Training ids are positions in ``classes`` (the 19 by default: Cityscapes' trainIds); every
    other labelId maps to :data:`IGNORE_INDEX`.
    """
    names = check_classes(classes)
    table = np.full(MAX_LABEL_ID - MIN_LABEL_ID + 1, IGNORE_INDEX, dtype=np.uint8)
    for train_id, name in enumerate(names):
        table[_BY_NAME[name].id - MIN_LABEL_ID] = train_id
    return table


def label_ids_to_train_ids(
    label_ids: np.ndarray, classes: Sequence[str] | None = None, source: str = "label map"
) -> np.ndarray:
    """Map a labelIds array to training ids (uint8, :data:`IGNORE_INDEX` for unevaluated ids).

    Args:
        label_ids: integer array of Cityscapes labelIds (any shape, signed or unsigned).
        classes: training classes (see :func:`check_classes`).
        source: the file name, for the error message.

    Raises:
        DatasetError: ids outside the Cityscapes table (0..33 and -1), naming ``source``.
    """
    ids = np.asarray(label_ids)
    if ids.size and (int(ids.min()) < MIN_LABEL_ID or int(ids.max()) > MAX_LABEL_ID):
        foreign = np.unique(ids[(ids < MIN_LABEL_ID) | (ids > MAX_LABEL_ID)])
        shown = ", ".join(str(int(v)) for v in foreign[:8]) + (", ..." if len(foreign) > 8 else "")
        raise DatasetError(
            f"label map {source} holds ids {shown} outside the Cityscapes label table; expected "
            f"labelIds {MIN_LABEL_ID} or 0..{MAX_LABEL_ID} (cityscapesScripts helpers/labels.py)"
        )
    table = label_id_table(classes)
    if ids.dtype == np.uint8:
        # 8-bit files (the usual case): a 256-entry lookup indexed by the pixels themselves,
        # with no int64 copy of a 1024x2048 map.
        lookup = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lookup[: MAX_LABEL_ID + 1] = table[-MIN_LABEL_ID:]
        return lookup[ids]
    return table[ids.astype(np.int64) - MIN_LABEL_ID]


def train_id_to_label_id(classes: Sequence[str] | None = None) -> np.ndarray:
    """Training id -> labelId lookup (uint8, 256 entries); unknown and ignored ids give 0.

    This is what turns predictions into the ``*_labelIds.png`` files the Cityscapes evaluation
    server takes; 0 (``unlabeled``) is never evaluated.
    """
    table = np.zeros(256, dtype=np.uint8)
    for train_id, name in enumerate(check_classes(classes)):
        table[train_id] = _BY_NAME[name].id
    return table


def train_ids_to_label_ids(
    train_ids: np.ndarray, classes: Sequence[str] | None = None
) -> np.ndarray:
    """Map training ids (e.g. an argmax prediction) back to Cityscapes labelIds (uint8)."""
    ids = np.asarray(train_ids)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > 255):
        raise ValueError(f"training ids must be in 0..255, got {int(ids.min())}..{int(ids.max())}")
    return train_id_to_label_id(classes)[ids.astype(np.int64)]


def segmentation_palette(classes: Sequence[str] | None = None) -> np.ndarray:
    """Colours for colour-coded masks: uint8 ``(256, 3)``, row = training id; ignored ids black.

    ``palette[mask]`` turns an ``(H, W)`` training-id mask into an ``(H, W, 3)`` RGB picture in
    the official Cityscapes colours.
    """
    palette = np.zeros((256, 3), dtype=np.uint8)
    for train_id, name in enumerate(check_classes(classes)):
        palette[train_id] = _BY_NAME[name].colour
    return palette


def cityscapes_has_split(root: str | os.PathLike[str], split: str) -> bool:
    """True if ``root`` has both the image and the label folder of ``split``."""
    root = Path(root)
    return (root / IMAGE_DIR / split).is_dir() and (root / LABEL_DIR / split).is_dir()


def frame_name(image_file: str) -> str:
    """``frankfurt_000000_000294_leftImg8bit.png`` -> ``frankfurt_000000_000294``."""
    return image_file[: -len(IMAGE_SUFFIX)]


def _listing(folder: Path) -> set[str]:
    with os.scandir(folder) as entries:
        return {e.name for e in entries}


def list_frames(root: str | os.PathLike[str], split: str) -> np.ndarray:
    """The frames of ``split`` as sorted ``<city>/<frame name>`` byte strings.

    Raises:
        DatasetError: a folder is missing, the split has no image, or an image has no label file
            (naming the image, the label file it needs, and how many images lack theirs).
    """
    root = Path(root)
    image_root, label_root = root / IMAGE_DIR / split, root / LABEL_DIR / split
    require_root(root, CITYSCAPES_LAYOUT)
    for folder in (image_root, label_root):
        if not folder.is_dir():
            raise DatasetError(f"folder {folder} does not exist; expected {CITYSCAPES_LAYOUT}")
    frames: list[bytes] = []
    missing: list[tuple[Path, Path]] = []
    for city in sorted(e.name for e in os.scandir(image_root) if e.is_dir()):
        names = sorted(n for n in _listing(image_root / city) if n.endswith(IMAGE_SUFFIX))
        labels = _listing(label_root / city) if (label_root / city).is_dir() else set()
        for name in names:
            stem = frame_name(name)
            if stem + LABEL_SUFFIX not in labels:
                missing.append(
                    (image_root / city / name, label_root / city / (stem + LABEL_SUFFIX))
                )
            frames.append(os.fsencode(f"{city}/{stem}"))
    if missing:
        image, label = missing[0]
        raise DatasetError(
            f"image {image} has no label file {label} ({len(missing)} of {len(frames)} images in "
            f"{image_root} lack theirs); expected {CITYSCAPES_LAYOUT}"
        )
    if not frames:
        raise DatasetError(
            f"folder {image_root} holds no *{IMAGE_SUFFIX}; expected {CITYSCAPES_LAYOUT}"
        )
    array = np.array(frames, dtype=np.bytes_)
    array.flags.writeable = False
    return array


def load_label_ids(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a single-channel labelIds PNG as an integer ``(H, W)`` array (uint8 for 8-bit files).

    Raises:
        UnreadableImageError: the file cannot be decoded.
        DatasetError: the file holds colour (RGB) data rather than one id per pixel.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as pil:
            pil.load()
            mode = pil.mode
            array = np.asarray(pil)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise UnreadableImageError(path, str(error)) from None
    if array.ndim != 2:
        raise DatasetError(
            f"label map {path} has {mode} pixels; expected a single-channel labelIds PNG "
            f"(one Cityscapes labelId per pixel, not a colour image)"
        )
    return array


class CityscapesSegmentation(Dataset[Sample | None]):
    """Cityscapes frames with their training-id masks; yields the segmentation task's sample.

    A sample (``None`` when the image or label file cannot be decoded, after one
    :class:`~mnv3.data.errors.UnreadableImageWarning`)::

        {"image": tv_tensors.Image uint8 (3, H, W),
         "mask": tv_tensors.Mask uint8 (H, W): training ids 0..K-1, 255 = ignore,
         "name": "<city>_<seq>_<frame>", "orig_size": (H, W)}

    Args:
        root: the dataset root (see :data:`CITYSCAPES_LAYOUT`).
        split: ``"train"``, ``"val"``, ``"test"`` or any folder under ``leftImg8bit``.
        transform: applied to the whole sample dict (a segmentation preset).
        classes: the training classes (default the 19 evaluated ones; see :func:`check_classes`).

    Raises:
        DatasetError: at construction for a missing folder or label file (see
            :func:`list_frames`); on loading a sample for a label map whose size differs from its
            image or that holds ids outside the Cityscapes table.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        transform: SegmentationTransform | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.classes = check_classes(classes)
        self._frames = list_frames(self.root, split)

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def num_classes(self) -> int:
        """K, the number of training classes (ids 0..K-1)."""
        return len(self.classes)

    def name(self, index: int) -> str:
        """The frame name of sample ``index`` (``<city>_<seq>_<frame>``)."""
        return os.fsdecode(self._frames[index]).split("/", 1)[1]

    def paths(self, index: int) -> tuple[Path, Path]:
        """(image file, labelIds file) of sample ``index``."""
        city, stem = os.fsdecode(self._frames[index]).split("/", 1)
        return (
            self.root / IMAGE_DIR / self.split / city / (stem + IMAGE_SUFFIX),
            self.root / LABEL_DIR / self.split / city / (stem + LABEL_SUFFIX),
        )

    def __getitem__(self, index: int) -> Sample | None:
        image_path, label_path = self.paths(index)
        image = skip_unreadable(load_rgb, image_path)
        label_ids = None if image is None else skip_unreadable(load_label_ids, label_path)
        if image is None or label_ids is None:
            return None
        height, width = (int(v) for v in image.shape[-2:])
        if label_ids.shape != (height, width):
            raise DatasetError(
                f"label map {label_path} is {label_ids.shape[1]}x{label_ids.shape[0]} but its "
                f"image {image_path} is {width}x{height} (width x height); expected equal sizes"
            )
        train_ids = label_ids_to_train_ids(label_ids, self.classes, str(label_path))
        sample = {
            "image": tv_tensors.Image(image),
            "mask": tv_tensors.Mask(torch.from_numpy(train_ids)),
            "name": self.name(index),
            "orig_size": (height, width),
        }
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"images={len(self)}, classes={self.num_classes})"
        )


def cityscapes_classes(classes: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(labelIds as strings, names) of the training classes in training-id order.

    The ids are what a training id is written back as (:func:`train_ids_to_label_ids`), as COCO's
    category ids are for detection.
    """
    names = check_classes(classes)
    return [str(_BY_NAME[n].id) for n in names], list(names)


# --- The Cityscapes family: leftImg8bit/<split>/<city>/ + gtFine/<split>/<city>/ ----------------

# train_classes: the Cityscapes classes to train on (None: the 19 evaluated ones).
_SEGMENTATION_OPTIONS: dict[str, Any] = {"train_classes": None}


def _cityscapes_palette(names: Sequence[str]) -> list[tuple[int, int, int]]:
    rows = segmentation_palette(names)[: len(names)].tolist()
    return [(int(r), int(g), int(b)) for r, g, b in rows]


def _cityscapes_classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    return cityscapes_classes(spec.option("train_classes"))


def cityscapes_build(
    spec: DatasetSpec,
    kind: SplitKind,
    transform: SegmentationTransform,
    classes: Callable[[DatasetSpec], tuple[list[str], list[str]]] = _cityscapes_classes,
) -> Dataset:
    """One split of a Cityscapes-layout family, labelled with ``classes(spec)``."""
    return CityscapesSegmentation(spec.root, spec.folder(kind), transform, classes=classes(spec)[1])


CITYSCAPES = DatasetFamily(
    _cityscapes_classes,
    cityscapes_build,
    split_on_disk(cityscapes_has_split),
    CITYSCAPES_LAYOUT,
    task="segmentation",
    options=_SEGMENTATION_OPTIONS,
    palette=_cityscapes_palette,
)
