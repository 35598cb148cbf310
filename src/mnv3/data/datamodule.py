"""One LightningDataModule for every task, and the registry of dataset families it can read.

A dataset family says what it provides (``task``: classification, detection, segmentation), which
classes it has (cheaply, before any image is listed, so the model can be built first), whether a
split exists, how to prepare it (download, generate) and how to build one split, and which options
of its own it takes (the chest X-ray carve-outs, ImageNet's validation label file) with their
defaults. The task decides the presets (augmentation and evaluation transforms, :mod:`mnv3.data.presets`) and the collate
function (:data:`TASK_DATA`). Adding a dataset is one more :data:`DATASETS` entry; adding a task
is one more :data:`TASK_DATA` entry.

The module's constructor takes plain values only, so Hydra can instantiate it from ``_target_`` and
``save_hyperparameters`` stores nothing that needs OmegaConf to unpickle.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mnv3.data.chest_xray import (
    CHESTXRAY14_FINDINGS,
    CHESTXRAY14_LAYOUT,
    CHEXPERT_LAYOUT,
    DEFAULT_VAL_FRACTION,
    PNEUMONIA_CLASSES,
    PNEUMONIA_LAYOUT,
    ChestXray14Dataset,
    CheXpertDataset,
    PneumoniaDataset,
    chexpert_has_split,
    chexpert_labels,
    pneumonia_has_split,
)
from mnv3.data.cityscapes import (
    CITYSCAPES_LAYOUT,
    CityscapesSegmentation,
    cityscapes_classes,
    cityscapes_has_split,
    segmentation_palette,
)
from mnv3.data.coco import COCO_LAYOUT, CocoDetection, coco_classes, coco_has_split
from mnv3.data.collate import collate_classification, collate_detection, collate_segmentation
from mnv3.data.errors import DatasetError
from mnv3.data.folder import ImageFolderDataset, LabeledImageDataset, Transform, list_class_folders
from mnv3.data.imagenet import IMAGENET_LAYOUT, imagenet_classes, imagenet_has_split, imagenet_split
from mnv3.data.presets import classification_presets, detection_presets, segmentation_presets
from mnv3.data.shapes import SHAPES_LAYOUT, generate_shapes, shapes_manifest
from mnv3.data.shapes_cityscapes import (
    SHAPES_CITYSCAPES_LAYOUT,
    generate_shapes_cityscapes,
    shapes_cityscapes_manifest,
)
from mnv3.data.shapes_coco import SHAPES_COCO_LAYOUT, generate_shapes_coco

SplitKind = Literal["train", "val", "test"]
LabelType = Literal["multiclass", "multilabel"]
TRAIN_SPLIT = "train"


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
            (a float32 vector of K independent labels per image, sigmoid; NaN = unknown).
        task: what its samples carry: ``"classification"`` ``{"image", "label"}``,
            ``"detection"`` ``{"image", "boxes", "labels", ...}``, ``"segmentation"``
            ``{"image", "mask"}``; picks the presets and collate function in :data:`TASK_DATA`.
        options: the family's own data options and their defaults (``data.<name>=...``).
        palette: class names -> an RGB colour per class, for pictures of masks (None: the task
            picks colours).
    """

    classes: Callable[[DatasetSpec], tuple[list[str], list[str]]]
    build: Callable[[DatasetSpec, SplitKind, Transform], Dataset]
    has_split: Callable[[DatasetSpec, str], bool]
    layout: str
    prepare: Callable[[DatasetSpec], None] | None = None
    label_type: LabelType = "multiclass"
    task: str = "classification"
    options: Mapping[str, Any] = field(default_factory=dict)
    palette: Callable[[Sequence[str]], list[tuple[int, int, int]]] | None = None


@dataclass(frozen=True)
class TaskData:
    """What a task's samples need from the data module: presets and batching.

    Attributes:
        presets: ``(**preset options) -> (train transform, eval transform)``; its keyword
            arguments are the task's data options (``data.image_size``, ``data.hflip_prob``...).
        collate: batches a list of samples (``None`` for an unreadable image) into one dict with
            a ``"skipped"`` count.
    """

    presets: Callable[..., tuple[Transform, Transform]]
    collate: Callable[[Sequence[Any]], dict[str, Any]]


TASK_DATA: dict[str, TaskData] = {
    "classification": TaskData(classification_presets, collate_classification),
    "detection": TaskData(detection_presets, collate_detection),
    "segmentation": TaskData(segmentation_presets, collate_segmentation),
}


# --- ImageFolder: root/{train,val,test}/<class>/<image> -------------------------------------------

IMAGEFOLDER_LAYOUT = "an ImageFolder tree train/<class>/*.jpg|png and val/<class>/*.jpg|png"


def _folder_classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    train = spec.root / TRAIN_SPLIT
    _require_root(spec.root, IMAGEFOLDER_LAYOUT)
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


_IMAGEFOLDER = DatasetFamily(_folder_classes, _folder_build, _folder_has_split, IMAGEFOLDER_LAYOUT)


# --- ImageNet: ImageFolder train, ImageFolder or flat+label-file val --------------------------------


def _imagenet_classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    return imagenet_classes(spec.root)


def _imagenet_build(
    spec: DatasetSpec, kind: SplitKind, transform: Transform
) -> LabeledImageDataset:
    label_file = spec.option("val_label_file") if kind == "val" else None
    return imagenet_split(spec.root, spec.folder(kind), transform, label_file)


def _imagenet_has_split(spec: DatasetSpec, folder: str) -> bool:
    label_file = spec.option("val_label_file") if folder == spec.val_split else None
    return imagenet_has_split(spec.root, folder, label_file)


# --- Generated data: written into root on first use, then read as the real layout ------------------


def _generated(
    reader: DatasetFamily,
    generate: Callable[[DatasetSpec], object],
    layout: str,
    classes: Callable[[DatasetSpec], tuple[list[str], list[str]]] | None = None,
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

    def read_classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
        prepare(spec)
        return reader.classes(spec)

    def build(spec: DatasetSpec, kind: SplitKind, transform: Transform) -> Dataset:
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


def _shapes_family(kind: str) -> DatasetFamily:
    """Shapes or textures, generated into root on first use, then read as an ImageFolder."""

    def params(spec: DatasetSpec) -> dict[str, Any]:
        return {**spec.generate, "kind": kind}

    def classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
        names = shapes_manifest(**params(spec))["classes"]
        return names, list(names)

    def has_split(spec: DatasetSpec, folder: str) -> bool:
        return shapes_manifest(**params(spec))["per_class"].get(folder, 0) > 0

    return _generated(
        _IMAGEFOLDER,
        lambda spec: generate_shapes(spec.root, **params(spec)),
        SHAPES_LAYOUT,
        classes,
        has_split,
    )


# --- Chest X-rays (issue 4): Kaggle pneumonia folders, NIH ChestX-ray14, CheXpert -----------------


def _fixed_classes(names: Sequence[str]) -> Callable[[DatasetSpec], tuple[list[str], list[str]]]:
    return lambda spec: (list(names), list(names))


def _carve_fraction(spec: DatasetSpec) -> float:
    """The patient carve-out of train_val / train.csv: None means the default 10 %."""
    fraction = spec.option("val_fraction")
    return DEFAULT_VAL_FRACTION if fraction is None else float(fraction)


def _pneumonia_build(
    spec: DatasetSpec, kind: SplitKind, transform: Transform
) -> LabeledImageDataset:
    folder = spec.folder(kind)
    fraction = spec.option("val_fraction")
    fraction = float(fraction) if fraction is not None else None
    return PneumoniaDataset(spec.root, folder, transform, fraction, int(spec.option("split_seed")))


def _chestxray14_build(
    spec: DatasetSpec, kind: SplitKind, transform: Transform
) -> LabeledImageDataset:
    return ChestXray14Dataset(
        spec.root, kind, transform, _carve_fraction(spec), int(spec.option("split_seed"))
    )


def _chestxray14_has_split(spec: DatasetSpec, folder: str) -> bool:
    # Only the test split is asked about; train and val both come from train_val_list.txt.
    listing = "test_list.txt" if folder == spec.test_split else "train_val_list.txt"
    return (spec.root / listing).is_file()


def _chexpert_classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    names = chexpert_labels(spec.option("labels"))
    return names, list(names)


def _chexpert_build(
    spec: DatasetSpec, kind: SplitKind, transform: Transform
) -> LabeledImageDataset:
    return CheXpertDataset(
        spec.root,
        kind,
        transform,
        labels=spec.option("labels"),
        uncertain=str(spec.option("uncertain")),
        frontal_only=bool(spec.option("frontal_only")),
        val_fraction=_carve_fraction(spec),
        seed=int(spec.option("split_seed")),
    )


def _chexpert_has_split(spec: DatasetSpec, folder: str) -> bool:
    return chexpert_has_split(spec.root, "test" if folder == spec.test_split else "train")


# --- COCO detection: annotations/instances_<split>2017.json + <split>2017/ ---------------------------

# Training images without a (non-crowd) box: pure background examples, off as in torchvision.
_DETECTION_OPTIONS: dict[str, Any] = {"keep_empty": False}


def _coco_classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    # COCO lists the same 80 categories in every split's json: with val2017 alone on disk
    # (evaluating released weights), the val json gives the labels training would have used.
    if not coco_has_split(spec.root, TRAIN_SPLIT) and coco_has_split(spec.root, spec.val_split):
        return coco_classes(spec.root, spec.val_split)
    return coco_classes(spec.root, TRAIN_SPLIT)


def _coco_build(spec: DatasetSpec, kind: SplitKind, transform: Transform) -> Dataset:
    category_ids, _ = _coco_classes(spec)
    return CocoDetection(
        spec.root,
        spec.folder(kind),
        transform,
        train=kind == "train",
        keep_empty=bool(spec.option("keep_empty")),
        category_ids=category_ids,
    )


def _coco_has_split(spec: DatasetSpec, folder: str) -> bool:
    return coco_has_split(spec.root, folder)


_COCO = DatasetFamily(
    _coco_classes,
    _coco_build,
    _coco_has_split,
    COCO_LAYOUT,
    task="detection",
    options=_DETECTION_OPTIONS,
)


# --- Cityscapes segmentation: leftImg8bit/<split>/<city>/ + gtFine/<split>/<city>/ ---------------

# train_classes: the Cityscapes classes to train on (None: the 19 evaluated ones).
_SEGMENTATION_OPTIONS: dict[str, Any] = {"train_classes": None}


def _cityscapes_palette(names: Sequence[str]) -> list[tuple[int, int, int]]:
    rows = segmentation_palette(names)[: len(names)].tolist()
    return [(int(r), int(g), int(b)) for r, g, b in rows]


def _cityscapes_classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    return cityscapes_classes(spec.option("train_classes"))


def _cityscapes_build(
    spec: DatasetSpec,
    kind: SplitKind,
    transform: Transform,
    classes: Callable[[DatasetSpec], tuple[list[str], list[str]]] = _cityscapes_classes,
) -> Dataset:
    return CityscapesSegmentation(spec.root, spec.folder(kind), transform, classes=classes(spec)[1])


def _cityscapes_has_split(spec: DatasetSpec, folder: str) -> bool:
    return cityscapes_has_split(spec.root, folder)


_CITYSCAPES = DatasetFamily(
    _cityscapes_classes,
    _cityscapes_build,
    _cityscapes_has_split,
    CITYSCAPES_LAYOUT,
    task="segmentation",
    options=_SEGMENTATION_OPTIONS,
    palette=_cityscapes_palette,
)


def _street_classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    # Only the classes the generator draws: absent classes would count as IoU 0 in the mean
    # as soon as one pixel is predicted as one of them.
    chosen = spec.option("train_classes")
    if chosen is None:
        chosen = shapes_cityscapes_manifest(**spec.generate)["classes"]
    return cityscapes_classes(chosen)


# The chest X-ray carve-out: val_fraction of the training patients, seeded by split_seed
# (separate from the shuffle seed, so runs with different seeds validate on the same patients).
_CARVE_OPTIONS: dict[str, Any] = {"val_fraction": None, "split_seed": 0}

DATASETS: dict[str, DatasetFamily] = {
    "imagefolder": _IMAGEFOLDER,
    "imagenet": DatasetFamily(
        _imagenet_classes,
        _imagenet_build,
        _imagenet_has_split,
        IMAGENET_LAYOUT,
        options={"val_label_file": None},
    ),
    "shapes": _shapes_family("shapes"),
    "textures": _shapes_family("textures"),
    "coco": _COCO,
    # The classes come from the written annotation file: generated first.
    "shapes_coco": _generated(
        _COCO, lambda spec: generate_shapes_coco(spec.root, **spec.generate), SHAPES_COCO_LAYOUT
    ),
    "cityscapes": _CITYSCAPES,
    "shapes_cityscapes": _generated(
        replace(_CITYSCAPES, build=partial(_cityscapes_build, classes=_street_classes)),
        lambda spec: generate_shapes_cityscapes(spec.root, **spec.generate),
        SHAPES_CITYSCAPES_LAYOUT,
        _street_classes,
        lambda spec, folder: folder in shapes_cityscapes_manifest(**spec.generate)["images"],
    ),
    "chest_xray_pneumonia": DatasetFamily(
        _fixed_classes(PNEUMONIA_CLASSES),
        _pneumonia_build,
        lambda spec, folder: pneumonia_has_split(spec.root, folder),
        PNEUMONIA_LAYOUT,
        options=_CARVE_OPTIONS,
    ),
    "chestxray14": DatasetFamily(
        _fixed_classes(CHESTXRAY14_FINDINGS),
        _chestxray14_build,
        _chestxray14_has_split,
        CHESTXRAY14_LAYOUT,
        label_type="multilabel",
        options=_CARVE_OPTIONS,
    ),
    "chexpert": DatasetFamily(
        _chexpert_classes,
        _chexpert_build,
        _chexpert_has_split,
        CHEXPERT_LAYOUT,
        label_type="multilabel",
        options={
            **_CARVE_OPTIONS,
            "uncertain": "ones",
            "labels": None,
            "frontal_only": False,
        },
    ),
}


def register_dataset(name: str, family: DatasetFamily) -> None:
    """Make ``dataset=name`` available to :class:`DataModule`."""
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")
    DATASETS[name] = family


def _require_root(root: Path, layout: str) -> None:
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist; expected {layout}")


def _plain(value: Any) -> Any:
    """Mappings to dicts and sequences to lists, recursively: OmegaConf containers become plain."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


def _split_options(
    dataset: str, family: DatasetFamily, presets: Callable[..., Any], options: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``data.*`` options into the family's own and the task presets' ones.

    Raises:
        DatasetError: an option neither takes, named with what both accept.
    """
    preset_names = [
        name
        for name, p in inspect.signature(presets).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    family_options = {**family.options}
    preset_options: dict[str, Any] = {}
    for name, value in options.items():
        if name in family.options:
            family_options[name] = value
        elif name in preset_names:
            preset_options[name] = value
        else:
            known = sorted({*family.options, *preset_names})
            raise DatasetError(
                f"data.{name}={value!r} is not an option of dataset {dataset!r} "
                f"({family.task}); expected one of {', '.join(known)}"
            )
    return family_options, preset_options


class DataModule(pl.LightningDataModule):
    """Data for any task: a registered dataset family, its task's presets, and the loaders.

    Classification batches are ``{"image": float (N, C, S, S), "label": ..., "skipped": int}``,
    where ``label`` is int64 ``(N,)`` for a ``"multiclass"`` dataset and float32 ``(N, K)`` for a
    ``"multilabel"`` one (see :attr:`label_type`; NaN marks an unknown label to leave out of the
    loss); other tasks' batches are described by their collate function (:data:`TASK_DATA`).
    ``skipped`` counts unreadable images dropped from the batch.

    Args:
        root: dataset root folder (for the generated datasets: where the data is written).
        dataset: a :data:`DATASETS` name (``"imagefolder"``, ``"imagenet"``, ``"shapes"``,
            ``"textures"``, ``"chest_xray_pneumonia"``, ``"chestxray14"``, ``"chexpert"``, ...).
        batch_size: images per batch, for every split.
        num_workers: DataLoader worker processes (0: load in the main process).
        pin_memory: pin batches in page-locked memory; None: when CUDA is available.
        persistent_workers: keep workers alive between epochs (only used with workers).
        drop_last: drop the last incomplete training batch.
        val_split: folder of the validation split.
        test_split: folder of the test split; None: there is no test split.
        generate: generator keyword arguments of a generated dataset (its own ``seed``: the data
            does not change with ``seed`` below).
        seed: seed of the training shuffle (and of the workers' augmentation streams).
        **options: the family's own options (:attr:`DatasetFamily.options`: e.g. ``val_fraction``,
            ``split_seed``, ``uncertain``, ``labels``, ``frontal_only`` for the chest X-rays,
            ``val_label_file`` for ImageNet) and the task presets' options (classification:
            ``image_size``, ``resize_size``, ``interpolation``, ``mean``, ``std``,
            ``hflip_prob``, ``auto_augment``, ``random_erase_prob``, ``min_scale``, ``channels``;
            see :func:`classification_presets`). Anything else is an error naming the option.
    """

    def __init__(
        self,
        root: str,
        dataset: str = "imagefolder",
        batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        drop_last: bool = True,
        val_split: str = "val",
        test_split: str | None = "test",
        generate: Mapping[str, Any] | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise DatasetError(
                f"unknown dataset {dataset!r} for root {root}; expected one of "
                f"{', '.join(sorted(DATASETS))}"
            )
        # Plain values before save_hyperparameters reads them from this frame: a checkpoint's
        # hparams must load with torch.load(weights_only=True), without OmegaConf.
        root = os.fspath(root)
        generate = _plain(generate) if generate is not None else None
        options = _plain(options)
        self.save_hyperparameters()

        self.family = DATASETS[dataset]
        self.task_data = TASK_DATA[self.family.task]
        family_options, preset_options = _split_options(
            dataset, self.family, self.task_data.presets, options
        )
        self.spec = DatasetSpec(
            root=Path(root).expanduser(),
            val_split=val_split,
            test_split=test_split,
            generate=generate or {},
            options=family_options,
        )
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.train_transform, self.eval_transform = self.task_data.presets(**preset_options)
        self._classes: tuple[list[str], list[str]] | None = None
        self._datasets: dict[SplitKind, Dataset] = {}

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the images the evaluation preset feeds the network (the model summary's)."""
        size = None
        # Full-resolution evaluation (segmentation) has no fixed size: the training crop then.
        for transform in (self.eval_transform, self.train_transform):
            for name in ("input_size", "crop_size", "size"):
                size = getattr(transform, name, None) if size is None else size
        size = 224 if size is None else size
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def palette(self) -> list[tuple[int, int, int]] | None:
        """The dataset's colour per class, if it has one (Cityscapes' official colours)."""
        if self.family.palette is None:
            return None
        return self.family.palette(self.class_names)

    @property
    def task(self) -> str:
        """What the samples carry: ``"classification"``, ``"detection"``, ``"segmentation"``."""
        return self.family.task

    # --- what the model needs to know before any image is read ----------------------------------

    def _class_lists(self) -> tuple[list[str], list[str]]:
        if self._classes is None:
            self._classes = self.family.classes(self.spec)
        return self._classes

    @property
    def classes(self) -> list[str]:
        """Class identifiers in label order (folder names, ImageNet wnids)."""
        return list(self._class_lists()[0])

    @property
    def class_names(self) -> list[str]:
        """Human-readable class names in label order; available before ``setup``."""
        return list(self._class_lists()[1])

    @property
    def num_classes(self) -> int:
        """Number of classes; available before ``setup`` (no image is listed)."""
        return len(self._class_lists()[0])

    @property
    def label_type(self) -> LabelType:
        """``"multiclass"`` (int64 class indices) or ``"multilabel"`` (float32 (K,) vectors)."""
        return self.family.label_type

    @property
    def channels(self) -> int:
        """Channels of the batches' images: 3 (RGB) or 1 (gray)."""
        return int(getattr(self.train_transform, "channels", 3))

    @property
    def mean(self) -> tuple[float, ...]:
        """Normalisation mean of both presets (one value per image channel, or one for all)."""
        return self.train_transform.mean

    @property
    def std(self) -> tuple[float, ...]:
        """Normalisation standard deviation of both presets (as :attr:`mean`)."""
        return self.train_transform.std

    @property
    def has_test(self) -> bool:
        """Whether a test split is configured and present."""
        test = self.spec.test_split
        return test is not None and self.family.has_split(self.spec, test)

    # --- Lightning hooks ----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Generate or download the data if the family needs it (once per node)."""
        if self.family.prepare is not None:
            self.family.prepare(self.spec)

    def setup(self, stage: str | None = None) -> None:
        """List the images of the splits a stage needs (listing is cached)."""
        kinds: dict[str | None, tuple[SplitKind, ...]] = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",) if self.has_test else (),
            "predict": ("val",),
            None: ("train", "val", "test") if self.has_test else ("train", "val"),
        }
        for kind in kinds.get(stage, ()):
            self.get_dataset(kind)

    def get_dataset(self, kind: SplitKind) -> Any:
        """The dataset of one split, built on first use with the matching preset."""
        if kind not in self._datasets:
            if kind == "test" and not self.has_test:
                if self.spec.test_split is None:  # COCO, Cityscapes: test labels are withheld
                    raise DatasetError(
                        f"dataset {self.hparams['dataset']} at {self.spec.root} has no test split "
                        "(data.test_split=null); evaluate the validation split with split=val"
                    )
                raise DatasetError(
                    f"dataset root {self.spec.root} has no test split "
                    f"{self.spec.test_split!r}; expected {self.family.layout} plus a test folder"
                )
            transform = self.train_transform if kind == "train" else self.eval_transform
            self._datasets[kind] = self.family.build(self.spec, kind, transform)
        return self._datasets[kind]

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the shuffle is seeded by ``seed`` and the epoch."""
        dataset = self.get_dataset("train")
        drop_last = self.drop_last
        if drop_last and len(dataset) < self.batch_size:
            warnings.warn(
                f"training split has {len(dataset)} images, fewer than batch_size "
                f"{self.batch_size}; keeping the incomplete batch instead of dropping every image",
                stacklevel=2,
            )
            drop_last = False
        # A resumed run reshuffles differently from epoch 0 rather than replaying it.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return self._loader(dataset, shuffle=True, drop_last=drop_last, generator=generator)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in file order."""
        return self._loader(self.get_dataset("val"))

    def test_dataloader(self) -> DataLoader:
        """Test batches in file order; DatasetError when there is no test split."""
        return self._loader(self.get_dataset("test"))

    def _loader(
        self,
        dataset: Dataset,
        shuffle: bool = False,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            collate_fn=self.task_data.collate,
        )
