"""The chest X-ray datasets of issue 4, each read from the layout its publisher ships, and their
dataset families.

- Kaggle pediatric pneumonia (Kermany et al., Cell 2018):
  ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``; binary, NORMAL = 0, PNEUMONIA = 1.
  The official val split holds 16 images, so a stratified re-split of train can replace it.
- NIH ChestX-ray14 (Wang et al., CVPR 2017): ``images/*.png`` (or ``images_001/images/*.png`` ...
  ``images_012/images/*.png``), ``Data_Entry_2017.csv``, ``train_val_list.txt``, ``test_list.txt``;
  14 findings, multi-label, ``No Finding`` is the all-zero row.
- CheXpert-v1.0-small (Irvin et al., AAAI 2019): ``CheXpert-v1.0-small/{train,valid}.csv`` whose
  ``Path`` column already holds the ``CheXpert-v1.0-small/`` prefix; 14 observations labelled
  1.0 / 0.0 / -1.0 (uncertain) / blank (not mentioned, read as 0). ``valid.csv`` is the official
  validation set, used here as the test split.

The label tables, their vocabularies and the patient-wise validation carve-out are
:mod:`mnv3.data.chest_xray_labels`.

Multi-label samples are ``{"image", "label": float32 (K,)}``; a NaN label means "unknown"
(CheXpert's uncertain labels under ``uncertain="ignore"``): the loss must skip it, see
:func:`~mnv3.data.folder.known_labels`.
Grayscale 8/16-bit and RGBA files are replicated / flattened to 3-channel uint8 by
:func:`~mnv3.data.io.load_rgb`, so ImageNet-pretrained backbones take them unchanged.

A table row naming an image that is not on disk is skipped, counted in
``dataset.missing_images`` and reported in one :class:`~mnv3.data.errors.MissingImageWarning`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mnv3.data.chest_xray_labels import (
    CHESTXRAY14_FINDINGS,
    CHESTXRAY14_LAYOUT,
    CHEXPERT_LAYOUT,
    DEFAULT_VAL_FRACTION,
    NIH_CSV,
    NIH_TEST_LIST,
    NIH_TRAIN_VAL_LIST,
    PNEUMONIA_CLASSES,
    PNEUMONIA_LAYOUT,
    carve_validation,
    check_uncertain,
    chexpert_labels,
    chexpert_patient,
    chexpert_rows,
    nih_rows,
    pneumonia_patient,
    read_name_list,
    report_missing,
    select_on_disk,
)
from mnv3.data.errors import DatasetError, MissingImageWarning, require_root
from mnv3.data.family import DatasetFamily, DatasetSpec, SplitKind, fixed_classes
from mnv3.data.folder import (
    LabeledImageDataset,
    MultiLabelImageDataset,
    Transform,
    is_image_file,
    walk_once,
)

# Folders that archive tools add next to the data; never images of the dataset.
_IGNORED_DIRS = ("__MACOSX",)
CHEXPERT_DIRS = ("CheXpert-v1.0-small", "CheXpert-v1.0")


def _check_split(split: str) -> None:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")


# --- Kaggle pediatric pneumonia -------------------------------------------------------------------


def _pneumonia_base(root: Path) -> Path | None:
    """The folder holding the split folders: root, root/chest_xray or root/chest_xray/chest_xray."""
    for base in (root, root / "chest_xray", root / "chest_xray" / "chest_xray"):
        if any((base / split).is_dir() for split in ("train", "val", "test")):
            return base
    return None


def pneumonia_has_split(root: str | os.PathLike[str], split: str) -> bool:
    """Whether the split folder exists (under root or its Kaggle ``chest_xray/`` nesting)."""
    base = _pneumonia_base(Path(root))
    return base is not None and (base / split).is_dir()


def _pneumonia_files(split_dir: Path, base: Path) -> tuple[list[str], list[int]]:
    """Image paths relative to ``base`` and their labels, class by class, sorted."""
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(PNEUMONIA_CLASSES):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise DatasetError(
                f"class folder {class_dir} does not exist; expected {PNEUMONIA_LAYOUT}"
            )
        # Each real folder once: a link back into the tree must not list images 41 times.
        for dirpath, filenames in walk_once(class_dir):
            if _IGNORED_DIRS[0] in Path(dirpath).relative_to(class_dir).parts:
                continue
            rel_dir = os.path.relpath(dirpath, base)
            for file in filenames:
                if is_image_file(file):  # also skips macOS "._x.jpeg" AppleDouble files
                    paths.append(os.path.join(rel_dir, file))
                    labels.append(label)
    if not paths:
        raise DatasetError(
            f"split folder {split_dir} contains no images; expected {PNEUMONIA_LAYOUT}"
        )
    return paths, labels


class PneumoniaDataset(LabeledImageDataset):
    """Kaggle pediatric pneumonia: ``{"image", "label": int}``, NORMAL = 0, PNEUMONIA = 1.

    Args:
        root: the folder holding ``train/``, ``val/``, ``test/``, or one holding ``chest_xray/``
            (Kaggle's archive also nests ``chest_xray/chest_xray/``); ``__MACOSX`` folders and
            hidden files are ignored.
        split: ``"train"``, ``"val"`` or ``"test"`` (or another split folder name).
        transform: applied to each uint8 image.
        val_fraction: None or 0: ``train`` and ``val`` are the official folders (val: 16 images).
            In (0, 1): ``val`` is a seeded, class-stratified sample of that fraction of the
            training patients and ``train`` is the rest (the official val folder is unused).
            A ``person<N>_*`` patient's images all land on one side.
        seed: seed of the re-split.

    Attributes:
        patient_ids: ``person<N>`` of every sample in sample order (a NORMAL image, whose name
            has no patient id, stands for itself).

    Raises:
        DatasetError: the root, the split folder or a class folder is missing, or it has no images.
    """

    # 16-bit exports (12-bit detector values) scale by their real range, not the top byte.
    wide_gray = "range"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transform: Transform | None = None,
        val_fraction: float | None = None,
        seed: int = 0,
    ) -> None:
        given = Path(root)
        require_root(given, PNEUMONIA_LAYOUT)
        base = _pneumonia_base(given)
        if base is None:
            raise DatasetError(
                f"dataset root {given} has no train/val/test folder, nor chest_xray/train; "
                f"expected {PNEUMONIA_LAYOUT}"
            )
        fraction = float(val_fraction or 0.0)
        resplit = fraction != 0.0 and split in ("train", "val")
        folder = "train" if resplit else split
        split_dir = base / folder
        if not split_dir.is_dir():
            raise DatasetError(
                f"split folder {split_dir} does not exist; expected {PNEUMONIA_LAYOUT}"
            )
        paths, labels = _pneumonia_files(split_dir, base)
        if resplit:
            patients = [pneumonia_patient(p) for p in paths]
            strata = [PNEUMONIA_CLASSES[label] for label in labels]
            is_val = carve_validation(patients, fraction, seed, strata=strata)
            keep = is_val if split == "val" else ~is_val
            paths = [p for p, k in zip(paths, keep, strict=True) if k]
            labels = [label for label, k in zip(labels, keep, strict=True) if k]
        super().__init__(base, paths, labels, PNEUMONIA_CLASSES, transform=transform)
        self.split = split
        self.missing_images = 0  # folder-listed: every sample exists
        # person<N> for pneumonia images; a NORMAL image (no trustworthy id) is its own patient.
        self.patient_ids: list[str] | None = [pneumonia_patient(p) for p in paths]


# --- NIH ChestX-ray14 -----------------------------------------------------------------------------


def _nih_image_index(root: Path) -> dict[str, str]:
    """Image file name -> path relative to root, over images/ and images_NNN/images/."""
    folders = [root / "images", *sorted(root.glob("images_*/images"))]
    found: dict[str, str] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        rel = os.path.relpath(folder, root)
        with os.scandir(folder) as entries:
            for entry in entries:
                if is_image_file(entry.name):
                    found.setdefault(entry.name, os.path.join(rel, entry.name))
    return found


class ChestXray14Dataset(MultiLabelImageDataset):
    """NIH ChestX-ray14: ``{"image", "label": float32 (14,)}`` over :data:`CHESTXRAY14_FINDINGS`.

    ``test`` is ``test_list.txt``; ``train`` and ``val`` split ``train_val_list.txt`` by
    ``Patient ID`` (the official split is patient-wise too, so no patient is in two splits).

    Args:
        root: the folder holding ``Data_Entry_2017.csv``, the two lists and the image folders.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: applied to each uint8 image.
        val_fraction: fraction of the train_val patients that form ``val``, in (0, 1).
        seed: seed of the patient carve-out.

    Attributes:
        missing_images: rows of this split whose image is not on disk (skipped, warned once).
        unlabelled_images: names in this split's list without a CSV row (skipped, warned once).
        patient_ids: the ``Patient ID`` of every sample, in sample order.

    Raises:
        DatasetError: a missing root, CSV or list; a CSV without the needed columns; an unknown
            finding; a split left with no image on disk.
    """

    # 16-bit exports (12-bit detector values) scale by their real range, not the top byte.
    wide_gray = "range"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transform: Transform | None = None,
        val_fraction: float = DEFAULT_VAL_FRACTION,
        seed: int = 0,
    ) -> None:
        _check_split(split)
        root = Path(root)
        require_root(root, CHESTXRAY14_LAYOUT)
        table = root / NIH_CSV
        list_path = root / (NIH_TEST_LIST if split == "test" else NIH_TRAIN_VAL_LIST)
        listed = read_name_list(list_path)
        names, vectors, patients = nih_rows(table, set(listed))
        keep = np.ones(len(names), dtype=bool)
        if split != "test":
            is_val = carve_validation(patients, val_fraction, seed)
            keep = is_val if split == "val" else ~is_val

        labelled = set(names)
        unlabelled = [n for n in listed if n not in labelled]
        if unlabelled:
            warnings.warn(
                f"{list_path}: {len(unlabelled)} listed images have no row in {table} "
                f"(first: {unlabelled[0]}); skipping them",
                MissingImageWarning,
                stacklevel=2,
            )
        on_disk = _nih_image_index(root)
        paths, rows, missing = select_on_disk(names, vectors, keep, on_disk.get)
        report_missing(table, missing, len(paths), split, root, CHESTXRAY14_LAYOUT)
        super().__init__(root, paths, np.stack(rows), CHESTXRAY14_FINDINGS, transform=transform)
        self.split = split
        # The CSV's Patient ID of every kept image, in sample order (patient-level bootstrap).
        patient_of = dict(zip(names, patients, strict=True))
        self.patient_ids: list[str] | None = [patient_of[os.path.basename(p)] for p in paths]
        self.missing_images = len(missing)
        self.unlabelled_images = len(unlabelled)


# --- CheXpert -------------------------------------------------------------------------------------


def _chexpert_dir(root: Path) -> Path:
    """The folder holding train.csv / valid.csv: root itself or its CheXpert-v1.0[-small] child."""
    require_root(root, CHEXPERT_LAYOUT)
    for folder in (root, *(root / name for name in CHEXPERT_DIRS)):
        if (folder / "train.csv").is_file() or (folder / "valid.csv").is_file():
            return folder
    raise DatasetError(
        f"dataset root {root} holds neither train.csv / valid.csv nor "
        f"CheXpert-v1.0-small/train.csv; expected {CHEXPERT_LAYOUT}"
    )


def chexpert_has_split(root: str | os.PathLike[str], split: str) -> bool:
    """Whether the CSV of a split is there: ``valid.csv`` for test, ``train.csv`` otherwise."""
    try:
        folder = _chexpert_dir(Path(root))
    except DatasetError:
        return False
    return (folder / ("valid.csv" if split == "test" else "train.csv")).is_file()


class CheXpertDataset(MultiLabelImageDataset):
    """CheXpert-v1.0-small: ``{"image", "label": float32 (K,)}`` over the chosen observations.

    ``train`` and ``val`` split ``train.csv`` by patient (``patientNNNNN`` in ``Path``); ``test`` is
    ``valid.csv``, the official validation set of 200 studies labelled by radiologist consensus.

    Args:
        root: ``CheXpert-v1.0-small/`` or its parent (``Path`` values carry that prefix; they are
            resolved against the folder holding the CSVs, whatever its name).
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: applied to each uint8 image.
        labels: observation names in output order; None: all 14 (:data:`CHEXPERT_OBSERVATIONS`),
            e.g. :data:`CHEXPERT_COMPETITION_LABELS` for the competition's five.
        uncertain: how a -1.0 reads: ``"ones"`` (positive; the paper's U-Ones), ``"zeros"``
            (negative; U-Zeros) or ``"ignore"`` (NaN in the label vector, which the loss must
            mask out with :func:`known_labels`; U-Ignore). A blank label is always 0.
        frontal_only: keep only ``Frontal/Lateral == "Frontal"`` rows, in every split.
        val_fraction: fraction of the train.csv patients that form ``val``, in (0, 1).
        seed: seed of the patient carve-out.

    Attributes:
        missing_images: rows of this split whose image is not on disk (skipped, warned once).
        patient_ids: the ``patientNNNNN`` of every sample, in sample order.

    Raises:
        DatasetError: a missing root or CSV; a CSV without the needed columns; a label value other
            than 1.0 / 0.0 / -1.0 / blank; an unknown label name or policy; a split left with no
            image on disk.
    """

    # 16-bit exports (12-bit detector values) scale by their real range, not the top byte.
    wide_gray = "range"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transform: Transform | None = None,
        labels: Sequence[str] | None = None,
        uncertain: str = "ones",
        frontal_only: bool = False,
        val_fraction: float = DEFAULT_VAL_FRACTION,
        seed: int = 0,
    ) -> None:
        _check_split(split)
        chosen = chexpert_labels(labels)
        check_uncertain(uncertain)
        folder = _chexpert_dir(Path(root))
        table = folder / ("valid.csv" if split == "test" else "train.csv")
        paths, vectors, views = chexpert_rows(table, chosen, uncertain, frontal_only)
        keep = np.asarray(views, dtype=bool)
        if split != "test":
            # Carved before the view filter, so frontal_only moves no patient between the splits.
            is_val = carve_validation([chexpert_patient(p) for p in paths], val_fraction, seed)
            keep &= is_val if split == "val" else ~is_val

        kept_paths, kept_rows, missing = select_on_disk(
            paths, vectors, keep, lambda path: path if (folder / path).is_file() else None
        )
        report_missing(table, missing, len(kept_paths), split, folder, CHEXPERT_LAYOUT)
        matrix = np.asarray(kept_rows, np.float32).reshape(len(kept_paths), len(chosen))
        super().__init__(folder, kept_paths, matrix, chosen, transform=transform)
        self.split = split
        self.uncertain = uncertain
        self.patient_ids: list[str] | None = [chexpert_patient(p) for p in kept_paths]
        self.missing_images = len(missing)


# --- The chest X-ray families (issue 4) -----------------------------------------------------------

# The carve-out: val_fraction of the training patients, seeded by split_seed (separate from the
# shuffle seed, so runs with different seeds validate on the same patients).
_CARVE_OPTIONS: dict[str, Any] = {"val_fraction": None, "split_seed": 0}


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
    listing = NIH_TEST_LIST if folder == spec.test_split else NIH_TRAIN_VAL_LIST
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


PNEUMONIA = DatasetFamily(
    fixed_classes(PNEUMONIA_CLASSES),
    _pneumonia_build,
    lambda spec, folder: pneumonia_has_split(spec.root, folder),
    PNEUMONIA_LAYOUT,
    options=_CARVE_OPTIONS,
    wide_gray=PneumoniaDataset.wide_gray,
)
CHESTXRAY14 = DatasetFamily(
    fixed_classes(CHESTXRAY14_FINDINGS),
    _chestxray14_build,
    _chestxray14_has_split,
    CHESTXRAY14_LAYOUT,
    label_type="multilabel",
    options=_CARVE_OPTIONS,
    wide_gray=ChestXray14Dataset.wide_gray,
)
CHEXPERT = DatasetFamily(
    _chexpert_classes,
    _chexpert_build,
    _chexpert_has_split,
    CHEXPERT_LAYOUT,
    label_type="multilabel",
    options={**_CARVE_OPTIONS, "uncertain": "ones", "labels": None, "frontal_only": False},
    wide_gray=CheXpertDataset.wide_gray,
)
