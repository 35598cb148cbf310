"""Chest X-ray datasets, each written in its publisher's real on-disk format (the Kaggle and NIH
writers are in ``tests/data_writers.py``, shared with the experiment tests; CheXpert's is here).

The fakes keep the traps of the real files: the NIH CSV's split header cells, trailing empty column
and CRLF line ends, 'No Finding' and pipe-separated findings, CheXpert's ``Path`` prefix and its
1.0 / 0.0 / -1.0 / blank labels, Kaggle's nested ``chest_xray/chest_xray`` and ``__MACOSX`` folders,
8-bit gray, 16-bit gray and RGBA files.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch

from data_writers import (
    NORMAL_TRAIN,
    PNEUMONIA_TRAIN,
    write_csv,
    write_kaggle_pneumonia,
    write_nih_chestxray14,
)
from mnv3.data import (
    CHESTXRAY14_FINDINGS,
    CHEXPERT_COMPETITION_LABELS,
    CHEXPERT_OBSERVATIONS,
    ChestXray14Dataset,
    CheXpertDataset,
    DataModule,
    DatasetError,
    MissingImageWarning,
    PneumoniaDataset,
    collate_classification,
    known_labels,
)
from mnv3.data.chest_xray_labels import carve_validation

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

SIZE = (20, 16)


def _module(root: Path, dataset: str, **kwargs) -> DataModule:
    options = {"batch_size": 4, "num_workers": 0, "image_size": 24, "drop_last": False}
    return DataModule(str(root), dataset=dataset, **(options | kwargs))


# --- Kaggle pediatric pneumonia -------------------------------------------------------------------


@pytest.fixture
def kaggle_download(tmp_path: Path) -> Path:
    """Kaggle's archive as extracted: chest_xray/chest_xray/{train,val,test}, __MACOSX debris."""
    return write_kaggle_pneumonia(tmp_path / "download")


def test_pneumonia_end_to_end_from_kaggles_nested_archive(kaggle_download: Path) -> None:
    dm = _module(kaggle_download, "chest_xray_pneumonia")
    assert dm.num_classes == 2 and dm.class_names == ["NORMAL", "PNEUMONIA"]
    assert dm.label_type == "multiclass" and dm.has_test

    train = dm.get_dataset("train")
    assert len(train) == len(NORMAL_TRAIN) + len(PNEUMONIA_TRAIN)  # no debris
    assert sorted(train.targets) == [0] * 5 + [1] * 7
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.int64

    # val_fraction None: the official 16-image val folder (here 2 images), and the test folder.
    assert next(iter(dm.val_dataloader()))["label"].tolist() == [0, 1]
    assert next(iter(dm.test_dataloader()))["label"].tolist() == [0, 1]
    # The root may also be the folder holding train/val/test itself.
    inner = PneumoniaDataset(kaggle_download / "chest_xray" / "chest_xray", "test")
    assert len(inner) == 2 and inner.missing_images == 0


def test_pneumonia_resplit_is_stratified_seeded_and_keeps_patients_together(
    kaggle_download: Path,
) -> None:
    def split(kind: str, seed: int = 0) -> list[str]:
        dataset = PneumoniaDataset(kaggle_download, kind, val_fraction=0.4, seed=seed)
        return [Path(path).name for path, _ in dataset.samples]

    train, val = split("train"), split("val")
    assert sorted(train + val) == sorted(NORMAL_TRAIN + PNEUMONIA_TRAIN)
    assert not set(train) & set(val)
    # Stratified: 40 % of each class's patients (2 of 5 NORMAL, 2 of 5 PNEUMONIA patients).
    assert sum(name in NORMAL_TRAIN for name in val) == 2
    assert len({re.match(r"person\d+", n).group() for n in val if n.startswith("person")}) == 2
    # person1's three images sit on one side.
    person1 = {name for name in PNEUMONIA_TRAIN if name.startswith("person1_")}
    assert person1 <= set(train) or person1 <= set(val)
    assert split("val") == val  # deterministic
    assert {tuple(split("val", seed)) for seed in range(6)} != {tuple(val)}  # seeded

    dm = _module(kaggle_download, "chest_xray_pneumonia", val_fraction=0.4)
    assert sorted(len(dm.get_dataset(k)) for k in ("train", "val")) == sorted(
        [len(train), len(val)]
    )


def test_pneumonia_missing_root_and_class_folder(tmp_path: Path, kaggle_download: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere does not exist; expected Kaggle chest_xray/"):
        PneumoniaDataset(tmp_path / "nowhere", "train")
    pneumonia = kaggle_download / "chest_xray" / "chest_xray" / "test" / "PNEUMONIA"
    (pneumonia / "person1946_bacteria_4874.jpeg").unlink()
    pneumonia.rmdir()
    with pytest.raises(DatasetError, match=r"test/PNEUMONIA does not exist"):
        PneumoniaDataset(kaggle_download, "test")


# --- NIH ChestX-ray14 -----------------------------------------------------------------------------


@pytest.fixture
def nih_root(tmp_path: Path) -> Path:
    """Patients 1-8 in train_val (3 images each), 9-10 in test; official images_00N sub-folders."""
    return write_nih_chestxray14(tmp_path / "chestxray14")


def test_chestxray14_end_to_end(nih_root: Path) -> None:
    dm = _module(nih_root.parent / "not_yet", "chestxray14")
    assert dm.label_type == "multilabel"  # both known before the root is even looked at
    assert dm.class_names == list(CHESTXRAY14_FINDINGS) and dm.num_classes == 14

    dm = _module(nih_root, "chestxray14", val_fraction=0.25)
    assert dm.has_test
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4, 14) and batch["label"].dtype == torch.float32
    test = dm.get_dataset("test")
    assert len(test) == 6 and test.missing_images == 0
    assert sum(len(b["label"]) for b in dm.val_dataloader()) == 6  # 2 of 8 patients x 3


def test_chestxray14_labels_no_finding_and_pipes(nih_root: Path) -> None:
    dataset = ChestXray14Dataset(nih_root, "test")
    by_name = {Path(path).name: labels for path, labels in dataset.samples}
    for name in ("00000009_001.png", "00000010_000.png"):  # quoted and plain pipes
        vector = dict(zip(CHESTXRAY14_FINDINGS, by_name[name], strict=True))
        assert {k for k, v in vector.items() if v} == {"Effusion", "Mass", "Hernia"}
    assert by_name["00000009_000.png"] == [0.0] * 14  # No Finding
    assert by_name["00000009_002.png"] == [0.0] * 12 + [1.0, 0.0]  # Pleural_Thickening
    assert by_name["00000010_002.png"] == [0.0, 1.0] + [0.0] * 12  # Cardiomegaly
    assert Path(dataset.path(0)).parent.parent.name == "images_002"


def test_chestxray14_sixteen_bit_and_rgba_decode_to_replicated_gray(nih_root: Path) -> None:
    dataset = ChestXray14Dataset(nih_root, "train", val_fraction=0.5, seed=3)
    images = {Path(p).name: i for i, (p, _) in enumerate(dataset.samples)}
    for name, value in (("00000001_000.png", 156), ("00000002_000.png", 90)):
        other = ChestXray14Dataset(nih_root, "val", val_fraction=0.5, seed=3)
        source = dataset if name in images else other
        index = [Path(p).name for p, _ in source.samples].index(name)
        image = source[index]["image"]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 20)
        assert abs(int(image[0, 8, 10]) - value) <= 1  # 40000 / 65535 * 255, not clipped to 255
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_chestxray14_patients_are_never_split(nih_root: Path) -> None:
    def patients(split: str, seed: int) -> set[str]:
        dataset = ChestXray14Dataset(nih_root, split, val_fraction=0.3, seed=seed)
        return {Path(path).name[:8] for path, _ in dataset.samples}

    for seed in range(4):
        train, val = patients("train", seed), patients("val", seed)
        assert not train & val and len(train | val) == 8
        assert len(val) == 2  # round(0.3 * 8)
        assert not (train | val) & patients("test", seed)


def test_carve_validation_groups_and_determinism() -> None:
    groups = [f"p{i // 5}" for i in range(500)]  # 100 patients with 5 images each
    is_val = carve_validation(groups, 0.1, seed=7)
    val = {g for g, v in zip(groups, is_val, strict=True) if v}
    train = {g for g, v in zip(groups, is_val, strict=True) if not v}
    assert len(val) == 10 and not val & train and is_val.sum() == 50
    assert (carve_validation(list(reversed(groups)), 0.1, seed=7)[::-1] == is_val).all()
    with pytest.raises(DatasetError, match="val_fraction must be in"):
        carve_validation(groups, 1.0)
    with pytest.raises(DatasetError, match="from the 1 patient"):
        carve_validation(["p1", "p1"], 0.5)


def test_missing_images_are_counted_and_warned_once(nih_root: Path) -> None:
    lost = next(nih_root.glob("images_002/images/00000009_001.png"))
    lost.unlink()
    with pytest.warns(MissingImageWarning) as record:
        dataset = ChestXray14Dataset(nih_root, "test")
    messages = [str(w.message) for w in record if w.category is MissingImageWarning]
    assert len(messages) == 1
    assert "1 of 6 test rows" in messages[0] and "00000009_001.png" in messages[0]
    assert dataset.missing_images == 1 and len(dataset) == 5


def test_csv_without_expected_columns_is_one_sentence(nih_root: Path) -> None:
    table = nih_root / "Data_Entry_2017.csv"
    lines = table.read_bytes().decode().split("\r\n")
    lines[0] = lines[0].replace("Patient ID", "PatientID")
    table.write_bytes("\r\n".join(lines).encode())
    with pytest.raises(DatasetError) as info:
        ChestXray14Dataset(nih_root, "train")
    message = str(info.value)
    assert str(table) in message and "'PatientID'" in message  # the file and what it has
    assert "['Image Index', 'Finding Labels', 'Patient ID']" in message  # what was expected
    assert "\n" not in message and ". " not in message.replace(str(table), "")


def test_chestxray14_errors_name_the_path_and_layout(tmp_path: Path, nih_root: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere does not exist; expected NIH ChestX-ray14"):
        _ = _module(tmp_path / "nowhere", "chestxray14").get_dataset("train")
    (nih_root / "test_list.txt").unlink()
    dm = _module(nih_root, "chestxray14")
    assert not dm.has_test
    table = nih_root / "Data_Entry_2017.csv"
    table.write_bytes(table.read_bytes().replace(b"Cardiomegaly", b"Cardiomegally"))
    with pytest.raises(DatasetError, match=r"line \d+ has finding 'Cardiomegally'"):
        ChestXray14Dataset(nih_root, "train")


# --- CheXpert -------------------------------------------------------------------------------------

CHEXPERT_HEADER = ",".join(
    ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]
)


def _chexpert_row(path: str, view: str, **values: str) -> str:
    """A CSV line; observations are given by keyword (spaces as underscores), the rest blank."""
    cells = [values.get(name.replace(" ", "_"), "") for name in CHEXPERT_OBSERVATIONS]
    ap_pa = "AP" if view == "Frontal" else ""
    return ",".join([path, "Female", "68", view, ap_pa, *cells])


@pytest.fixture
def chexpert_parent(tmp_path: Path, write_image) -> Path:
    """CheXpert-v1.0-small/ under a parent: 6 patients x 2 studies x 2 views; 2 valid images."""
    parent = tmp_path / "data"
    folder = parent / "CheXpert-v1.0-small"
    rows = [CHEXPERT_HEADER]
    for patient in range(1, 7):
        for study in (1, 2):
            for view, file in (("Frontal", "view1_frontal.jpg"), ("Lateral", "view2_lateral.jpg")):
                rel = f"train/patient{patient:05d}/study{study}/{file}"
                write_image(folder / rel, 40 * patient, mode="L")
                # Edema: 1.0, -1.0 (uncertain), 0.0 or blank (not mentioned) by patient.
                edema = ["1.0", "-1.0", "0.0", ""][patient % 4]
                rows.append(
                    _chexpert_row(
                        f"CheXpert-v1.0-small/{rel}",
                        view,
                        Edema=edema,
                        Cardiomegaly="-1.0",
                        Support_Devices="1.0",
                    )
                )
    write_csv(folder / "train.csv", rows, newline="\n")
    valid = [CHEXPERT_HEADER]
    for patient in (64541, 64542):
        rel = f"valid/patient{patient}/study1/view1_frontal.jpg"
        write_image(folder / rel, (80, 80, 80, 255))  # RGBA
        cells = {name.replace(" ", "_"): "0.0" for name in CHEXPERT_OBSERVATIONS}
        valid.append(_chexpert_row(f"CheXpert-v1.0-small/{rel}", "Frontal", **cells))
    write_csv(folder / "valid.csv", valid, newline="\n")
    return parent


def _all_rows(root: Path, **kwargs) -> dict[str, list[float]]:
    """Path -> labels over train and val together (every train.csv row)."""
    rows: dict[str, list[float]] = {}
    for split in ("train", "val"):
        dataset = CheXpertDataset(root, split, **kwargs)
        rows |= {path: labels for path, labels in dataset.samples}
    return rows


@pytest.mark.parametrize(("policy", "uncertain"), [("ones", 1.0), ("zeros", 0.0), ("ignore", None)])
def test_chexpert_uncertainty_policies(chexpert_parent: Path, policy: str, uncertain) -> None:
    rows = _all_rows(
        chexpert_parent, labels=["Edema", "Cardiomegaly", "Fracture"], uncertain=policy
    )
    assert len(rows) == 24
    for path, (edema, cardiomegaly, fracture) in rows.items():
        patient = int(re.search(r"patient(\d+)", path).group(1))
        expected_edema = {0: 1.0, 1: uncertain, 2: 0.0, 3: 0.0}[patient % 4]  # 3: blank -> 0
        for value, expected in ((edema, expected_edema), (cardiomegaly, uncertain)):
            assert math.isnan(value) if expected is None else value == expected
        assert fracture == 0.0  # blank


def test_chexpert_ignore_policy_gives_nan_and_a_mask(chexpert_parent: Path) -> None:
    dm = _module(
        chexpert_parent, "chexpert", uncertain="ignore", labels=list(CHEXPERT_COMPETITION_LABELS)
    )
    assert dm.num_classes == 5 and dm.class_names == list(CHEXPERT_COMPETITION_LABELS)
    labels = torch.cat([b["label"] for b in dm.train_dataloader()])
    assert labels.dtype == torch.float32 and labels.shape[1] == 5
    mask = known_labels(labels)
    cardiomegaly = CHEXPERT_COMPETITION_LABELS.index("Cardiomegaly")
    assert not mask[:, cardiomegaly].any()  # every Cardiomegaly label was -1.0
    assert mask[:, CHEXPERT_COMPETITION_LABELS.index("Atelectasis")].all()  # blank -> known 0
    assert torch.isnan(labels).sum() == (~mask).sum()


def test_chexpert_end_to_end_with_frontal_only(chexpert_parent: Path) -> None:
    dm = _module(chexpert_parent, "chexpert", frontal_only=True, val_fraction=0.34)
    assert dm.label_type == "multilabel" and dm.num_classes == 14 and dm.has_test
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["label"].shape == (4, 14)
    assert batch["label"].dtype == torch.float32
    train, val = dm.get_dataset("train"), dm.get_dataset("val")
    assert len(train) + len(val) == 12  # the 12 frontal views of 6 patients
    assert all("frontal" in path for path, _ in train.samples + val.samples)
    test = next(iter(dm.test_dataloader()))  # valid.csv, RGBA files
    assert test["label"].shape == (2, 14) and not test["label"].any()


def test_chexpert_patients_never_split_and_frontal_only_moves_none(chexpert_parent: Path) -> None:
    def patients(split: str, **kwargs) -> set[str]:
        dataset = CheXpertDataset(chexpert_parent, split, val_fraction=0.5, seed=1, **kwargs)
        return {re.search(r"patient\d+", p).group() for p, _ in dataset.samples}

    train, val = patients("train"), patients("val")
    assert not train & val and len(train | val) == 6 and len(val) == 3
    assert patients("val", frontal_only=True) == val


def test_chexpert_path_prefix_resolves_from_parent_folder_or_renamed_folder(
    chexpert_parent: Path,
) -> None:
    from_parent = CheXpertDataset(chexpert_parent, "test")
    from_folder = CheXpertDataset(chexpert_parent / "CheXpert-v1.0-small", "test")
    assert from_parent.samples == from_folder.samples
    assert from_parent.path(0).endswith(
        "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"
    )
    renamed = chexpert_parent / "chexpert"
    (chexpert_parent / "CheXpert-v1.0-small").rename(renamed)
    assert len(CheXpertDataset(renamed, "test")) == 2 and CheXpertDataset(renamed, "test")[0]


def test_chexpert_missing_image_and_missing_columns(chexpert_parent: Path) -> None:
    folder = chexpert_parent / "CheXpert-v1.0-small"
    (folder / "valid/patient64542/study1/view1_frontal.jpg").unlink()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset = CheXpertDataset(chexpert_parent, "test")
    missing = [str(w.message) for w in record if w.category is MissingImageWarning]
    assert dataset.missing_images == 1 and len(dataset) == 1
    assert len(missing) == 1 and "1 of 2 test rows" in missing[0] and "patient64542" in missing[0]

    table = folder / "valid.csv"
    table.write_text(table.read_text().replace("Pleural Effusion", "Effusion", 1))
    with pytest.raises(DatasetError) as info:
        CheXpertDataset(chexpert_parent, "test", labels=list(CHEXPERT_COMPETITION_LABELS))
    message = str(info.value)
    assert str(table) in message and "'Effusion'" in message and "'Pleural Effusion'" in message
    assert "\n" not in message


def test_chexpert_bad_options_and_values(chexpert_parent: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="'Lung Nodule'"):
        _ = _module(chexpert_parent, "chexpert", labels=["Edema", "Lung Nodule"]).num_classes
    with pytest.raises(DatasetError, match="policy 'maybe'"):
        CheXpertDataset(chexpert_parent, "train", uncertain="maybe")
    with pytest.raises(
        DatasetError, match=r"nowhere does not exist; expected CheXpert-v1.0-small/"
    ):
        CheXpertDataset(tmp_path / "nowhere", "train")
    table = chexpert_parent / "CheXpert-v1.0-small" / "valid.csv"
    table.write_text(table.read_text().replace(",0.0", ",2.0", 1))
    with pytest.raises(DatasetError, match=r"line 2 has '2.0' in column 'No Finding'"):
        CheXpertDataset(chexpert_parent, "test")


# --- Shared pieces --------------------------------------------------------------------------------


def test_collate_stacks_label_vectors() -> None:
    vector = torch.tensor([1.0, float("nan"), 0.0])
    sample = {"image": torch.zeros(3, 4, 4), "label": vector}
    batch = collate_classification([sample, None, sample])
    assert batch["label"].shape == (2, 3) and batch["label"].dtype == torch.float32
    assert batch["skipped"] == 1 and known_labels(batch["label"]).sum() == 4


def test_data_configs_build_these_modules(tmp_path: Path, nih_root: Path) -> None:
    from helpers import compose_train
    from mnv3.cli import build_datamodule

    expected = {"chest_xray_pneumonia": 2, "chestxray14": 14, "chexpert": 14}
    for name, num_classes in expected.items():
        cfg = compose_train(tmp_path, [f"data={name}"], data_dir=nih_root.parent)
        dm = build_datamodule(cfg.data)
        assert dm.hparams["dataset"] == name and dm.num_classes == num_classes
        assert dm.label_type == ("multiclass" if num_classes == 2 else "multilabel")
    assert build_datamodule(cfg.data).spec.option("uncertain") == "ones"


def test_patient_ids_follow_sample_order(
    kaggle_download: Path, nih_root: Path, chexpert_parent: Path
) -> None:
    # The contract of every X-ray dataset: one patient id per sample, in sample order (the
    # patient-level bootstrap of mnv3.tasks.xray_metrics resamples them).
    pneumonia = PneumoniaDataset(kaggle_download, "train")
    assert len(pneumonia.patient_ids) == len(pneumonia)
    names = [Path(path).name for path, _ in pneumonia.samples]
    persons = [n.split("_")[0] for n in names if n.startswith("person")]
    assert [p for p in pneumonia.patient_ids if p.startswith("person")] == persons
    assert len(set(pneumonia.patient_ids)) == len(set(persons)) + len(names) - len(persons)
    nih = ChestXray14Dataset(nih_root, "val", val_fraction=0.3, seed=0)
    assert [int(p) for p in nih.patient_ids] == [int(Path(p).name[:8]) for p, _ in nih.samples]
    chexpert = CheXpertDataset(chexpert_parent, "train", val_fraction=0.5, seed=1)
    found = [re.search(r"patient\d+", p).group() for p, _ in chexpert.samples]
    assert chexpert.patient_ids == found
