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


# -- symbolic links (issue 7) --------------------------------------------------------------------


def _scan_with_warnings(root: Path) -> tuple[ImageFolderDataset, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ImageFolderDataset(root, "train")
    return dataset, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("loops", [1, 2])
def test_links_back_into_a_class_folder_are_followed_once(
    tmp_path: Path, write_image, loops: int
) -> None:
    # One self-loop made the scan count the class 41 times (the 40-link limit); two hung it.
    cat = tmp_path / "train" / "cat"
    write_image(cat / "0.png", RED)
    write_image(cat / "sub" / "1.png", RED)
    write_image(tmp_path / "train" / "dog" / "0.png", BLUE)
    (cat / "loop").symlink_to(cat, target_is_directory=True)
    if loops == 2:
        (cat / "sub" / "back").symlink_to(cat, target_is_directory=True)

    dataset, messages = _scan_with_warnings(tmp_path)
    assert dataset.classes == ["cat", "dog"]
    assert sorted(Path(p).relative_to(tmp_path).as_posix() for p, _ in dataset.samples) == [
        "train/cat/0.png",
        "train/cat/sub/1.png",
        "train/dog/0.png",
    ]
    assert dataset.targets == [0, 0, 1]
    assert len(messages) == 1 and f"{loops} linked folder(s)" in messages[0]
    assert str(cat / "loop") in messages[0]


def test_a_linked_folder_outside_the_tree_is_read_and_a_class_link_counts_once_per_class(
    tmp_path: Path, write_image
) -> None:
    store = tmp_path / "store"
    write_image(store / "a.png", RED)
    write_image(store / "b.png", RED)
    train = tmp_path / "train"
    write_image(train / "cat" / "own.png", RED)
    (train / "cat" / "shared").symlink_to(store, target_is_directory=True)
    (train / "cat" / "shared_again").symlink_to(store, target_is_directory=True)
    (train / "kitten").symlink_to(train / "cat", target_is_directory=True)

    dataset, messages = _scan_with_warnings(tmp_path)
    assert dataset.classes == ["cat", "kitten"]
    names = [Path(p).relative_to(train).as_posix() for p, _ in dataset.samples]
    # shared_again reaches the same real folder as shared: listed once, with one warning.
    assert names == [
        "cat/own.png",
        "cat/shared/a.png",
        "cat/shared/b.png",
        "kitten/own.png",
        "kitten/shared/a.png",
        "kitten/shared/b.png",
    ]
    assert dataset.targets == [0, 0, 0, 1, 1, 1]
    assert len(messages) == 2 and all("shared_again" in m for m in messages)


def test_a_dangling_class_folder_link_warns_and_the_class_is_left_out(
    tmp_path: Path, write_image
) -> None:
    write_image(tmp_path / "train" / "cat" / "0.png", RED)
    (tmp_path / "train" / "dog").symlink_to(tmp_path / "moved_away", target_is_directory=True)

    dataset, messages = _scan_with_warnings(tmp_path)
    assert dataset.classes == ["cat"] and len(dataset) == 1
    assert len(messages) == 1
    assert str(tmp_path / "train" / "dog") in messages[0] and "does not exist" in messages[0]
    assert "'dog' is left out" in messages[0]
