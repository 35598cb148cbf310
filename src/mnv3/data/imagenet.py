"""ImageNet-1k in the two layouts people actually have on disk.

- ``train/<wnid>/*.JPEG`` (an ImageFolder), and
- ``val/<wnid>/*.JPEG`` (an ImageFolder, after the usual "valprep" script) or the raw flat
  ``val/ILSVRC2012_val_*.JPEG`` folder with a label file of ``<file name> <label>`` lines.

Labels index the *sorted* wnids, which is torchvision's class order (and that of its published
weights). Human-readable class names come from a standard class index in the root when one is
there: ``imagenet_class_index.json`` (``{"0": ["n01440764", "tench"], ...}``) or
``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca`` per line); otherwise the wnids are the
names.

:data:`IMAGENET` is the ``imagenet`` dataset family; its option ``val_label_file`` names the label
file of a flat validation folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mnv3.data.errors import DatasetError, require_root
from mnv3.data.family import DatasetFamily, DatasetSpec, SplitKind
from mnv3.data.folder import (
    ImageFolderDataset,
    LabeledImageDataset,
    Transform,
    is_image_file,
    list_class_folders,
)

IMAGENET_LAYOUT = (
    "ImageNet as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG or val/ILSVRC2012_val_*.JPEG "
    "with a label file"
)
CLASS_INDEX_JSON = "imagenet_class_index.json"
SYNSET_MAPPING_TXT = "LOC_synset_mapping.txt"


def default_label_file(root: str | os.PathLike[str], split: str) -> Path:
    """Where the label file of a flat split is looked for unless given: ``root/<split>_labels.txt``."""
    return Path(root) / f"{split}_labels.txt"


def read_class_index(root: str | os.PathLike[str]) -> tuple[list[str], list[str]] | None:
    """Sorted wnids and their names from the class index file in ``root``, or None if there is none.

    Raises:
        DatasetError: the class index file is malformed.
    """
    root = Path(root)
    json_path = root / CLASS_INDEX_JSON
    txt_path = root / SYNSET_MAPPING_TXT
    if json_path.is_file():
        names = _read_class_index_json(json_path)
    elif txt_path.is_file():
        names = _read_synset_mapping(txt_path)
    else:
        return None
    wnids = sorted(names)
    return wnids, [names[w] for w in wnids]


def _read_class_index_json(path: Path) -> dict[str, str]:
    expected = 'expected {"0": ["n01440764", "tench"], ...}'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"class index {path} cannot be read ({error}); {expected}") from None
    if not isinstance(data, dict) or not data:
        raise DatasetError(f"class index {path} is not a non-empty JSON object; {expected}")
    names: dict[str, str] = {}
    for key, value in data.items():
        if not (
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)
        ):
            raise DatasetError(f"class index {path} entry {key!r} is {value!r}; {expected}")
        names[value[0]] = value[1]
    if len(names) != len(data):
        raise DatasetError(f"class index {path} lists a wnid more than once; {expected}")
    return names


def _read_synset_mapping(path: Path) -> dict[str, str]:
    names: dict[str, str] = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            wnid, _, description = line.strip().partition(" ")
            name = description.split(",")[0].strip()
            if not name or wnid in names:
                raise DatasetError(
                    f"class index {path} line {number} is {line.strip()!r}; expected one "
                    "'n01440764 tench, Tinca tinca' line per class with no wnid repeated"
                )
            names[wnid] = name
    if not names:
        raise DatasetError(f"class index {path} is empty; expected 'n01440764 tench, ...' lines")
    return names


def imagenet_classes(root: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """The sorted wnids and their class names, cheaply (no image is listed).

    The class index file wins; without one, the ``train/`` folders are the classes.

    Raises:
        DatasetError: the root is missing, or neither a class index nor ``train/<wnid>/`` exists.
    """
    root = Path(root)
    require_root(root, IMAGENET_LAYOUT)
    index = read_class_index(root)
    if index is not None:
        return index
    train = root / "train"
    wnids = list_class_folders(train) if train.is_dir() else []
    if not wnids:
        raise DatasetError(
            f"dataset root {root} has neither {CLASS_INDEX_JSON}, {SYNSET_MAPPING_TXT} nor "
            f"train/<wnid>/ folders to take the classes from; expected {IMAGENET_LAYOUT}"
        )
    return wnids, list(wnids)


def is_folder_split(split_dir: str | os.PathLike[str]) -> bool:
    """True when a split folder holds one sub-folder per class rather than flat images."""
    return bool(list_class_folders(split_dir))


def imagenet_split(
    root: str | os.PathLike[str],
    split: str,
    transform: Transform | None = None,
    label_file: str | os.PathLike[str] | None = None,
) -> LabeledImageDataset:
    """One ImageNet split, in either layout (detected from the folder).

    Args:
        root: the ImageNet root.
        split: ``"train"``, ``"val"``, ...; a folder of ``root``.
        transform: applied to each uint8 image.
        label_file: labels of a flat split, ``<file name> <0-based label>`` per line (CRLF is
            fine); default ``root/<split>_labels.txt``. Unused for a folder split.

    Raises:
        DatasetError: a missing folder or label file, a label file line that is malformed, names a
            missing image or holds a label out of range, or training folders that differ from
            the class index. The message names the file (and line).
    """
    root = Path(root)
    wnids, names = imagenet_classes(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(f"split folder {split_dir} does not exist; expected {IMAGENET_LAYOUT}")
    if is_folder_split(split_dir):
        found = set(list_class_folders(split_dir))
        index = read_class_index(root)
        if split == "train" and index is not None and found != set(wnids):
            missing = sorted(set(wnids) - found)[:3]
            extra = sorted(found - set(wnids))[:3]
            source = CLASS_INDEX_JSON if (root / CLASS_INDEX_JSON).is_file() else SYNSET_MAPPING_TXT
            raise DatasetError(
                f"training folders in {split_dir} do not match the {len(wnids)} wnids of "
                f"{root / source} (missing: {', '.join(missing) or 'none'}; not in the index: "
                f"{', '.join(extra) or 'none'}); expected {IMAGENET_LAYOUT}"
            )
        return ImageFolderDataset(root, split, transform, classes=wnids, class_names=names)
    label_path = Path(label_file) if label_file is not None else default_label_file(root, split)
    paths, labels = _read_label_file(label_path, split_dir, len(wnids))
    rel_paths = [os.path.join(split, p) for p in paths]
    return LabeledImageDataset(root, rel_paths, labels, wnids, names, transform)


def _read_label_file(
    label_path: Path, split_dir: Path, num_classes: int
) -> tuple[list[str], list[int]]:
    """Parse ``<file name> <label>`` lines, checking each image exists and each label is in range."""
    if not label_path.is_file():
        raise DatasetError(
            f"label file {label_path} for the flat split folder {split_dir} does not exist; "
            f"expected {IMAGENET_LAYOUT} of 'ILSVRC2012_val_00000001.JPEG 65' lines"
        )
    with os.scandir(split_dir) as entries:
        on_disk = {e.name for e in entries if is_image_file(e.name)}
    paths: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    # Universal newlines: CRLF label files from Windows tools read the same.
    with open(label_path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"label file {label_path} line {number}"
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise DatasetError(
                    f"{where} is {line.strip()!r}; expected '<image file name> <0-based label>'"
                )
            name, label = fields[0], int(fields[1])
            if name not in on_disk and name + ".JPEG" in on_disk:
                name += ".JPEG"  # some label files (Kaggle's) omit the extension
            if name not in on_disk:
                raise DatasetError(f"{where} names {name}, which is not an image in {split_dir}")
            if not 0 <= label < num_classes:
                raise DatasetError(
                    f"{where} has label {label}, outside 0..{num_classes - 1} of the "
                    f"{num_classes} ImageNet classes"
                )
            if name in seen:
                raise DatasetError(f"{where} lists {name} a second time")
            seen.add(name)
            paths.append(name)
            labels.append(label)
    if not paths:
        raise DatasetError(f"label file {label_path} has no '<image file name> <label>' lines")
    return paths, labels


def imagenet_has_split(
    root: str | os.PathLike[str], split: str, label_file: str | os.PathLike[str] | None = None
) -> bool:
    """Whether ``split`` is usable: a class-folder split, or a flat one with its label file.

    The official ImageNet test images come without labels, so a flat ``test/`` with no label file
    is not a test split.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        return False
    if is_folder_split(split_dir):
        return True
    label_path = Path(label_file) if label_file is not None else default_label_file(root, split)
    return label_path.is_file()


# --- The ImageNet family: ImageFolder train, ImageFolder or flat + label file val ---------------


def _imagenet_classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    return imagenet_classes(spec.root)


def holdout_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` images of every class, drawn at random (``seed``), sorted.

    MnasNet (Tan et al. 2019, §5) held out 50,000 randomly chosen ImageNet training images to rank
    its candidates, so that the official validation set stays an unbiased estimate of the
    winner; 50 per class is that number, drawn per class so every class is ranked on. The draw
    depends only on the labels' order (the sorted file list) and ``seed``.

    Raises:
        DatasetError: a class has no more than ``per_class`` images (nothing left to train on).
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) <= per_class:
            raise DatasetError(
                f"data.holdout_per_class={per_class} but class {int(label)} has only "
                f"{len(members)} training images; expected fewer held out than it has"
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def _subset(dataset: LabeledImageDataset, keep: np.ndarray) -> LabeledImageDataset:
    """The images ``keep`` (indices) of ``dataset``, with its classes and transform."""
    paths = [os.fsdecode(p) for p in dataset._paths[keep]]
    return LabeledImageDataset(
        dataset.root,
        paths,
        dataset._labels[keep],
        dataset.classes,
        dataset.class_names,
        dataset.transform,
    )


def _imagenet_build(
    spec: DatasetSpec, kind: SplitKind, transform: Transform
) -> LabeledImageDataset:
    per_class = spec.option("holdout_per_class")
    if per_class and kind in ("train", "val"):
        # The search's held-out split: val = per_class training images of each class, train =
        # the rest; the official validation folder is then the test split (data.test_split).
        train = imagenet_split(spec.root, "train", transform)
        held = holdout_indices(train._labels, int(per_class), int(spec.option("split_seed")))
        keep = held if kind == "val" else np.setdiff1d(np.arange(len(train)), held)
        return _subset(train, keep)
    folder = spec.folder(kind)
    label_file = spec.option("val_label_file") if folder == spec.val_split else None
    return imagenet_split(spec.root, folder, transform, label_file)


def _imagenet_has_split(spec: DatasetSpec, folder: str) -> bool:
    label_file = spec.option("val_label_file") if folder == spec.val_split else None
    return imagenet_has_split(spec.root, folder, label_file)


IMAGENET = DatasetFamily(
    _imagenet_classes,
    _imagenet_build,
    _imagenet_has_split,
    IMAGENET_LAYOUT,
    # holdout_per_class: val = that many training images per class (MnasNet's held-out split),
    # train = the rest; split_seed draws them.
    options={"val_label_file": None, "holdout_per_class": None, "split_seed": 0},
)
