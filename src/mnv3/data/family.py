"""What a dataset family is: the types every dataset module declares its family with.

A dataset family says what it provides (``task``: classification, detection, segmentation), which
classes it has (cheaply, before any image is listed, so the model can be built first), whether a
split exists, how to prepare it (download, generate) and how to build one split, and which options
of its own it takes (the chest X-ray carve-outs, ImageNet's validation label file) with their
defaults. Each dataset module defines its family beside the dataset class it adapts; the name ->
family table is :data:`mnv3.data.datamodule.DATASETS`.

This module imports no dataset module, so every dataset module can import it (no import circle).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from mnv3.data.errors import DatasetError

SplitKind = Literal["train", "val", "test"]
LabelType = Literal["multiclass", "multilabel"]
TRAIN_SPLIT = "train"
# A task preset: uint8 image -> float tensor (classification), sample dict -> sample dict (dense).
SplitTransform = Callable[[Any], Any]
ClassLists = tuple[list[str], list[str]]


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives, which folders are its splits, and its family's own options."""

    root: Path
    val_split: str = "val"
    test_split: str | None = "test"
    generate: Mapping[str, Any] = field(default_factory=dict)
    # Options of one family (e.g. the chest X-ray carve-out), validated against its defaults.
    options: Mapping[str, Any] = field(default_factory=dict)

    def folder(self, kind: SplitKind) -> str:
        """The split folder name for a split kind (``None`` test split: no folder)."""
        name = {"train": TRAIN_SPLIT, "val": self.val_split, "test": self.test_split}[kind]
        if name is None:
            raise DatasetError(f"dataset root {self.root} has no {kind} split configured")
        return name

    def option(self, name: str) -> Any:
        """One family option (its default when the config did not set it)."""
        return self.options[name]


@dataclass(frozen=True)
class DatasetFamily:
    """How one kind of dataset is found, prepared and read.

    Attributes:
        classes: ``spec -> (class ids, class names)`` in label order; cheap, no image listed.
        build: ``(spec, kind, transform) -> dataset`` for one split.
        has_split: ``(spec, folder name) -> bool``.
        layout: the expected layout, worded for error messages.
        prepare: run once per node before ``setup`` (download, generate); None: nothing to do.
        label_type: ``"multiclass"`` (an int64 class index per image, softmax) or ``"multilabel"``
            (a float32 vector of K independent labels per image, sigmoid; NaN = unknown); or
            ``spec -> label type`` for a family whose options decide it (``xray_csv``).
        task: what its samples carry: ``"classification"`` ``{"image", "label"}``,
            ``"detection"`` ``{"image", "boxes", "labels", ...}``, ``"segmentation"``
            ``{"image", "mask"}``; picks the presets and collate function in
            :data:`mnv3.data.datamodule.TASK_DATA`.
        options: the family's own data options and their defaults (``data.<name>=...``).
        palette: class names -> an RGB colour per class, for pictures of masks (None: the task
            picks colours).
        wide_gray: how its 16-bit images become 8-bit (``"top_byte"`` or ``"range"``).
    """

    classes: Callable[[DatasetSpec], ClassLists]
    build: Callable[[DatasetSpec, SplitKind, SplitTransform], Dataset]
    has_split: Callable[[DatasetSpec, str], bool]
    layout: str
    prepare: Callable[[DatasetSpec], None] | None = None
    label_type: LabelType | Callable[[DatasetSpec], LabelType] = "multiclass"
    task: str = "classification"
    options: Mapping[str, Any] = field(default_factory=dict)
    palette: Callable[[Sequence[str]], list[tuple[int, int, int]]] | None = None
    # How its 16-bit images become 8-bit (mnv3.data.io.load_rgb's ``wide``): the value of its
    # dataset classes' ``wide_gray``, so a single image (mnv3.explain) is read as its data was.
    wide_gray: str = "top_byte"


def fixed_classes(names: Sequence[str]) -> Callable[[DatasetSpec], ClassLists]:
    """``classes`` of a family whose classes do not depend on the data: ids and names alike."""
    return lambda spec: (list(names), list(names))


def generated_family(
    reader: DatasetFamily,
    generate: Callable[[DatasetSpec], object],
    layout: str,
    classes: Callable[[DatasetSpec], ClassLists] | None = None,
    has_split: Callable[[DatasetSpec, str], bool] | None = None,
) -> DatasetFamily:
    """``reader``'s family over data that ``generate(spec)`` writes into ``spec.root``.

    ``generate`` is idempotent and atomic (:func:`mnv3.data.generated.write_once`), so it is both
    the family's ``prepare`` and called again before every build: the module works without a
    Trainer. ``classes`` and ``has_split`` answer from the generator's parameters, writing
    nothing; None: generate first and ask ``reader`` (the classes are in the written data).
    """

    def prepare(spec: DatasetSpec) -> None:
        generate(spec)

    def read_classes(spec: DatasetSpec) -> ClassLists:
        prepare(spec)
        return reader.classes(spec)

    def build(spec: DatasetSpec, kind: SplitKind, transform: SplitTransform) -> Dataset:
        prepare(spec)
        return reader.build(spec, kind, transform)

    return replace(
        reader,
        classes=classes or read_classes,
        build=build,
        has_split=has_split or reader.has_split,
        layout=layout,
        prepare=prepare,
    )


def split_on_disk(has_split: Callable[[Path, str], bool]) -> Callable[[DatasetSpec, str], bool]:
    """A family's ``has_split`` from a reader's ``(root, folder) -> bool``."""
    return lambda spec, folder: has_split(spec.root, folder)
