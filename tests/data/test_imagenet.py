"""ImageNet layouts: the raw flat validation folder with a label file, class index files."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_writers import IMAGENET_NAMES as NAMES
from data_writers import IMAGENET_WNIDS as WNIDS
from data_writers import imagenet_val_name as _val_name
from data_writers import write_tiny_imagenet
from mnv3.data import DatasetError, imagenet_classes, imagenet_split

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


@pytest.fixture
def imagenet_root(tmp_path: Path) -> Path:
    """Three classes, two training images each, a flat val of 4 images with a CRLF label file."""
    return write_tiny_imagenet(tmp_path / "imagenet")


def test_flat_val_with_crlf_label_file(imagenet_root: Path) -> None:
    val = imagenet_split(imagenet_root, "val")
    assert val.classes == WNIDS
    assert val.class_names == NAMES
    assert val.targets == [2, 0, 1, 2]
    assert [Path(p).name for p, _ in val.samples] == [_val_name(i) for i in range(1, 5)]
    sample = val[0]
    assert sample is not None and sample["label"] == 2
    assert abs(int(sample["image"][0, 5, 5]) - 160) <= 4  # the red level written for label 2


def test_train_is_an_image_folder_in_sorted_wnid_order(imagenet_root: Path) -> None:
    train = imagenet_split(imagenet_root, "train")
    assert train.classes == WNIDS and train.class_names == NAMES
    assert train.targets == [0, 0, 1, 1, 2, 2]


def test_synset_mapping_names_and_wnid_fallback(imagenet_root: Path) -> None:
    (imagenet_root / "imagenet_class_index.json").unlink()
    assert imagenet_classes(imagenet_root) == (WNIDS, WNIDS)  # no index: wnids are the names
    mapping = "n01484850 great white shark, white shark\r\nn01440764 tench, Tinca tinca\n"
    mapping += "n01443537 goldfish, Carassius auratus\n"
    (imagenet_root / "LOC_synset_mapping.txt").write_text(mapping)
    assert imagenet_classes(imagenet_root) == (WNIDS, ["tench", "goldfish", "great white shark"])


def test_val_in_class_folders(imagenet_root: Path, write_image) -> None:
    write_image(imagenet_root / "val2" / "n01443537" / "a.JPEG", (1, 2, 3), format="JPEG")
    val = imagenet_split(imagenet_root, "val2")
    assert val.targets == [1] and val.class_names == NAMES


def test_label_file_naming_a_missing_image(imagenet_root: Path) -> None:
    label_file = imagenet_root / "val_labels.txt"
    label_file.write_text(f"{_val_name(1)} 2\n{_val_name(2)} 0\n{_val_name(9)} 1\n")
    with pytest.raises(DatasetError) as info:
        imagenet_split(imagenet_root, "val")
    message = str(info.value)
    assert f"{label_file} line 3" in message and _val_name(9) in message


def test_label_out_of_range_and_custom_label_file(imagenet_root: Path, tmp_path: Path) -> None:
    custom = tmp_path / "labels_elsewhere.txt"
    custom.write_text(f"{_val_name(1)} 3\n")
    with pytest.raises(DatasetError, match=r"labels_elsewhere.txt line 1 has label 3"):
        imagenet_split(imagenet_root, "val", label_file=custom)


def test_training_folders_must_match_the_class_index(imagenet_root: Path) -> None:
    (imagenet_root / "train" / "n01484850").rename(imagenet_root / "train" / "n09999999")
    with pytest.raises(DatasetError, match=r"imagenet_class_index.json.*n01484850.*n09999999"):
        imagenet_split(imagenet_root, "train")


def test_missing_root_names_path_and_layout(tmp_path: Path) -> None:
    root = tmp_path / "data" / "imagenet"
    with pytest.raises(DatasetError) as info:
        imagenet_split(root, "val")
    assert str(root) in str(info.value)
    assert "train/<wnid>/*.JPEG" in str(info.value) and "label file" in str(info.value)
