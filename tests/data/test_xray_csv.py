"""``data=xray_csv``: your own X-rays listed in one CSV, written here as a hospital would export it
(image paths relative to the root and absolute, class names or 1 / 0 / blank columns, patient,
view and split columns), with real PNG files on disk."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from helpers import QUIET, compose_train
from mnv3.data import DataModule, DatasetError, MissingImageWarning
from mnv3.data.xray_csv import XrayCsvDataset, XrayCsvLayout, XrayCsvMultiLabelDataset

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

Row = dict[str, str]
CLASSES = ("NORMAL", "PNEUMONIA")
FINDINGS = ("Edema", "Effusion")


def write_table(root: Path, rows: Sequence[Row], write_image: Callable[..., Path]) -> Path:
    """``root/labels.csv`` with the rows' columns (first row's keys), and a gray PNG per path."""
    columns = list(rows[0])
    lines = [",".join(columns)]
    for i, row in enumerate(rows):
        lines.append(",".join(row[c] for c in columns))
        image = Path(row["path"]) if Path(row["path"]).is_absolute() else root / row["path"]
        write_image(image, 40 + 5 * (i % 40), mode="L")
    table = root / "labels.csv"
    table.write_text("\r\n".join(lines) + "\r\n")  # Excel's CRLF
    return table


def hospital_rows(patients: int = 12, per_patient: int = 3) -> list[Row]:
    """Binary labels, three images a patient (PA, AP, LL); half the patients have pneumonia."""
    rows = []
    for p in range(patients):
        for k, view in enumerate(("PA", "AP", "LL")[:per_patient]):
            rows.append(
                {
                    "path": f"images/p{p:03d}/s{k}.png",
                    "label": CLASSES[p % 2],
                    "patient": f"P{p:03d}",
                    "view": view,
                }
            )
    return rows


def _dataset(root: Path, split: str = "train", **layout: object):
    """The dataset of a split, with the layout's columns and the carve-out's keyword arguments."""
    carve = {k: layout.pop(k) for k in ("val_fraction", "test_fraction", "seed") if k in layout}
    spec = XrayCsvLayout(csv=root / "labels.csv", **layout)  # type: ignore[arg-type]
    cls = XrayCsvMultiLabelDataset if spec.is_multilabel else XrayCsvDataset
    return cls(root, spec, split, **carve)  # type: ignore[arg-type]


def _module(root: Path, **options: object) -> DataModule:
    base = {"batch_size": 4, "num_workers": 0, "image_size": 24, "drop_last": False}
    return DataModule(str(root), dataset="xray_csv", **(base | options))


def _one_sentence(error: pytest.ExceptionInfo[DatasetError], *parts: str) -> str:
    message = str(error.value)
    assert "\n" not in message and message.count(". ") == 0, message
    for part in parts:
        assert part in message, message
    return message


# --- Label kinds ----------------------------------------------------------------------------------


def test_binary_class_names_train_val_and_patient_ids(tmp_path: Path, write_image) -> None:
    write_table(tmp_path, hospital_rows(), write_image)
    dm = _module(tmp_path, label_columns=["label"], patient_column="patient", val_fraction=0.25)
    assert dm.label_type == "multiclass" and dm.class_names == list(CLASSES)
    assert not dm.has_test  # no split column, no test_fraction
    train, val = dm.get_dataset("train"), dm.get_dataset("val")
    assert isinstance(train, XrayCsvDataset) and train.wide_gray == "range"
    assert len(train) + len(val) == 36 and len(val) == 4 * 3  # round(1.5) = 2 of 6 patients a class
    for dataset in (train, val):
        ids = dataset.patient_ids
        assert ids is not None and len(ids) == len(dataset)
        for (path, label), patient in zip(dataset.samples, ids, strict=True):
            assert f"/{patient.lower()}/" in path  # sample order matches
            assert label == int(patient[1:]) % 2  # PNEUMONIA = 1 for odd patients
    sample = train[0]
    assert sample["image"].shape == (3, 24, 24) and isinstance(sample["label"], int)
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].dtype.is_floating_point is False and batch["image"].shape[1:] == (
        3,
        24,
        24,
    )


def test_multiclass_order_from_data_classes_or_sorted_values(tmp_path: Path, write_image) -> None:
    rows = hospital_rows(patients=9, per_patient=1)
    for i, row in enumerate(rows):
        row["label"] = ("10", "2", "0")[i % 3]  # numeric names sort as numbers
    write_table(tmp_path, rows, write_image)
    assert _module(tmp_path).class_names == ["0", "2", "10"]
    named = _module(tmp_path, classes=["10", "0", "2"])
    assert named.class_names == ["10", "0", "2"]
    dataset = _dataset(tmp_path, classes=("10", "0", "2"), val_fraction=0.3)
    wanted = {str(tmp_path / r["path"]): ["10", "0", "2"].index(r["label"]) for r in rows}
    assert len(dataset) == 6 and all(wanted[path] == label for path, label in dataset.samples)
    with pytest.raises(DatasetError) as error:
        _dataset(tmp_path, classes=("0", "2"))
    _one_sentence(error, "labels.csv line 2", "'label'", "'10'")


def test_multilabel_blanks_are_unknown(tmp_path: Path, write_image) -> None:
    rows = []
    for p in range(10):
        cells = {"Edema": ("1", "0", "")[p % 3], "Effusion": ("0", "1.0", "1")[p % 3]}
        rows.append({"path": f"img/{p}.png", "patient": f"P{p}", **cells})
    write_table(tmp_path, rows, write_image)
    dm = _module(tmp_path, label_columns=list(FINDINGS), patient_column="patient")
    assert dm.label_type == "multilabel" and dm.class_names == list(FINDINGS)
    train, val = dm.get_dataset("train"), dm.get_dataset("val")
    assert isinstance(train, XrayCsvMultiLabelDataset) and len(train) + len(val) == 10
    by_path = dict(train.samples + val.samples)
    assert by_path[str(tmp_path / "img/0.png")] == [1.0, 0.0]
    assert by_path[str(tmp_path / "img/1.png")] == [0.0, 1.0]
    edema, effusion = by_path[str(tmp_path / "img/2.png")]
    assert math.isnan(edema) and effusion == 1.0
    labels = next(iter(dm.train_dataloader()))["label"]
    assert labels.shape[1] == 2 and labels.dtype.is_floating_point
    unknown = int(np.isnan(train.label_matrix).sum())
    assert unknown == sum(math.isnan(row[1][0]) for row in train.samples) > 0
    # One 1 / 0 / blank column read as multi-label: a single finding with unknowns.
    single = _module(tmp_path, label_columns=["Edema"], multilabel=True)
    assert single.label_type == "multilabel" and single.num_classes == 1
    assert single.get_dataset("train").patient_ids is None  # no patient column


# --- Splits by patient ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_a_patient_is_never_on_two_sides(tmp_path: Path, write_image, seed: int) -> None:
    write_table(tmp_path, hospital_rows(patients=20), write_image)
    carve = {"val_fraction": 0.2, "test_fraction": 0.2, "seed": seed, "patient_column": "patient"}
    splits = {s: _dataset(tmp_path, s, **carve) for s in ("train", "val", "test")}
    sides = {s: set(d.patient_ids) for s, d in splits.items()}
    assert sum(len(d) for d in splits.values()) == 60
    assert not sides["train"] & sides["val"] and not sides["train"] & sides["test"]
    assert not sides["val"] & sides["test"]
    assert len(sides["val"]) == len(sides["test"]) == 4  # 20 % of all 20 patients each
    for split in ("val", "test"):  # stratified: both classes on the held-out sides
        assert set(splits[split].targets) == {0, 1}
    # Same seed, same patients; another seed, other patients (over the five seeds).
    again = _dataset(tmp_path, "val", **carve)
    assert set(again.patient_ids) == sides["val"]


def test_a_patient_with_two_classes_stays_on_one_side(tmp_path: Path, write_image) -> None:
    rows = hospital_rows(patients=10)
    for row in rows:
        if row["path"].endswith("s2.png"):
            row["label"] = CLASSES[1]  # every patient's third study shows pneumonia
    write_table(tmp_path, rows, write_image)
    for seed in range(4):
        val = _dataset(tmp_path, "val", patient_column="patient", val_fraction=0.3, seed=seed)
        train = _dataset(tmp_path, "train", patient_column="patient", val_fraction=0.3, seed=seed)
        assert not set(val.patient_ids) & set(train.patient_ids)


def test_split_column_is_followed_and_val_carved_from_train(tmp_path: Path, write_image) -> None:
    rows = hospital_rows(patients=12, per_patient=1)
    for i, row in enumerate(rows):
        row["split"] = ("train", "TRAIN", "Test")[i % 3] if i < 9 else "valid"
    write_table(tmp_path, rows, write_image)
    dm = _module(tmp_path, split_column="split", patient_column="patient")
    assert dm.has_test
    assert [len(dm.get_dataset(s)) for s in ("train", "val", "test")] == [6, 3, 3]
    # Without val rows, val is carved from the train rows by patient.
    for row in rows:
        row["split"] = "test" if row["split"] == "Test" else "train"
    write_table(tmp_path, rows, write_image)
    kwargs = {"split_column": "split", "patient_column": "patient", "val_fraction": 0.25}
    train, val = _dataset(tmp_path, "train", **kwargs), _dataset(tmp_path, "val", **kwargs)
    assert len(train) + len(val) == 9 and len(val) == 2
    assert len(_dataset(tmp_path, "test", **kwargs)) == 3
    # A patient the column puts in train and test is warned about.
    rows[2]["patient"] = rows[0]["patient"]
    write_table(tmp_path, rows, write_image)
    with pytest.warns(UserWarning, match="1 patient.* in both (train|val) and test"):
        _dataset(tmp_path, "test", **kwargs)


# --- Views ----------------------------------------------------------------------------------------


def test_view_filter_keeps_frontal_or_lateral_and_moves_no_patient(
    tmp_path: Path, write_image
) -> None:
    write_table(tmp_path, hospital_rows(), write_image)
    common = {"patient_column": "patient", "view_column": "view", "val_fraction": 0.25}
    every = _dataset(tmp_path, "val", **common)
    frontal = _dataset(tmp_path, "val", views=("PA", "ap"), **common)
    lateral = _dataset(tmp_path, "val", views=("lateral",), **common)  # matches LL
    assert len(every) == 12 and len(frontal) == 8 and len(lateral) == 4  # 2 of 6 a class
    assert set(frontal.patient_ids) == set(lateral.patient_ids) == set(every.patient_ids)
    assert all(path.endswith("s2.png") for path, _ in lateral.samples)
    dm = _module(tmp_path, **common, views=["frontal"])
    assert len(dm.get_dataset("train")) == 16  # 8 patients' PA and AP


def test_view_filter_errors_name_file_line_and_column(tmp_path: Path, write_image) -> None:
    rows = hospital_rows(patients=4)
    table = write_table(tmp_path, rows, write_image)
    with pytest.raises(DatasetError) as error:
        _dataset(tmp_path, view_column="view", views=("PS",))
    _one_sentence(error, str(table), "'PS'", "column 'view'", "AP, LL, PA")
    rows[4]["view"] = ""
    write_table(tmp_path, rows, write_image)
    with pytest.raises(DatasetError) as error:
        _dataset(tmp_path, view_column="view", views=("PA",))
    _one_sentence(error, str(table), "line 6", "column 'view'")
    with pytest.raises(DatasetError) as error:
        _dataset(tmp_path, views=("PA",))
    _one_sentence(error, "data.view_column")


# --- Bad input: one sentence naming the file, line and column -------------------------------------


def test_missing_column_and_bad_cells_are_one_sentence(tmp_path: Path, write_image) -> None:
    rows = [
        {"path": f"img/{p}.png", "patient": f"P{p}", "Edema": "1", "split": "train"}
        for p in range(6)
    ]
    table = write_table(tmp_path, rows, write_image)
    with pytest.raises(DatasetError) as error:
        _dataset(tmp_path, label_columns=("Edema", "Effusion"))
    _one_sentence(error, str(table), "'Effusion'")
    with pytest.raises(DatasetError) as error:
        _dataset(tmp_path, patient_column="patient_id")
    _one_sentence(error, str(table), "'patient_id'")

    rows[3]["Edema"] = "-1"
    rows[4]["split"] = "holdout"
    write_table(tmp_path, rows, write_image)
    with pytest.raises(DatasetError) as error:
        _dataset(tmp_path, label_columns=("Edema",), multilabel=True)
    _one_sentence(error, str(table), "line 5", "'-1'", "column 'Edema'")
    with pytest.raises(DatasetError) as error:
        _dataset(tmp_path, label_columns=("Edema",), split_column="split")
    _one_sentence(error, str(table), "line 6", "'holdout'", "column 'split'")

    rows[3]["Edema"] = ""
    rows[4]["split"] = "train"
    write_table(tmp_path, rows, write_image)
    with pytest.raises(DatasetError) as error:  # a multi-class row without a class
        _dataset(tmp_path, label_columns=("Edema",))
    _one_sentence(error, str(table), "line 5", "column 'Edema'")

    with pytest.raises(DatasetError) as error:
        _dataset(tmp_path / "elsewhere")
    _one_sentence(error, "labels.csv does not exist")


def test_missing_images_are_counted_and_skipped(tmp_path: Path, write_image) -> None:
    rows = hospital_rows(patients=8, per_patient=1)
    for i, row in enumerate(rows):
        row["split"] = "train" if i < 6 else "val"
    write_table(tmp_path, rows, write_image)
    (tmp_path / rows[0]["path"]).unlink()
    (tmp_path / rows[1]["path"]).unlink()
    with pytest.warns(MissingImageWarning, match="2 of 6 train rows"):
        dataset = _dataset(tmp_path, "train", split_column="split")
    assert dataset.missing_images == 2 and len(dataset) == 4
    for row in rows:
        (tmp_path / row["path"]).unlink(missing_ok=True)
    with pytest.raises(DatasetError) as error:
        _dataset(tmp_path, "train", split_column="split")
    _one_sentence(error, "labels.csv", "no image that exists")


def test_absolute_paths_and_a_csv_outside_root(tmp_path: Path, write_image) -> None:
    store = tmp_path / "pacs"
    rows = hospital_rows(patients=4, per_patient=1)
    for row in rows:
        row["path"] = str(store / row["path"])
    (tmp_path / "export").mkdir()
    write_table(tmp_path / "export", rows, write_image)
    dm = _module(tmp_path / "data", csv=str(tmp_path / "export" / "labels.csv"))
    assert len(dm.get_dataset("train")) + len(dm.get_dataset("val")) == 4


def test_sixteen_bit_xray_is_read_by_its_bits(tmp_path: Path, write_image) -> None:
    rows = hospital_rows(patients=4, per_patient=1)
    write_table(tmp_path, rows, write_image)
    for row in rows:  # 12-bit values in 16-bit PNGs, as detectors export them
        write_image(tmp_path / row["path"], 4000, mode="I;16")
    image = XrayCsvDataset(tmp_path, XrayCsvLayout(csv=tmp_path / "labels.csv"))[0]["image"]
    assert int(image.max()) > 200  # the top byte would read 4000 as 15


def test_option_values_are_checked_before_data_is_read(tmp_path: Path) -> None:
    from mnv3.errors import ConfigError
    from mnv3.validate import check_values

    check_values(compose_train(tmp_path, ["data=xray_csv", "data.views=PA", "data.classes=[0,1]"]))
    for bad in ("data.views=[1]", "data.multilabel=yes", "data.test_fraction=1.0"):
        with pytest.raises(ConfigError, match=re.escape(bad.split("=")[0])):
            check_values(compose_train(tmp_path, ["data=xray_csv", bad]))
    with pytest.raises(DatasetError, match="one or more distinct columns"):
        _ = _module(tmp_path, label_columns=[]).label_type


# --- Through the real entry point -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["binary", "multilabel"])
def test_one_training_step_through_train(tmp_path: Path, write_image, kind: str) -> None:
    from mnv3.train import train

    root = tmp_path / "hospital"
    rows = hospital_rows(patients=8, per_patient=2)
    labels = "[label]"
    if kind == "multilabel":
        for i, row in enumerate(rows):
            del row["label"]
            row |= {"Edema": ("1", "0", "")[i % 3], "Effusion": ("0", "1", "1")[i % 3]}
        labels = "[Edema,Effusion]"
    write_table(root, rows, write_image)
    overrides = [
        "data=xray_csv",
        f"data.root={root}",
        f"data.label_columns={labels}",
        "data.patient_column=patient",
        "data.view_column=view",
        "data.views=[PA,AP]",
        "data.test_fraction=0.25",
        "data.image_size=32",
        "data.resize_size=32",
        "data.batch_size=4",
        "debug=fast_dev_run",
        "backbone=small",
        *QUIET,
    ]
    cfg = compose_train(tmp_path, overrides)
    train(cfg)
    assert (tmp_path / "run" / "config_resolved.yaml").is_file()


def test_a_bad_cell_is_one_line_before_training_starts(
    tmp_path: Path, write_image, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from mnv3.train import train

    rows = hospital_rows(patients=4, per_patient=1)
    for i, row in enumerate(rows):
        row["label"] = ("1", "0", "maybe", "")[i]
    table = write_table(tmp_path / "hospital", rows, write_image)
    args = ["data=xray_csv", f"data.root={tmp_path / 'hospital'}", "data.multilabel=true"]
    cfg = compose_train(tmp_path, [*args, "debug=fast_dev_run", *QUIET])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # as a user runs it: no traceback asked for
    with pytest.raises(SystemExit) as exit_status:
        train(cfg)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_status.value.code == 1 and len(lines) == 1, lines  # before the Trainer talks
    assert lines[0].startswith("error: label table") and str(table) in lines[0]
    assert "line 4" in lines[0] and "column 'label'" in lines[0] and "'maybe'" in lines[0]
