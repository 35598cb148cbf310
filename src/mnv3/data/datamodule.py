"""The classification LightningDataModule and the registry of dataset families it can read.

A dataset family says four things: which classes it has (cheaply, before any image is listed, so
the model can be built first), whether a split exists, how to prepare it (download, generate) and
how to build one split, and whether its labels are one class per image (``"multiclass"``) or a
vector of independent findings (``"multilabel"``, the chest X-ray datasets). Adding a dataset is
one more :data:`DATASETS` entry.

The module's constructor takes plain values only, so Hydra can instantiate it from ``_target_`` and
``save_hyperparameters`` stores nothing that needs OmegaConf to unpickle.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

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
from mnv3.data.collate import collate_classification
from mnv3.data.errors import DatasetError
from mnv3.data.folder import ImageFolderDataset, LabeledImageDataset, Transform, list_class_folders
from mnv3.data.imagenet import IMAGENET_LAYOUT, imagenet_classes, imagenet_has_split, imagenet_split
from mnv3.data.shapes import SHAPES_LAYOUT, generate_shapes, shapes_manifest
from mnv3.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationEvalPreset,
    ClassificationTrainPreset,
)

SplitKind = Literal["train", "val", "test"]
LabelType = Literal["multiclass", "multilabel"]
TRAIN_SPLIT = "train"


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and which folders are its splits, as the datamodule was told."""

    root: Path
    val_split: str = "val"
    test_split: str | None = "test"
    val_label_file: str | None = None
    generate: Mapping[str, Any] = field(default_factory=dict)
    # Options of the label-table datasets (chest X-rays); the other families ignore them.
    val_fraction: float | None = None
    split_seed: int = 0
    uncertain: str = "ones"
    labels: tuple[str, ...] | None = None
    frontal_only: bool = False

    def folder(self, kind: SplitKind) -> str:
        """The split folder name for a split kind (``None`` test split: no folder)."""
        name = {"train": TRAIN_SPLIT, "val": self.val_split, "test": self.test_split}[kind]
        if name is None:
            raise DatasetError(f"dataset root {self.root} has no {kind} split configured")
        return name


@dataclass(frozen=True)
class DatasetFamily:
    """How one kind of classification dataset is found, prepared and read.

    Attributes:
        classes: ``spec -> (class ids, class names)`` in label order; cheap, no image listed.
        build: ``(spec, kind, transform) -> dataset`` for one split.
        has_split: ``(spec, folder name) -> bool``.
        layout: the expected layout, worded for error messages.
        prepare: run once per node before ``setup`` (download, generate); None: nothing to do.
        label_type: ``"multiclass"`` (an int64 class index per image, softmax) or ``"multilabel"``
            (a float32 vector of K independent labels per image, sigmoid; NaN = unknown).
    """

    classes: Callable[[DatasetSpec], tuple[list[str], list[str]]]
    build: Callable[[DatasetSpec, SplitKind, Transform], LabeledImageDataset]
    has_split: Callable[[DatasetSpec, str], bool]
    layout: str
    prepare: Callable[[DatasetSpec], None] | None = None
    label_type: LabelType = "multiclass"


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


# --- ImageNet: ImageFolder train, ImageFolder or flat+label-file val --------------------------------


def _imagenet_classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    return imagenet_classes(spec.root)


def _imagenet_build(
    spec: DatasetSpec, kind: SplitKind, transform: Transform
) -> LabeledImageDataset:
    label_file = spec.val_label_file if kind == "val" else None
    return imagenet_split(spec.root, spec.folder(kind), transform, label_file)


def _imagenet_has_split(spec: DatasetSpec, folder: str) -> bool:
    label_file = spec.val_label_file if folder == spec.val_split else None
    return imagenet_has_split(spec.root, folder, label_file)


# --- Shapes: generated into root, then read as an ImageFolder ---------------------------------------


def _generated_family(kind: str) -> DatasetFamily:
    """A generated dataset (shapes or textures): written into root on first use, then an ImageFolder."""

    def params(spec: DatasetSpec) -> dict[str, Any]:
        return {**spec.generate, "kind": kind}

    def classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
        names = shapes_manifest(**params(spec))["classes"]
        return names, list(names)

    def prepare(spec: DatasetSpec) -> None:
        generate_shapes(spec.root, **params(spec))

    def build(spec: DatasetSpec, kind_: SplitKind, transform: Transform) -> LabeledImageDataset:
        # Idempotent and atomic, so calling it here too makes the module usable without a Trainer.
        prepare(spec)
        return _folder_build(spec, kind_, transform)

    def has_split(spec: DatasetSpec, folder: str) -> bool:
        return shapes_manifest(**params(spec))["per_class"].get(folder, 0) > 0

    return DatasetFamily(classes, build, has_split, SHAPES_LAYOUT, prepare)


# --- Chest X-rays (issue 4): Kaggle pneumonia folders, NIH ChestX-ray14, CheXpert -----------------


def _fixed_classes(names: Sequence[str]) -> Callable[[DatasetSpec], tuple[list[str], list[str]]]:
    return lambda spec: (list(names), list(names))


def _carve_fraction(spec: DatasetSpec) -> float:
    """The patient carve-out of train_val / train.csv: None means the default 10 %."""
    return DEFAULT_VAL_FRACTION if spec.val_fraction is None else spec.val_fraction


def _pneumonia_build(
    spec: DatasetSpec, kind: SplitKind, transform: Transform
) -> LabeledImageDataset:
    folder = spec.folder(kind)
    return PneumoniaDataset(spec.root, folder, transform, spec.val_fraction, spec.split_seed)


def _chestxray14_build(
    spec: DatasetSpec, kind: SplitKind, transform: Transform
) -> LabeledImageDataset:
    return ChestXray14Dataset(spec.root, kind, transform, _carve_fraction(spec), spec.split_seed)


def _chestxray14_has_split(spec: DatasetSpec, folder: str) -> bool:
    # Only the test split is asked about; train and val both come from train_val_list.txt.
    listing = "test_list.txt" if folder == spec.test_split else "train_val_list.txt"
    return (spec.root / listing).is_file()


def _chexpert_classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    names = chexpert_labels(spec.labels)
    return names, list(names)


def _chexpert_build(
    spec: DatasetSpec, kind: SplitKind, transform: Transform
) -> LabeledImageDataset:
    return CheXpertDataset(
        spec.root,
        kind,
        transform,
        labels=spec.labels,
        uncertain=spec.uncertain,
        frontal_only=spec.frontal_only,
        val_fraction=_carve_fraction(spec),
        seed=spec.split_seed,
    )


def _chexpert_has_split(spec: DatasetSpec, folder: str) -> bool:
    return chexpert_has_split(spec.root, "test" if folder == spec.test_split else "train")


DATASETS: dict[str, DatasetFamily] = {
    "imagefolder": DatasetFamily(
        _folder_classes, _folder_build, _folder_has_split, IMAGEFOLDER_LAYOUT
    ),
    "imagenet": DatasetFamily(
        _imagenet_classes, _imagenet_build, _imagenet_has_split, IMAGENET_LAYOUT
    ),
    "shapes": _generated_family("shapes"),
    "textures": _generated_family("textures"),
    "chest_xray_pneumonia": DatasetFamily(
        _fixed_classes(PNEUMONIA_CLASSES),
        _pneumonia_build,
        lambda spec, folder: pneumonia_has_split(spec.root, folder),
        PNEUMONIA_LAYOUT,
    ),
    "chestxray14": DatasetFamily(
        _fixed_classes(CHESTXRAY14_FINDINGS),
        _chestxray14_build,
        _chestxray14_has_split,
        CHESTXRAY14_LAYOUT,
        label_type="multilabel",
    ),
    "chexpert": DatasetFamily(
        _chexpert_classes,
        _chexpert_build,
        _chexpert_has_split,
        CHEXPERT_LAYOUT,
        label_type="multilabel",
    ),
}


def register_dataset(name: str, family: DatasetFamily) -> None:
    """Make ``dataset=name`` available to :class:`ClassificationDataModule`."""
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


class ClassificationDataModule(pl.LightningDataModule):
    """Image classification data: a registered dataset family, the presets, and the loaders.

    Batches are ``{"image": float (N, C, S, S), "label": ..., "skipped": int}`` (C: ``channels``),
    where ``label`` is int64 ``(N,)`` for a ``"multiclass"`` dataset and float32 ``(N, K)`` for a
    ``"multilabel"`` one (see :attr:`label_type`; NaN marks an unknown label to leave out of the
    loss), and ``skipped`` counts unreadable images dropped from the batch (see
    :func:`~mnv3.data.collate.collate_classification`).

    Args:
        root: dataset root folder (for ``"shapes"`` / ``"textures"``: where the data is generated).
        dataset: a :data:`DATASETS` name: ``"imagefolder"``, ``"imagenet"``, ``"shapes"``,
            ``"textures"``, ``"chest_xray_pneumonia"``, ``"chestxray14"``, ``"chexpert"``.
        batch_size: images per batch, for every split.
        num_workers: DataLoader worker processes (0: load in the main process).
        image_size: the square crop fed to the network, in training and evaluation.
        resize_size: evaluation short-side resize; None: ``round(image_size / 0.875)``.
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
        mean: per-channel normalisation mean (of images in [0, 1]): 3 values, or 1 for all.
        std: per-channel normalisation standard deviation: 3 values, or 1 for all.
        hflip_prob: probability of a horizontal flip in training.
        auto_augment: None, ``"autoaugment"`` (ImageNet policy) or ``"trivialaugment"``.
        random_erase_prob: probability of random erasing in training.
        min_scale: smallest area fraction of the training random resized crop.
        pin_memory: pin batches in page-locked memory; None: when CUDA is available.
        persistent_workers: keep workers alive between epochs (only used with workers).
        drop_last: drop the last incomplete training batch.
        val_split: folder of the validation split.
        test_split: folder of the test split; None: there is no test split.
        generate: keyword arguments of :func:`~mnv3.data.shapes.generate_shapes` for
            ``dataset="shapes"`` or ``"textures"`` (its own ``seed``: the data does not change with ``seed`` below).
        val_label_file: ImageNet flat-validation label file; None: ``root/val_labels.txt``.
        seed: seed of the training shuffle (and of the workers' augmentation streams).
        val_fraction: chest X-rays: the fraction of training patients carved out as validation.
            ``chest_xray_pneumonia``: None or 0 reads the official val folder (16 images), a value
            in (0, 1) takes a seeded, class-stratified sample of train instead. ``chestxray14`` /
            ``chexpert``: in (0, 1), None means 0.1 (neither ships a validation split of its own).
        split_seed: seed of that carve-out; separate from ``seed`` so that runs with different
            training seeds are validated on the same patients.
        uncertain: CheXpert's -1.0 labels: ``"ones"``, ``"zeros"`` or ``"ignore"`` (NaN labels).
        labels: CheXpert observations to predict, in output order; None: all 14.
        frontal_only: CheXpert: keep only frontal views.
        channels: 3 (RGB; gray files come as three equal channels) or 1: every image is reduced
            to ITU-R 601 luma after decoding (exactly the gray value for gray files) and
            normalised with one mean/std, the averages of 3 given values. The network must read
            1 channel too (``in_channels=1``; RGB-pretrained stems are summed to fit).
    """

    task = "classification"

    def __init__(
        self,
        root: str,
        dataset: str = "imagefolder",
        batch_size: int = 64,
        num_workers: int = 2,
        image_size: int = 224,
        resize_size: int | None = None,
        interpolation: str = "bilinear",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        hflip_prob: float = 0.5,
        auto_augment: str | None = None,
        random_erase_prob: float = 0.0,
        min_scale: float = 0.08,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        drop_last: bool = True,
        val_split: str = "val",
        test_split: str | None = "test",
        generate: Mapping[str, Any] | None = None,
        val_label_file: str | None = None,
        seed: int = 0,
        val_fraction: float | None = None,
        split_seed: int = 0,
        uncertain: str = "ones",
        labels: Sequence[str] | None = None,
        frontal_only: bool = False,
        channels: int = 3,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise DatasetError(
                f"channels must be 1 (gray) or 3 (RGB) for dataset root {root}, got {channels!r}"
            )
        if dataset not in DATASETS:
            raise DatasetError(
                f"unknown dataset {dataset!r} for root {root}; expected one of "
                f"{', '.join(sorted(DATASETS))}"
            )
        # Plain values before save_hyperparameters reads them from this frame: a checkpoint's
        # hparams must load with torch.load(weights_only=True), without OmegaConf.
        root = os.fspath(root)
        mean = tuple(float(m) for m in mean)
        std = tuple(float(s) for s in std)
        generate = _plain(generate) if generate is not None else None
        val_label_file = os.fspath(val_label_file) if val_label_file is not None else None
        val_fraction = float(val_fraction) if val_fraction is not None else None
        labels = [str(label) for label in labels] if labels is not None else None
        self.save_hyperparameters()

        self.family = DATASETS[dataset]
        self.spec = DatasetSpec(
            root=Path(root).expanduser(),
            val_split=val_split,
            test_split=test_split,
            val_label_file=val_label_file,
            generate=generate or {},
            val_fraction=val_fraction,
            split_seed=int(split_seed),
            uncertain=str(uncertain),
            labels=tuple(labels) if labels is not None else None,
            frontal_only=bool(frontal_only),
        )
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.train_transform = ClassificationTrainPreset(
            crop_size=image_size,
            mean=mean,
            std=std,
            interpolation=interpolation,
            hflip_prob=hflip_prob,
            auto_augment=auto_augment,  # type: ignore[arg-type]  # validated by the preset
            random_erase_prob=random_erase_prob,
            scale=(min_scale, 1.0),
            channels=channels,
        )
        self.eval_transform = ClassificationEvalPreset(
            crop_size=image_size,
            resize_size=resize_size,
            mean=mean,
            std=std,
            interpolation=interpolation,
            channels=channels,
        )
        self._classes: tuple[list[str], list[str]] | None = None
        self._datasets: dict[SplitKind, LabeledImageDataset] = {}

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
        return self.train_transform.channels

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

    def get_dataset(self, kind: SplitKind) -> LabeledImageDataset:
        """The dataset of one split, built on first use with the matching preset."""
        if kind not in self._datasets:
            if kind == "test" and not self.has_test:
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
        dataset: LabeledImageDataset,
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
            collate_fn=collate_classification,
        )
