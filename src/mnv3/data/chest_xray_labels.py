"""The label tables of the chest X-ray datasets: their vocabularies, how their files are read, and
the patient-wise validation carve-out. The datasets built on them are :mod:`mnv3.data.chest_xray`.

- Kaggle pediatric pneumonia labels are its class folders (:data:`PNEUMONIA_CLASSES`); patients
  are read from the file names.
- NIH ChestX-ray14: ``Data_Entry_2017.csv`` (``Image Index``, ``Finding Labels`` as
  ``A|B``, ``Patient ID``) and the ``train_val_list.txt`` / ``test_list.txt`` name lists;
  14 findings, ``No Finding`` is the all-zero row.
- CheXpert: ``{train,valid}.csv`` with one column per observation, 1.0 / 0.0 / -1.0 (uncertain) /
  blank (not mentioned, read as 0); the uncertain policy says what -1.0 becomes.

Tables are read with the :mod:`csv` module (CRLF, quoted fields, the trailing empty column of the
NIH file). Validation carve-outs are by patient, so no patient is on both sides, and
deterministic: patients are ordered by the SHA-256 of ``"<seed>:<patient>"`` and the first
``val_fraction`` of them form val. That order depends neither on numpy's generator nor on the row
order of the CSV.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from mnv3.data.errors import DatasetError, MissingImageWarning

DEFAULT_VAL_FRACTION = 0.1

# --- Reading tables and carving validation patients -----------------------------------------------

Row = TypeVar("Row")


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


def select_on_disk(
    names: Sequence[str],
    rows: Sequence[Row],
    keep: np.ndarray,
    locate: Callable[[str], str | None],
) -> tuple[list[str], list[Row], list[str]]:
    """The kept rows whose image ``locate`` finds: (image paths, rows, names of missing images);
    every X-ray layout selects its images so (the missing ones go to :func:`report_missing`)."""
    paths: list[str] = []
    kept: list[Row] = []
    missing: list[str] = []
    for name, row, k in zip(names, rows, keep, strict=True):
        if not k:
            continue
        path = locate(name)
        if path is None:
            missing.append(name)
        else:
            paths.append(path)
            kept.append(row)
    return paths, kept, missing


def report_missing(
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


def pneumonia_patient(path: str) -> str:
    """The patient of a Kaggle pneumonia image (``person<N>``), else the path itself."""
    name = os.path.basename(path)
    match = _PNEUMONIA_PATIENT.match(name)
    return match.group(1).lower() if match else path


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


def read_name_list(path: Path) -> list[str]:
    """One image name per line (CRLF fine, blank lines skipped)."""
    if not path.is_file():
        raise DatasetError(f"split list {path} does not exist; expected {CHESTXRAY14_LAYOUT}")
    with open(path, encoding="utf-8") as lines:
        return [line.strip() for line in lines if line.strip()]


def nih_findings(labels: str, table: Path, line: int) -> np.ndarray:
    """``"A|B"`` -> float32 (14,) over :data:`CHESTXRAY14_FINDINGS`; ``No Finding`` is all zero."""
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


def nih_rows(table: Path, wanted: set[str]) -> tuple[list[str], list[np.ndarray], list[str]]:
    """The ``wanted`` images' rows of the NIH table: names, finding vectors and patients."""
    names: list[str] = []
    vectors: list[np.ndarray] = []
    patients: list[str] = []
    for line, (name, findings, patient) in iter_csv_columns(table, NIH_COLUMNS, CHESTXRAY14_LAYOUT):
        if name in wanted:
            names.append(name)
            vectors.append(nih_findings(findings, table, line))
            patients.append(patient)
    return names, vectors, patients


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


def check_uncertain(uncertain: str) -> None:
    """Raise DatasetError unless ``uncertain`` is one of :data:`UNCERTAIN_POLICIES`."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise DatasetError(
            f"uncertain label policy {uncertain!r} is not one of {', '.join(UNCERTAIN_POLICIES)}"
        )


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


def chexpert_rows(
    table: Path, chosen: Sequence[str], uncertain: str, frontal_only: bool
) -> tuple[list[str], list[list[float]], list[bool]]:
    """Every row of a CheXpert table: image paths (relative to the table's folder), label vectors
    over ``chosen`` with -1.0 read by the ``uncertain`` policy, and whether the view is kept."""
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
    return paths, vectors, views


def chexpert_patient(path: str) -> str:
    """The ``patientNNNNN`` of a CheXpert image path."""
    match = _CHEXPERT_PATIENT.search(path)
    # Without a patientNNNNN component, the study's parent folder is the best stand-in.
    return match.group(1) if match else os.path.dirname(os.path.dirname(path))
