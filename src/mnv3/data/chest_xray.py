"""The chest X-ray datasets of issue 4, each read from the layout its publisher ships.

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

Multi-label samples are ``{"image", "label": float32 (K,)}``; a NaN label means "unknown"
(CheXpert's uncertain labels under ``uncertain="ignore"``): the loss must skip it, see
:func:`known_labels`.
Grayscale 8/16-bit and RGBA files are replicated / flattened to 3-channel uint8 by
:func:`~mnv3.data.io.load_rgb`, so ImageNet-pretrained backbones take them unchanged.

Validation carve-outs are by patient, so no patient is on both sides, and deterministic: patients
are ordered by the SHA-256 of ``"<seed>:<patient>"`` and the first ``val_fraction`` of them form
val. That order depends neither on numpy's generator nor on the row order of the CSV.

Label tables are read with the :mod:`csv` module (CRLF, quoted fields, the trailing empty column of
the NIH file); a row naming an image that is not on disk is skipped, counted in
``dataset.missing_images`` and reported in one :class:`~mnv3.data.errors.MissingImageWarning`.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from mnv3.data.errors import DatasetError, MissingImageWarning
from mnv3.data.folder import (
    LabeledImageDataset,
    MultiLabelImageDataset,
    Transform,
    is_image_file,
    known_labels,
    walk_once,
)

__all__ = [
    "CHESTXRAY14_FINDINGS",
    "CHESTXRAY14_LAYOUT",
    "CHEXPERT_COMPETITION_LABELS",
    "CHEXPERT_LAYOUT",
    "CHEXPERT_OBSERVATIONS",
    "DEFAULT_VAL_FRACTION",
    "PNEUMONIA_CLASSES",
    "PNEUMONIA_LAYOUT",
    "UNCERTAIN_POLICIES",
    "CheXpertDataset",
    "ChestXray14Dataset",
    "PneumoniaDataset",
    "carve_validation",
    "chexpert_labels",
    "iter_csv_columns",
    "known_labels",
    "pneumonia_has_split",
]

DEFAULT_VAL_FRACTION = 0.1
# Folders that archive tools add next to the data; never images of the dataset.
_IGNORED_DIRS = ("__MACOSX",)

# --- Shared helpers -------------------------------------------------------------------------------


def iter_csv_columns(
    path: str | os.PathLike[str], columns: Sequence[str], layout: str
) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, [value of each of columns])`` for every non-blank row of a CSV file.

    Values are stripped; extra columns (the NIH file's trailing empty one) are ignored. The header
    is checked when iteration starts.

    Raises:
        DatasetError: the file is missing, empty, lacks one of ``columns``, or a row is too short.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"label table {path} does not exist; expected {layout}")
    # newline="" lets csv handle CRLF and newlines inside quoted fields; utf-8-sig drops a BOM.
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"label table {path} is empty; expected {layout}")
        found = [name.strip() for name in header]
        index: dict[str, int] = {}
        for i, name in enumerate(found):
            index.setdefault(name, i)
        missing = [c for c in columns if c not in index]
        if missing:
            raise DatasetError(
                f"label table {path} has columns {found} but not {missing}; expected the columns "
                f"{list(columns)} ({layout})"
            )
        wanted = [index[c] for c in columns]
        width = max(wanted) + 1
        for row in reader:
            if not any(field.strip() for field in row):
                continue
            if len(row) < width:
                raise DatasetError(
                    f"label table {path} line {reader.line_num} has {len(row)} fields, fewer than "
                    f"the {width} needed to reach column {found[width - 1]!r}"
                )
            yield reader.line_num, [row[i].strip() for i in wanted]


def carve_validation(
    groups: Sequence[str],
    val_fraction: float,
    seed: int = 0,
    strata: Sequence[object] | None = None,
) -> np.ndarray:
    """Which items go to validation: a seeded sample of whole groups (patients), per stratum.

    Within each stratum (class, for a stratified split; one stratum when ``strata`` is None), the
    distinct groups are ordered by SHA-256 of ``"<seed>:<group>"`` and the first
    ``round(val_fraction * groups)`` of them (at least one, leaving at least one) are validation.
    All items of a group share its side.

    Returns:
        A bool array, True for validation items.

    Raises:
        DatasetError: ``val_fraction`` is not in (0, 1), or a stratum has fewer than two groups.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(
            f"val_fraction must be in (0, 1) to carve a validation split, got {val_fraction}"
        )
    group_array = np.asarray(groups, dtype=object)
    strata_array = np.zeros(len(groups), np.int64) if strata is None else np.asarray(strata)
    is_val = np.zeros(len(groups), dtype=bool)
    for stratum in dict.fromkeys(strata_array.tolist()):
        members = strata_array == stratum
        distinct = sorted(set(group_array[members].tolist()))
        if len(distinct) < 2:
            where = "" if strata is None else f" of stratum {stratum!r}"
            raise DatasetError(
                f"cannot carve a validation split from the {len(distinct)} patient(s){where}; "
                "needs at least two"
            )
        ordered = sorted(distinct, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).digest())
        count = min(max(round(val_fraction * len(distinct)), 1), len(distinct) - 1)
        chosen = set(ordered[:count])
        is_val |= members & np.fromiter((g in chosen for g in group_array), bool, len(groups))
    return is_val


def _check_split(split: str) -> None:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")


def _require_root(root: Path, layout: str) -> None:
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist; expected {layout}")


def _report_missing(
    table: Path, missing: list[str], kept: int, split: str, image_root: Path, layout: str
) -> None:
    """Warn once about rows whose image is not on disk; a split left with no image is an error."""
    total = kept + len(missing)
    if not kept:
        first = f" (all {total} missing, first: {missing[0]})" if missing else ""
        raise DatasetError(
            f"label table {table} gives the {split} split no image that exists under "
            f"{image_root}{first}; expected {layout}"
        )
    if missing:
        warnings.warn(
            f"{table}: {len(missing)} of {total} {split} rows name images that do not exist "
            f"(first: {missing[0]}); skipping them",
            MissingImageWarning,
            stacklevel=3,
        )


# --- Kaggle pediatric pneumonia -------------------------------------------------------------------

PNEUMONIA_CLASSES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
PNEUMONIA_LAYOUT = (
    "Kaggle chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg (root: the folder holding "
    "train/val/test, or a folder above it holding chest_xray/ or chest_xray/chest_xray/)"
)
# Kermany's pneumonia files are person<N>_bacteria_<k>.jpeg / person<N>_virus_<k>.jpeg: one patient,
# several images. NORMAL names (IM-0115-0001.jpeg) carry no patient id we can trust.
_PNEUMONIA_PATIENT = re.compile(r"^(person\d+)_", re.IGNORECASE)


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


def _pneumonia_patient(path: str) -> str:
    name = os.path.basename(path)
    match = _PNEUMONIA_PATIENT.match(name)
    return match.group(1).lower() if match else path


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

    Raises:
        DatasetError: the root, the split folder or a class folder is missing, or it has no images.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transform: Transform | None = None,
        val_fraction: float | None = None,
        seed: int = 0,
    ) -> None:
        given = Path(root)
        _require_root(given, PNEUMONIA_LAYOUT)
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
            patients = [_pneumonia_patient(p) for p in paths]
            strata = [PNEUMONIA_CLASSES[label] for label in labels]
            is_val = carve_validation(patients, fraction, seed, strata=strata)
            keep = is_val if split == "val" else ~is_val
            paths = [p for p, k in zip(paths, keep, strict=True) if k]
            labels = [label for label, k in zip(labels, keep, strict=True) if k]
        super().__init__(base, paths, labels, PNEUMONIA_CLASSES, transform=transform)
        self.split = split
        self.missing_images = 0  # folder-listed: every sample exists


# --- NIH ChestX-ray14 -----------------------------------------------------------------------------

CHESTXRAY14_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NIH_NO_FINDING = "No Finding"
NIH_CSV = "Data_Entry_2017.csv"
NIH_TRAIN_VAL_LIST = "train_val_list.txt"
NIH_TEST_LIST = "test_list.txt"
NIH_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
CHESTXRAY14_LAYOUT = (
    f"NIH ChestX-ray14 as {NIH_CSV}, {NIH_TRAIN_VAL_LIST}, {NIH_TEST_LIST} and images/*.png "
    "(or images_001/images/*.png to images_012/images/*.png)"
)


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


def _read_name_list(path: Path) -> list[str]:
    """One image name per line (CRLF fine, blank lines skipped)."""
    if not path.is_file():
        raise DatasetError(f"split list {path} does not exist; expected {CHESTXRAY14_LAYOUT}")
    with open(path, encoding="utf-8") as lines:
        return [line.strip() for line in lines if line.strip()]


def _nih_findings(labels: str, table: Path, line: int) -> np.ndarray:
    vector = np.zeros(len(CHESTXRAY14_FINDINGS), np.float32)
    for finding in labels.split("|"):
        finding = finding.strip()
        if finding == NIH_NO_FINDING:
            continue
        try:
            vector[CHESTXRAY14_FINDINGS.index(finding)] = 1.0
        except ValueError:
            raise DatasetError(
                f"label table {table} line {line} has finding {finding!r}, which is neither "
                f"{NIH_NO_FINDING!r} nor one of the 14 findings {', '.join(CHESTXRAY14_FINDINGS)}"
            ) from None
    return vector


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

    Raises:
        DatasetError: a missing root, CSV or list; a CSV without the needed columns; an unknown
            finding; a split left with no image on disk.
    """

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
        _require_root(root, CHESTXRAY14_LAYOUT)
        table = root / NIH_CSV
        list_path = root / (NIH_TEST_LIST if split == "test" else NIH_TRAIN_VAL_LIST)
        listed = _read_name_list(list_path)
        wanted = set(listed)
        names: list[str] = []
        vectors: list[np.ndarray] = []
        patients: list[str] = []
        for line, (name, findings, patient) in iter_csv_columns(
            table, NIH_COLUMNS, CHESTXRAY14_LAYOUT
        ):
            if name in wanted:
                names.append(name)
                vectors.append(_nih_findings(findings, table, line))
                patients.append(patient)
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
        paths: list[str] = []
        rows: list[np.ndarray] = []
        missing: list[str] = []
        for name, vector, k in zip(names, vectors, keep, strict=True):
            if not k:
                continue
            if name in on_disk:
                paths.append(on_disk[name])
                rows.append(vector)
            else:
                missing.append(name)
        _report_missing(table, missing, len(paths), split, root, CHESTXRAY14_LAYOUT)
        super().__init__(root, paths, np.stack(rows), CHESTXRAY14_FINDINGS, transform=transform)
        self.split = split
        self.missing_images = len(missing)
        self.unlabelled_images = len(unlabelled)


# --- CheXpert -------------------------------------------------------------------------------------

CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
# The five observations of the CheXpert competition (Irvin et al., 2019, section 5).
CHEXPERT_COMPETITION_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)
# How a -1.0 (uncertain) label is read: as positive, as negative, or as unknown (NaN, masked).
UNCERTAIN_POLICIES: tuple[str, ...] = ("ones", "zeros", "ignore")
CHEXPERT_DIRS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
CHEXPERT_LAYOUT = (
    "CheXpert-v1.0-small/{train,valid}.csv with Path values like "
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg (root: that folder or its "
    "parent)"
)
_CHEXPERT_PATIENT = re.compile(r"(patient\d+)")
_UNCERTAIN_VALUE = {"ones": 1.0, "zeros": 0.0, "ignore": float("nan")}


def chexpert_labels(labels: Sequence[str] | None = None) -> list[str]:
    """The label columns to read, in output order; None: all 14 observations.

    Raises:
        DatasetError: an unknown or repeated observation name.
    """
    if labels is None:
        return list(CHEXPERT_OBSERVATIONS)
    chosen = [str(label) for label in labels]
    unknown = [label for label in chosen if label not in CHEXPERT_OBSERVATIONS]
    if unknown or len(set(chosen)) != len(chosen) or not chosen:
        raise DatasetError(
            f"CheXpert labels {chosen} must be distinct names among the 14 observations "
            f"{', '.join(CHEXPERT_OBSERVATIONS)} (unknown: {unknown or 'none'})"
        )
    return chosen


def _check_uncertain(uncertain: str) -> None:
    if uncertain not in UNCERTAIN_POLICIES:
        raise DatasetError(
            f"uncertain label policy {uncertain!r} is not one of {', '.join(UNCERTAIN_POLICIES)}"
        )


def _chexpert_dir(root: Path) -> Path:
    """The folder holding train.csv / valid.csv: root itself or its CheXpert-v1.0[-small] child."""
    _require_root(root, CHEXPERT_LAYOUT)
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


def _chexpert_relative(path: str) -> str:
    """``CheXpert-v1.0-small/train/...`` -> ``train/...``: relative to the CSV folder, whatever its
    name on disk."""
    head, sep, tail = path.replace("\\", "/").partition("/")
    return tail if sep and head.startswith("CheXpert-v1.0") else path


def _chexpert_value(value: str, table: Path, line: int, column: str) -> float:
    """1.0 / 0.0 / -1.0 as floats (-1 is resolved by the caller); blank (not mentioned) is 0."""
    if not value:
        return 0.0
    try:
        number = float(value)
    except ValueError:
        number = float("inf")
    if number not in (1.0, 0.0, -1.0):
        raise DatasetError(
            f"label table {table} line {line} has {value!r} in column {column!r}; expected 1.0, "
            "0.0, -1.0 (uncertain) or blank"
        )
    return number


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

    Raises:
        DatasetError: a missing root or CSV; a CSV without the needed columns; a label value other
            than 1.0 / 0.0 / -1.0 / blank; an unknown label name or policy; a split left with no
            image on disk.
    """

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
        _check_uncertain(uncertain)
        folder = _chexpert_dir(Path(root))
        table = folder / ("valid.csv" if split == "test" else "train.csv")
        columns = ["Path", *chosen] + (["Frontal/Lateral"] if frontal_only else [])
        uncertain_value = _UNCERTAIN_VALUE[uncertain]

        paths: list[str] = []
        vectors: list[list[float]] = []
        views: list[bool] = []
        for line, values in iter_csv_columns(table, columns, CHEXPERT_LAYOUT):
            row = [
                _chexpert_value(v, table, line, c)
                for v, c in zip(values[1 : 1 + len(chosen)], chosen, strict=True)
            ]
            paths.append(_chexpert_relative(values[0]))
            vectors.append([uncertain_value if v == -1.0 else v for v in row])
            views.append(not frontal_only or values[-1] == "Frontal")
        keep = np.asarray(views, dtype=bool)
        if split != "test":
            # Carved before the view filter, so frontal_only moves no patient between the splits.
            is_val = carve_validation([_chexpert_patient(p) for p in paths], val_fraction, seed)
            keep &= is_val if split == "val" else ~is_val

        kept_paths: list[str] = []
        kept_rows: list[list[float]] = []
        missing: list[str] = []
        for path, vector, k in zip(paths, vectors, keep, strict=True):
            if not k:
                continue
            if (folder / path).is_file():
                kept_paths.append(path)
                kept_rows.append(vector)
            else:
                missing.append(path)
        _report_missing(table, missing, len(kept_paths), split, folder, CHEXPERT_LAYOUT)
        matrix = np.asarray(kept_rows, np.float32).reshape(len(kept_paths), len(chosen))
        super().__init__(folder, kept_paths, matrix, chosen, transform=transform)
        self.split = split
        self.uncertain = uncertain
        self.missing_images = len(missing)


def _chexpert_patient(path: str) -> str:
    match = _CHEXPERT_PATIENT.search(path)
    # Without a patientNNNNN component, the study's parent folder is the best stand-in.
    return match.group(1) if match else os.path.dirname(os.path.dirname(path))
