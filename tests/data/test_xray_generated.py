"""The generated chest films of the quick X-ray demo (mnv3.data.xray_generated).

Checked as a user's export would be: 12-bit values in 16-bit PNGs read by their range (not the
top byte), patients that never straddle a split, the manifest's counts, and a pneumonia film
that differs from its normal twin of the same seed only by an added opacity.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnv3.data import DataModule
from mnv3.data.chest_xray import PneumoniaDataset
from mnv3.data.chest_xray_labels import pneumonia_patient
from mnv3.data.errors import DatasetError
from mnv3.data.io import load_rgb
from mnv3.data.xray_generated import (
    FULL_SCALE,
    draw_chest,
    generate_xrays,
    patient_anatomy,
    xray_manifest,
)

PARAMS = {"image_size": 32, "train_patients": 20, "val_patients": 4, "test_patients": 10}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_xrays(tmp_path_factory.mktemp("xray") / "films", **PARAMS)


def test_films_are_12_bit_values_in_16_bit_pngs_read_by_their_range(root: Path) -> None:
    files = sorted(root.rglob("*.png"))
    raw = np.array(Image.open(files[0]))
    assert raw.dtype == np.uint16 and raw.shape == (32, 32)
    assert raw.max() <= FULL_SCALE and raw.max() > 255  # 12-bit values: the top byte is 0-15
    # The reader maps the image's own range onto 0-255; the top byte would give at most 15.
    image = load_rgb(files[0], wide=PneumoniaDataset.wide_gray)
    expected = np.rint(raw.astype(np.float64) * 255 / FULL_SCALE).astype(np.uint8)
    assert image.dtype == torch.uint8 and np.array_equal(image[0].numpy(), expected)
    assert int(image.max()) > 128  # by the top byte the brightest pixel would be at most 15
    assert int(load_rgb(files[0], wide="top_byte").max()) <= FULL_SCALE >> 8


def test_counts_patients_and_splits_follow_the_manifest(root: Path) -> None:
    patients: dict[str, set[str]] = {}
    for split, count in xray_manifest(**PARAMS)["patients"].items():
        names = [p.name for p in (root / split).rglob("*.png")]
        ids = {pneumonia_patient(name) for name in names}
        assert len(ids) == count and all(re.fullmatch(r"person\d+", i) for i in ids)
        sick = {pneumonia_patient(p.name) for p in (root / split / "PNEUMONIA").glob("*.png")}
        assert len(sick) == round(count * 0.6)
        patients[split] = ids
    assert not patients["train"] & patients["test"] and not patients["train"] & patients["val"]
    # The carve-out of the demo keeps each patient's films on one side.
    train = PneumoniaDataset(root, "train", val_fraction=0.25)
    val = PneumoniaDataset(root, "val", val_fraction=0.25)
    assert set(train.patient_ids or []).isdisjoint(val.patient_ids or [])
    assert len(train) + len(val) == len(list((root / "train").rglob("*.png")))


def test_a_pneumonia_film_is_its_normal_twin_plus_an_opacity() -> None:
    # Same patient, same seed: the films differ only by the consolidation, which adds (never
    # removes) brightness, at least 250 x exposure at its centre (minus clipping at 4095).
    for seed in range(20):
        anatomy = patient_anatomy(64, np.random.default_rng(seed))
        sick = draw_chest(anatomy, True, 64, np.random.default_rng([seed, 1]))
        normal = draw_chest(anatomy, False, 64, np.random.default_rng([seed, 1]))
        difference = sick - normal
        assert difference.min() >= 0.0
        assert difference.max() > 250 * 0.85 * 0.95 * 0.9


def test_data_module_reads_one_gray_channel_and_regenerates_nothing(root: Path) -> None:
    dm = DataModule(
        str(root),
        dataset="xray_generated",
        generate=PARAMS,
        batch_size=4,
        num_workers=0,
        image_size=32,
        channels=1,
        val_fraction=0.25,
    )
    assert dm.class_names == ["NORMAL", "PNEUMONIA"] and dm.has_test
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32)
    with pytest.raises(DatasetError, match="different parameters"):
        generate_xrays(root, **(PARAMS | {"seed": 1}))
