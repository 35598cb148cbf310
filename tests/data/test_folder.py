"""ImageFolder: layout rules, every file kind through the dataset, unreadable files skipped."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mnv3.data import (
    DatasetError,
    ImageFolderDataset,
    UnreadableImageWarning,
    collate_classification,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

RED, BLUE = (220, 20, 20), (20, 20, 220)


def test_mixed_file_kinds_load_as_rgb_with_sorted_classes(tmp_path: Path, write_image) -> None:
    train = tmp_path / "train"
    write_image(train / "b_red" / "gray.jpg", 120, mode="L")
    write_image(train / "b_red" / "cmyk.JPG", RED, mode="CMYK", quality=95)
    write_image(train / "b_red" / "nested" / "rgba.PNG", (*RED, 77))
    write_image(train / "a_blue" / "g16.png", 40000, mode="I;16")
    write_image(train / "a_blue" / "plain.jpeg", BLUE)
    (train / "a_blue" / "notes.txt").write_text("not an image")
    write_image(train / "a_blue" / ".hidden.jpg", BLUE)  # e.g. macOS AppleDouble: ignored
    (train / ".cache").mkdir()  # hidden folder: not a class

    dataset = ImageFolderDataset(tmp_path, "train")
    assert dataset.classes == ["a_blue", "b_red"]
    assert len(dataset) == 5
    assert dataset.targets == [0, 0, 1, 1, 1]
    for i, (path, label) in enumerate(dataset.samples):
        sample = dataset[i]
        assert sample is not None and sample["label"] == label
        image = sample["image"]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 20), path
        assert Path(path).is_file()
    pixels = {
        Path(p).name: dataset[i]["image"][:, 8, 10].tolist()
        for i, (p, _) in enumerate(dataset.samples)
    }
    assert pixels["rgba.PNG"] == list(RED)
    assert all(abs(a - b) <= 4 for a, b in zip(pixels["cmyk.JPG"], RED, strict=True))
    assert all(abs(v - 120) <= 2 for v in pixels["gray.jpg"])
    assert all(abs(v - 156) <= 1 for v in pixels["g16.png"])


def test_unreadable_files_warn_once_and_are_counted_as_skipped(
    tmp_path: Path, write_image, write_truncated
) -> None:
    write_image(tmp_path / "train" / "x" / "good.png", RED)
    write_truncated(tmp_path / "train" / "x" / "truncated.jpg")
    (tmp_path / "train" / "x" / "zero.jpg").write_bytes(b"")
    dataset = ImageFolderDataset(tmp_path, "train")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate_classification)))
    unreadable = [w for w in caught if issubclass(w.category, UnreadableImageWarning)]
    assert len(unreadable) == 2
    assert "truncated.jpg" in str(unreadable[0].message)
    assert "zero.jpg" in str(unreadable[1].message)
    assert batch["skipped"] == 2
    assert batch["image"].shape == (1, 3, 16, 20)
    assert batch["label"].tolist() == [0]


def test_eval_split_uses_the_training_classes(tmp_path: Path, write_image) -> None:
    for name in ("ant", "bee", "cat"):
        write_image(tmp_path / "train" / name / "0.png", RED)
    write_image(tmp_path / "val" / "cat" / "0.png", RED)  # ant and bee absent from val
    val = ImageFolderDataset(tmp_path, "val", classes=["ant", "bee", "cat"])
    assert val.num_classes == 3 and val.targets == [2]

    write_image(tmp_path / "val" / "dog" / "0.png", RED)
    with pytest.raises(DatasetError, match="dog"):
        ImageFolderDataset(tmp_path, "val", classes=["ant", "bee", "cat"])


def test_layout_errors_name_the_path_and_the_layout(tmp_path: Path, write_image) -> None:
    with pytest.raises(DatasetError) as missing:
        ImageFolderDataset(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere" / "train") in str(missing.value)
    assert "<class>" in str(missing.value)

    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    write_image(tmp_path / "train" / "full_class" / "0.png", RED)
    with pytest.raises(DatasetError, match="empty_class contains no images"):
        ImageFolderDataset(tmp_path, "train")
