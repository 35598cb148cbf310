"""Your own chest X-rays, listed in one CSV file: the ``xray_csv`` dataset family (issue 20).

A hospital export rarely looks like a public dataset, but it can nearly always be written as one
table: an image path column, the label column(s), and optionally a patient id, a view and a split
column. ``data=xray_csv`` reads that table.

- One label column holding class names (``NORMAL`` / ``PNEUMONIA``, ``0`` / ``1``): multi-class
  (binary with two classes); every row needs a class. The classes are ``data.classes`` in that
  order, else the column's distinct values sorted (numerically when all are integers), taken over
  every row so that no split and no view filter shifts a label index.
- Several label columns holding ``1`` / ``0`` / blank: multi-label, one output per column; a blank
  is unknown (NaN, left out of the loss). ``data.multilabel=true`` reads a single column so too.
- Splits: a split column saying ``train`` / ``val`` / ``test`` per row (val carved from train by
  patient when no row says val), or, without one, test and val carved from the rows by patient
  with :func:`~mnv3.data.chest_xray_labels.carve_validation` (seeded, stratified by class for
  multi-class data), so a patient's images are never on two sides. Without a patient column each
  image is its own patient.
- Views: ``data.views=[PA, AP]`` keeps the rows whose view column holds one of them (compared
  case-insensitively; ``lateral`` also matches ``LAT``, ``LL`` and ``RL``, ``frontal`` matches
  ``PA`` and ``AP``). Splits are carved before the filter, so changing it moves no patient.

Every mistake in the table (a missing column, an unknown label, split or view value) is one
:class:`~mnv3.data.errors.DatasetError` sentence naming the CSV file, line and column. A row naming
an image that is not on disk is skipped, counted in ``dataset.missing_images`` and reported in one
:class:`~mnv3.data.errors.MissingImageWarning`, as the public layouts do. Images are read by the
bits they hold (``wide_gray = "range"``, docs/xray.md); ``.dcm`` files go through the DICOM reader.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mnv3.data.chest_xray_labels import (
    DEFAULT_VAL_FRACTION,
    carve_validation,
    iter_csv_columns,
    report_missing,
    select_on_disk,
)
from mnv3.data.errors import DatasetError
from mnv3.data.family import DatasetFamily, DatasetSpec, LabelType, SplitKind
from mnv3.data.folder import LabeledImageDataset, MultiLabelImageDataset, Transform

DEFAULT_CSV = "labels.csv"
XRAY_CSV_LAYOUT = (
    "a CSV file (data.csv, default <root>/labels.csv) with an image path column (data.image_column;"
    " paths relative to the root or absolute), the label column(s) (data.label_columns) and "
    "optional patient, view and split columns (data.patient_column, data.view_column, "
    "data.split_column)"
)
SPLIT_VALUES: tuple[str, ...] = ("train", "val", "test")
# Names a view filter entry also matches: exports spell lateral views LL / RL / LAT (MIMIC-CXR).
VIEW_ALIASES: dict[str, tuple[str, ...]] = {
    "lateral": ("lateral", "lat", "ll", "rl"),
    "frontal": ("frontal", "pa", "ap"),
}


@dataclass(frozen=True)
class XrayCsvLayout:
    """Which file and which columns hold what: the ``data.*`` options of ``xray_csv``.

    Attributes:
        csv: the table; a relative path is taken under the dataset root.
        image_column: the image path column (paths relative to the root, or absolute).
        label_columns: one column of class names (multi-class) or several 0/1/blank columns.
        classes: multi-class only: the class names in label order; None: the column's values.
        multilabel: None: multi-label exactly when there are several label columns.
        patient_column: the patient id column; None: each image is its own patient.
        view_column: the view column (PA, AP, LATERAL...); needed by ``views``.
        views: keep only rows whose view is one of these; None: all rows.
        split_column: a train / val / test column; None: carve the splits by patient.
    """

    csv: Path
    image_column: str = "path"
    label_columns: tuple[str, ...] = ("label",)
    classes: tuple[str, ...] | None = None
    multilabel: bool | None = None
    patient_column: str | None = None
    view_column: str | None = None
    views: tuple[str, ...] | None = None
    split_column: str | None = None

    def __post_init__(self) -> None:
        if not self.label_columns or len(set(self.label_columns)) != len(self.label_columns):
            raise DatasetError(
                f"data.label_columns={list(self.label_columns)} for {self.csv} must name one or "
                "more distinct columns"
            )
        if self.views is not None and self.view_column is None:
            raise DatasetError(
                f"data.views={list(self.views)} filters {self.csv} by view, but no "
                "data.view_column says which column holds the view"
            )
        if self.classes is not None and self.is_multilabel:
            raise DatasetError(
                f"data.classes is for one multi-class label column; the multi-label columns "
                f"{list(self.label_columns)} of {self.csv} are the classes already"
            )

    @property
    def is_multilabel(self) -> bool:
        """Several 0/1 columns (or ``multilabel=true``) rather than one column of class names."""
        return len(self.label_columns) > 1 if self.multilabel is None else self.multilabel

    @property
    def columns(self) -> list[str]:
        """Every column read, in the order :class:`XrayTable` unpacks them."""
        optional = (self.patient_column, self.view_column, self.split_column)
        return [self.image_column, *self.label_columns, *(c for c in optional if c is not None)]


def _text_tuple(value: Any) -> tuple[str, ...] | None:
    """A config list (or one string) as a tuple of strings; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def layout_from_spec(spec: DatasetSpec) -> XrayCsvLayout:
    """The layout a data config describes (``csv`` relative to ``root``, default labels.csv)."""
    csv = Path(str(spec.option("csv") or DEFAULT_CSV)).expanduser()
    return XrayCsvLayout(
        csv=csv if csv.is_absolute() else spec.root / csv,
        image_column=str(spec.option("image_column")),
        label_columns=_text_tuple(spec.option("label_columns")) or (),
        classes=_text_tuple(spec.option("classes")),
        multilabel=spec.option("multilabel"),
        patient_column=spec.option("patient_column"),
        view_column=spec.option("view_column"),
        views=_text_tuple(spec.option("views")),
        split_column=spec.option("split_column"),
    )


def _sorted_classes(values: set[str]) -> list[str]:
    """Class names in label order: numeric order when every name is an integer, else by name."""
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


@dataclass
class XrayTable:
    """Every data row of the CSV, parsed and checked; the splits are chosen from it."""

    layout: XrayCsvLayout
    lines: list[int]
    images: list[str]
    raw_labels: list[list[str]]
    patients: list[str] | None
    views: list[str] | None
    splits: list[str] | None

    @classmethod
    def read(cls, layout: XrayCsvLayout) -> XrayTable:
        """Read the columns the layout names; split values are checked here, labels by
        :meth:`labels`."""
        table = cls(layout, [], [], [], None, None, None)
        count = len(layout.label_columns)
        patients: list[str] = []
        views: list[str] = []
        splits: list[str] = []
        for line, values in iter_csv_columns(layout.csv, layout.columns, XRAY_CSV_LAYOUT):
            image = values[0]
            if not image:
                raise DatasetError(
                    f"label table {layout.csv} line {line} has no image path in column "
                    f"{layout.image_column!r}"
                )
            table.lines.append(line)
            table.images.append(image.replace("\\", "/"))
            table.raw_labels.append(values[1 : 1 + count])
            rest = iter(values[1 + count :])
            if layout.patient_column is not None:
                patients.append(next(rest))
            if layout.view_column is not None:
                views.append(next(rest))
            if layout.split_column is not None:
                splits.append(_split_value(next(rest), layout, line))
        if not table.lines:
            raise DatasetError(
                f"label table {layout.csv} has no data rows; expected {XRAY_CSV_LAYOUT}"
            )
        table.patients = patients if layout.patient_column is not None else None
        table.views = views if layout.view_column is not None else None
        table.splits = splits if layout.split_column is not None else None
        return table

    def classes(self) -> list[str]:
        """Class names in label order: the label columns (multi-label), else ``data.classes`` or
        the label column's values."""
        if self.layout.is_multilabel:
            return list(self.layout.label_columns)
        if self.layout.classes is not None:
            return list(self.layout.classes)
        column = self.layout.label_columns[0]
        for line, (value,) in zip(self.lines, self.raw_labels, strict=True):
            if not value:
                raise _no_class(self.layout, line, column)
        return _sorted_classes({value for (value,) in self.raw_labels})

    def labels(self, classes: Sequence[str]) -> np.ndarray:
        """int64 ``(N,)`` class indices, or float32 ``(N, K)`` 1 / 0 / NaN (blank) vectors."""
        layout = self.layout
        if layout.is_multilabel:
            matrix = np.empty((len(self.lines), len(classes)), np.float32)
            for i, (line, row) in enumerate(zip(self.lines, self.raw_labels, strict=True)):
                for k, (value, column) in enumerate(zip(row, layout.label_columns, strict=True)):
                    matrix[i, k] = _binary_value(value, layout.csv, line, column)
            return matrix
        index = {name: i for i, name in enumerate(classes)}
        column = layout.label_columns[0]
        labels = np.empty(len(self.lines), np.int64)
        for i, (line, (value,)) in enumerate(zip(self.lines, self.raw_labels, strict=True)):
            if not value:
                raise _no_class(layout, line, column)
            if value not in index:
                raise DatasetError(
                    f"label table {layout.csv} line {line} has class {value!r} in column "
                    f"{column!r}, which is not one of data.classes {list(classes)}"
                )
            labels[i] = index[value]
        return labels

    def view_mask(self) -> np.ndarray:
        """Rows kept by the view filter (all rows without one).

        Raises:
            DatasetError: a kept view that no row has (a misspelt filter), or a blank view cell.
        """
        layout = self.layout
        if layout.views is None or self.views is None:
            return np.ones(len(self.lines), dtype=bool)
        column = layout.view_column
        found = [v.strip().lower() for v in self.views]
        for line, value in zip(self.lines, found, strict=True):
            if not value:
                raise DatasetError(
                    f"label table {layout.csv} line {line} has no view in column {column!r}, "
                    f"so the view filter data.views={list(layout.views)} cannot place it"
                )
        present = set(found)
        wanted: set[str] = set()
        for view in layout.views:
            names = VIEW_ALIASES.get(view.strip().lower(), (view.strip().lower(),))
            if not present.intersection(names):
                raise DatasetError(
                    f"label table {layout.csv} has no {view!r} view in column {column!r} (it "
                    f"has {', '.join(sorted({v.strip() for v in self.views}))}); "
                    "fix data.views"
                )
            wanted.update(names)
        return np.fromiter((v in wanted for v in found), bool, len(found))


def _no_class(layout: XrayCsvLayout, line: int, column: str) -> DatasetError:
    return DatasetError(
        f"label table {layout.csv} line {line} has no class in column {column!r}; every row of a "
        "multi-class table needs one (data.multilabel=true reads a blank as unknown)"
    )


def _split_value(value: str, layout: XrayCsvLayout, line: int) -> str:
    """A split cell as ``train`` / ``val`` / ``test`` (case-insensitive; ``valid`` is val)."""
    split = value.strip().lower()
    split = {"valid": "val", "validation": "val"}.get(split, split)
    if split not in SPLIT_VALUES:
        raise DatasetError(
            f"label table {layout.csv} line {line} has {value!r} in column "
            f"{layout.split_column!r}; expected train, val or test"
        )
    return split


def _binary_value(value: str, csv: Path, line: int, column: str) -> float:
    """A multi-label cell: ``1`` / ``0`` (also ``1.0`` / ``0.0``), blank = unknown (NaN)."""
    if not value:
        return float("nan")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number not in (0.0, 1.0):
        raise DatasetError(
            f"label table {csv} line {line} has {value!r} in column {column!r}; expected 1, 0 or "
            "blank (unknown) in a multi-label column"
        )
    return number


def _patient_strata(patients: Sequence[str], labels: np.ndarray | None) -> list[int] | None:
    """Each row's stratum for a class-stratified carve-out: the class of its patient's first row.

    One stratum per patient, or :func:`carve_validation` could put a patient with images of two
    classes on both sides. None (no stratification) for multi-label data, or when some class has
    fewer than two patients to share between the sides.
    """
    if labels is None or labels.ndim != 1:
        return None
    first: dict[str, int] = {}
    for patient, label in zip(patients, labels.tolist(), strict=True):
        first.setdefault(patient, label)
    per_class: dict[int, int] = {}
    for label in first.values():
        per_class[label] = per_class.get(label, 0) + 1
    if min(per_class.values()) < 2:
        return None
    return [first[p] for p in patients]


def _carve(
    patients: Sequence[str], rows: np.ndarray, fraction: float, seed: int, labels: np.ndarray
) -> np.ndarray:
    """Of the rows marked in ``rows``, those a patient-wise carve-out of ``fraction`` picks."""
    chosen = np.zeros(len(rows), dtype=bool)
    where = np.flatnonzero(rows)
    if not len(where):
        return chosen
    group = [patients[i] for i in where]
    strata = _patient_strata(group, labels[where])
    chosen[where] = carve_validation(group, fraction, seed, strata=strata)
    return chosen


def split_rows(
    table: XrayTable,
    labels: np.ndarray,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Which rows form train, val and test (bool masks over all rows, before the view filter).

    With a split column, its values; val is carved by patient from train when no row says val.
    Without one, test (``test_fraction`` of the patients; none when 0) and then val
    (``val_fraction`` of all patients) are carved by patient, the rest is train.
    """
    patients = table.patients if table.patients is not None else table.images
    count = len(table.lines)
    if table.splits is not None:
        column = np.asarray(table.splits)
        masks = {name: column == name for name in SPLIT_VALUES}
        if not masks["val"].any():
            masks["val"] = _carve(patients, masks["train"], val_fraction, seed, labels)
            masks["train"] &= ~masks["val"]
        _warn_shared_patients(table, patients, masks)
        return masks
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise DatasetError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} of "
            f"{table.layout.csv} must be fractions that leave patients for training"
        )
    test = np.zeros(count, dtype=bool)
    if test_fraction > 0.0:
        test = _carve(patients, np.ones(count, dtype=bool), test_fraction, seed, labels)
    # val_fraction counts all patients, so adding a test split does not shrink val.
    val = _carve(patients, ~test, val_fraction / (1.0 - test_fraction), seed, labels)
    return {"train": ~(test | val), "val": val, "test": test}


def _warn_shared_patients(
    table: XrayTable, patients: Sequence[str], masks: dict[str, np.ndarray]
) -> None:
    """A split column may put one patient on two sides; say so once (it inflates val/test)."""
    if table.patients is None:
        return
    sides = {name: {patients[i] for i in np.flatnonzero(mask)} for name, mask in masks.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sides[a] & sides[b]
        if shared:
            warnings.warn(
                f"{table.layout.csv}: column {table.layout.split_column!r} puts "
                f"{len(shared)} patient(s) in both {a} and {b} (first: {sorted(shared)[0]}); "
                f"their {b} images are not unseen",
                UserWarning,
                stacklevel=3,
            )


class _XrayCsvReader:
    """The constructor the two ``xray_csv`` dataset classes share (mixed in before the base)."""

    # 16-bit exports (12-bit detector values) scale by their real range, not the top byte.
    wide_gray: ClassVar[str] = "range"
    split: str
    layout: XrayCsvLayout
    missing_images: int
    _patients: np.ndarray | None

    def __init__(
        self,
        root: str | os.PathLike[str],
        layout: XrayCsvLayout,
        split: str = "train",
        transform: Transform | None = None,
        val_fraction: float = DEFAULT_VAL_FRACTION,
        test_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        if split not in SPLIT_VALUES:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        root = Path(root)
        table = XrayTable.read(layout)
        classes = table.classes()
        labels = table.labels(classes)
        keep = split_rows(table, labels, val_fraction, test_fraction, seed)[split]
        keep &= table.view_mask()
        if not keep.any():
            views = f" with data.views={list(layout.views)}" if layout.views is not None else ""
            raise DatasetError(f"label table {layout.csv} has no {split} rows{views}")

        paths, rows, missing = select_on_disk(
            table.images,
            range(len(table.images)),
            keep,
            # an absolute image path ignores root
            lambda image: image if (root / image).is_file() else None,
        )
        report_missing(layout.csv, missing, len(paths), split, root, XRAY_CSV_LAYOUT)
        super().__init__(root, paths, labels[rows], classes, transform=transform)  # type: ignore[call-arg]
        self.split = split
        self.layout = layout
        self.missing_images = len(missing)
        # One numpy array rather than a list of str, for the fork-friendliness of the paths.
        self._patients = (
            None if table.patients is None else np.asarray([table.patients[i] for i in rows])
        )

    @property
    def patient_ids(self) -> list[str] | None:
        """The patient id of each sample, in sample order; None without a patient column."""
        return None if self._patients is None else self._patients.tolist()


class XrayCsvDataset(_XrayCsvReader, LabeledImageDataset):
    """Multi-class (binary with two classes) X-rays from a CSV: ``{"image", "label": int}``.

    Args:
        root: the folder relative image paths (and a relative ``layout.csv``) are under.
        layout: which file and columns (:class:`XrayCsvLayout`).
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: applied to each uint8 image.
        val_fraction: fraction of all patients carved out as val (from train, with a split
            column that has no val rows).
        test_fraction: fraction of the patients carved out as test without a split column (0:
            no test split).
        seed: seed of the carve-outs.

    Attributes:
        patient_ids: one patient id per sample, None without a patient column.
        missing_images: rows of this split whose image is not on disk (skipped, warned once).

    Raises:
        DatasetError: a missing CSV or column, a bad label, view or split cell, a view filter no
            row matches, or a split with no image on disk.
    """


class XrayCsvMultiLabelDataset(_XrayCsvReader, MultiLabelImageDataset):
    """Multi-label X-rays from a CSV: ``{"image", "label": float32 (K,)}``, NaN for a blank.

    Arguments, attributes and errors as :class:`XrayCsvDataset`.
    """


def xray_csv_dataset(
    root: str | os.PathLike[str],
    layout: XrayCsvLayout,
    split: str = "train",
    transform: Transform | None = None,
    **carve: Any,
) -> LabeledImageDataset:
    """The dataset class the layout calls for (multi-label or multi-class), for one split."""
    cls = XrayCsvMultiLabelDataset if layout.is_multilabel else XrayCsvDataset
    return cls(root, layout, split, transform, **carve)


# --- The family: data=xray_csv ----------------------------------------------------------------------

XRAY_CSV_OPTIONS: dict[str, Any] = {
    "csv": None,
    "image_column": "path",
    "label_columns": ["label"],
    "classes": None,
    "multilabel": None,
    "patient_column": None,
    "view_column": None,
    "views": None,
    "split_column": None,
    "val_fraction": None,  # None: DEFAULT_VAL_FRACTION
    "test_fraction": None,  # None or 0: no test split (unless a split column has one)
    "split_seed": 0,
}


def _xray_csv_classes(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    table = XrayTable.read(layout_from_spec(spec))
    names = table.classes()
    # Every cell checked now, while the model is built: a bad one stops the run before training.
    table.labels(names)
    return names, list(names)


def _xray_csv_label_type(spec: DatasetSpec) -> LabelType:
    return "multilabel" if layout_from_spec(spec).is_multilabel else "multiclass"


def _carve_options(spec: DatasetSpec) -> dict[str, Any]:
    val = spec.option("val_fraction")
    return {
        "val_fraction": DEFAULT_VAL_FRACTION if val is None else float(val),
        "test_fraction": float(spec.option("test_fraction") or 0.0),
        "seed": int(spec.option("split_seed")),
    }


def _xray_csv_build(
    spec: DatasetSpec, kind: SplitKind, transform: Transform
) -> LabeledImageDataset:
    return xray_csv_dataset(
        spec.root, layout_from_spec(spec), kind, transform, **_carve_options(spec)
    )


def _xray_csv_has_split(spec: DatasetSpec, folder: str) -> bool:
    if folder != spec.test_split:
        return True  # train and val always come from the table
    layout = layout_from_spec(spec)
    if layout.split_column is None:
        return bool(spec.option("test_fraction"))
    table = XrayTable.read(layout)
    return table.splits is not None and "test" in table.splits


XRAY_CSV = DatasetFamily(
    _xray_csv_classes,
    _xray_csv_build,
    _xray_csv_has_split,
    XRAY_CSV_LAYOUT,
    label_type=_xray_csv_label_type,
    options=XRAY_CSV_OPTIONS,
    wide_gray=XrayCsvDataset.wide_gray,
)
