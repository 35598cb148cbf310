"""Labelled image datasets read from files: the generic list and the ImageFolder layout.

Every image dataset of the project (ImageFolder, ImageNet, the generated shapes, later chest X-rays)
ends up as a :class:`LabeledImageDataset`: a root, relative file paths, integer labels and the class
list. Paths are held in one numpy byte array rather than a list of Python strings: DataLoader
workers are forked, and touching millions of Python objects (their reference counts) would copy the
parent's pages into every worker.

:data:`IMAGEFOLDER` is the ``imagefolder`` dataset family (:mod:`mnv3.data.family`), which the
generated shapes and textures also read through.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from mnv3.data.errors import DatasetError, require_root
from mnv3.data.family import TRAIN_SPLIT, DatasetFamily, DatasetSpec, SplitKind
from mnv3.data.io import DICOM_EXTENSIONS, load_rgb, skip_unreadable

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    *DICOM_EXTENSIONS,  # read by mnv3.data.dicom (the medical extra)
)

Transform = Callable[[torch.Tensor], torch.Tensor]
Sample = dict[str, Any]


def folder_layout(root: str | os.PathLike[str], split: str) -> str:
    """The expected ImageFolder layout, worded for error messages."""
    return f"an ImageFolder tree {Path(root) / split}/<class>/<image>.jpg|png"


def is_image_file(name: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> bool:
    """True for a visible file name with an image extension (compared case-insensitively)."""
    # Hidden files include macOS "._x.jpg" AppleDouble entries, which are not images.
    return not name.startswith(".") and name.lower().endswith(tuple(extensions))


def list_class_folders(split_dir: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the visible sub-folders of ``split_dir`` (the classes of an ImageFolder).

    A sub-folder may be a symbolic link to a folder (e.g. into a shared image store). A link whose
    target does not exist is left out with a ``UserWarning`` naming it: it was most likely meant
    to be a class, and dropping a class silently would shift what the model is trained to tell.
    """
    names: list[str] = []
    with os.scandir(split_dir) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                names.append(entry.name)
            elif entry.is_symlink() and not os.path.exists(entry.path):
                warnings.warn(
                    f"class folder {entry.path} is a symbolic link to "
                    f"{os.readlink(entry.path)}, which does not exist; class {entry.name!r} "
                    "is left out (fix or remove the link)",
                    UserWarning,
                    stacklevel=2,
                )
    return sorted(names)


def walk_once(top: str | os.PathLike[str]) -> Iterator[tuple[str, list[str]]]:
    """``(dirpath, sorted file names)`` of ``top`` and its visible sub-folders, links followed.

    Each real directory is visited once, whatever links lead to it: a link back into its own
    tree (``class/loop -> class``) would otherwise be walked until the path hits the OS's 40-link
    limit (the class counted 41 times), and two such links branch exponentially (a hang). Links
    that lead to an already visited directory are skipped with one ``UserWarning`` per call
    naming the first of them. Hidden folders (``.cache``, ``.git``) are not entered.
    """
    visited = {os.path.realpath(top)}
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        kept: list[str] = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            real = os.path.realpath(os.path.join(dirpath, name))
            if real in visited:
                skipped.append(os.path.join(dirpath, name))
                continue
            visited.add(real)
            kept.append(name)
        dirnames[:] = kept
        yield dirpath, sorted(filenames)
    if skipped:
        warnings.warn(
            f"{len(skipped)} linked folder(s) under {top} lead to a folder already scanned "
            f"(first: {skipped[0]} -> {os.path.realpath(skipped[0])}); their images are "
            "counted once",
            UserWarning,
            stacklevel=2,
        )


class LabeledImageDataset(Dataset[Sample | None]):
    """Images on disk with integer labels; yields ``{"image": tensor, "label": int}``.

    An unreadable file yields ``None`` after one :class:`UnreadableImageWarning` naming it;
    :func:`mnv3.data.collate.collate_classification` drops it and counts it in ``"skipped"``.

    Args:
        root: directory the relative paths are resolved against.
        paths: image paths relative to ``root``.
        labels: one class index per path, in ``range(len(classes))``.
        classes: class identifiers (folder names, ImageNet wnids), index = label.
        class_names: human-readable names, same order; defaults to ``classes``.
        transform: applied to the uint8 ``(3, H, W)`` image; ``None`` returns it unchanged.
    """

    #: how a 16-bit image becomes 8-bit (:func:`~mnv3.data.io.load_rgb`'s ``wide``): the top
    #: byte, as torchvision does, for photographs; the medical datasets use the image's range
    wide_gray: ClassVar[str] = "top_byte"

    def __init__(
        self,
        root: str | os.PathLike[str],
        paths: Sequence[str],
        labels: Sequence[Any] | np.ndarray,
        classes: Sequence[str],
        class_names: Sequence[str] | None = None,
        transform: Transform | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.root = Path(root)
        self.classes = list(classes)
        self.class_names = list(class_names) if class_names is not None else list(self.classes)
        if len(self.class_names) != len(self.classes):
            raise ValueError(f"{len(self.classes)} classes but {len(self.class_names)} names")
        self.transform = transform
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
        self._labels = self._label_array(labels, len(self.classes))

    @staticmethod
    def _label_array(labels: Any, num_classes: int) -> np.ndarray:
        """The labels as held: int64 ``(N,)`` class indices, checked to be in range."""
        array = np.asarray(labels, dtype=np.int64)
        if len(array) and not 0 <= array.min() <= array.max() < num_classes:
            raise ValueError(f"labels must be in 0..{num_classes - 1} for {num_classes} classes")
        return array

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def num_classes(self) -> int:
        """Number of classes (including any without samples in this split)."""
        return len(self.classes)

    @property
    def samples(self) -> list[tuple[str, int]]:
        """All ``(path, label)`` pairs, paths joined to ``root``; a new list on every call."""
        return [(self.path(i), int(label)) for i, label in enumerate(self._labels)]

    @property
    def targets(self) -> list[int]:
        """All labels, in sample order."""
        return self._labels.tolist()

    def path(self, index: int) -> str:
        """Path of sample ``index``, joined to ``root``."""
        return os.path.join(self.root, os.fsdecode(self._paths[index]))

    def __getitem__(self, index: int) -> Sample | None:
        image = skip_unreadable(functools.partial(load_rgb, wide=self.wide_gray), self.path(index))
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": self._label(index)}

    def _label(self, index: int) -> int | torch.Tensor:
        """The label of sample ``index`` as the collate function expects it (an int here)."""
        return int(self._labels[index])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, samples={len(self)}, "
            f"classes={self.num_classes})"
        )


class ImageFolderDataset(LabeledImageDataset):
    """The ``root/split/<class>/**/<image>`` layout: one folder per class, classes sorted by name.

    Symbolic links are followed, each real folder once per class (:func:`walk_once`): a link
    cycle inside a class folder neither repeats its images nor hangs the scan. Classes are
    scanned independently, so a class folder that links to another class folder of the split
    lists the same images under both labels, exactly once each: the layout says so, and it is
    how a shared image store is reused. A class folder link whose target is missing warns and
    leaves the class out (:func:`list_class_folders`).

    Args:
        root: dataset root holding one folder per split.
        split: split folder name (``"train"``, ``"val"``, ``"test"``).
        transform: applied to each uint8 image.
        classes: the class list to label with. Give the training classes when reading an
            evaluation split, so that a class missing from it does not shift every later label;
            a folder not in ``classes`` is then an error. ``None`` uses this split's folders.
        class_names: human-readable names in the order of ``classes``.
        extensions: accepted file extensions, compared case-insensitively.

    Raises:
        DatasetError: the split folder is missing, has no class folders or no images, or has a
            class folder outside ``classes``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        transform: Transform | None = None,
        classes: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        split_dir = Path(root) / split
        layout = folder_layout(root, split)
        if not split_dir.is_dir():
            raise DatasetError(f"split folder {split_dir} does not exist; expected {layout}")
        found = list_class_folders(split_dir)
        if not found:
            raise DatasetError(f"split folder {split_dir} has no class folders; expected {layout}")
        index = {name: i for i, name in enumerate(found if classes is None else classes)}
        unknown = [name for name in found if name not in index]
        if unknown:
            raise DatasetError(
                f"split folder {split_dir} has class folder(s) {', '.join(unknown[:5])} that are "
                f"not among the {len(index)} training classes; expected {layout} with the same "
                "class folders as the training split"
            )
        derive_classes = classes is None
        if derive_classes:
            classes = found
        paths: list[str] = []
        labels: list[int] = []
        for name in found:
            files = _image_files(split_dir / name, extensions)
            if derive_classes and not files:
                # A class without a single training image would be an output never trained.
                raise DatasetError(
                    f"class folder {split_dir / name} contains no images; expected {layout}"
                )
            paths += [os.path.join(split, name, rel) for rel in files]
            labels += [index[name]] * len(files)
        if not paths:
            raise DatasetError(f"split folder {split_dir} contains no images; expected {layout}")
        super().__init__(root, paths, labels, classes, class_names, transform)
        self.split = split


def _image_files(class_dir: Path, extensions: Sequence[str]) -> list[str]:
    """Image paths under ``class_dir`` (recursively, each real folder once), relative to it."""
    found: list[str] = []
    for dirpath, filenames in walk_once(class_dir):
        rel_dir = os.path.relpath(dirpath, class_dir)
        for name in filenames:
            if is_image_file(name, extensions):
                found.append(name if rel_dir == "." else os.path.join(rel_dir, name))
    return found


class MultiLabelImageDataset(LabeledImageDataset):
    """Images on disk with a vector of K binary labels; yields ``{"image", "label": float32 (K,)}``.

    A label is 1.0 (present), 0.0 (absent) or NaN (unknown: the loss must leave it out, e.g. an
    uncertain CheXpert finding under the ``"ignore"`` policy); :func:`known_labels` gives the mask.
    Labels are held in one float32 ``(N, K)`` array, for the same fork-friendliness as the paths.

    Args: those of :class:`LabeledImageDataset`, but ``labels`` is ``(N, K)``: values in
    {0, 1, NaN}, one row per path, one column per class.
    """

    @staticmethod
    def _label_array(labels: Any, num_classes: int) -> np.ndarray:
        """The labels as held: one float32 ``(N, K)`` array, checked to be 0, 1 or NaN."""
        matrix = np.asarray(labels, dtype=np.float32).reshape(len(labels), num_classes)
        known = matrix[~np.isnan(matrix)]
        if known.size and not np.isin(known, (0.0, 1.0)).all():
            raise ValueError("multi-label values must be 0, 1 or NaN (unknown)")
        return matrix

    @property
    def samples(self) -> list[tuple[str, list[float]]]:
        """All ``(path, label vector)`` pairs, paths joined to ``root``; a new list each call."""
        return [(self.path(i), row.tolist()) for i, row in enumerate(self._labels)]

    @property
    def label_matrix(self) -> np.ndarray:
        """The ``(N, K)`` float32 labels, read-only: for class frequencies and ``pos_weight``."""
        view = self._labels.view()
        view.flags.writeable = False
        return view

    def _label(self, index: int) -> torch.Tensor:
        """A float ``(K,)`` vector: 1 present, 0 absent, NaN uncertain-and-ignored."""
        return torch.from_numpy(self._labels[index].copy())


def known_labels(labels: torch.Tensor) -> torch.Tensor:
    """The mask of labels a multi-label loss should count: True where ``labels`` is not NaN."""
    return ~torch.isnan(labels)


# --- The ImageFolder family: root/{train,val,test}/<class>/<image> --------------------------------

IMAGEFOLDER_LAYOUT = "an ImageFolder tree train/<class>/*.jpg|png and val/<class>/*.jpg|png"


def _folder_classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    train = spec.root / TRAIN_SPLIT
    require_root(spec.root, IMAGEFOLDER_LAYOUT)
    if not train.is_dir():
        raise DatasetError(f"split folder {train} does not exist; expected {IMAGEFOLDER_LAYOUT}")
    classes = list_class_folders(train)
    if not classes:
        raise DatasetError(
            f"split folder {train} has no class folders; expected {IMAGEFOLDER_LAYOUT}"
        )
    return classes, list(classes)


def _folder_build(spec: DatasetSpec, kind: SplitKind, transform: Transform) -> LabeledImageDataset:
    classes, names = _folder_classes(spec)
    # Training derives its classes from its own folders, which also rejects empty class folders;
    # evaluation splits are labelled with those classes.
    given = None if kind == "train" else classes
    return ImageFolderDataset(spec.root, spec.folder(kind), transform, given, names)


def _folder_has_split(spec: DatasetSpec, folder: str) -> bool:
    return (spec.root / folder).is_dir()


IMAGEFOLDER = DatasetFamily(_folder_classes, _folder_build, _folder_has_split, IMAGEFOLDER_LAYOUT)
