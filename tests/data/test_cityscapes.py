"""Cityscapes loading, the segmentation presets and collate, and the generated street scenes."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from data_writers import CITYSCAPES_FRAME, street_label, write_tiny_cityscapes
from mnv3.data import DataModule
from mnv3.data.cityscapes import (
    CITYSCAPES_CLASSES,
    CityscapesSegmentation,
    label_ids_to_train_ids,
    segmentation_palette,
    train_ids_to_label_ids,
)
from mnv3.data.collate import collate_segmentation
from mnv3.data.errors import DatasetError, UnreadableImageWarning
from mnv3.data.presets import SegmentationEvalPreset, SegmentationTrainPreset
from mnv3.data.shapes_cityscapes import STREET_CLASSES, generate_shapes_cityscapes

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

# cityscapesScripts helpers/labels.py (FACTS.md): labelId -> trainId of the 19 evaluated classes.
TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10}
TRAIN_ID |= {24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
H, W = CITYSCAPES_FRAME


@pytest.fixture
def tiny_cityscapes(tmp_path: Path) -> Path:
    """Two cities of two train frames each and one val city, 32x64, labelIds only."""
    return write_tiny_cityscapes(tmp_path / "cityscapes")


# --- label tables ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_label_ids_map_to_the_official_train_ids(dtype: type) -> None:
    ids = np.arange(0, 34).astype(dtype)
    expected = np.array([TRAIN_ID.get(i, 255) for i in range(34)], dtype=np.uint8)
    assert np.array_equal(label_ids_to_train_ids(ids), expected)
    # License plate (-1) exists only in a signed map; it is ignored.
    assert label_ids_to_train_ids(np.array([-1, 26], dtype=np.int16)).tolist() == [255, 13]


def test_train_ids_round_trip_to_label_ids() -> None:
    train_ids = np.arange(19)
    label_ids = train_ids_to_label_ids(train_ids)
    assert label_ids.tolist() == sorted(TRAIN_ID, key=TRAIN_ID.get)
    assert np.array_equal(label_ids_to_train_ids(label_ids), train_ids)
    # Ignored pixels are written as 'unlabeled' (0), which the server does not evaluate.
    assert train_ids_to_label_ids(np.array([255])).tolist() == [0]
    # A subset of classes is numbered 0..K-1 in Cityscapes' order and maps back the same way.
    subset = ("car", "road", "sky")
    assert label_ids_to_train_ids(np.array([7, 23, 26, 11]), subset).tolist() == [0, 1, 2, 255]
    assert train_ids_to_label_ids(np.array([0, 1, 2]), subset).tolist() == [7, 23, 26]


def test_palette_has_the_official_colours() -> None:
    palette = segmentation_palette()
    assert CITYSCAPES_CLASSES[:2] == ("road", "sidewalk") and CITYSCAPES_CLASSES[13] == "car"
    assert palette[0].tolist() == [128, 64, 128]
    assert palette[1].tolist() == [244, 35, 232]
    assert palette[13].tolist() == [0, 0, 142]
    assert palette[255].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in palette[:19].tolist()}) == 19


def test_unknown_class_name_is_one_sentence() -> None:
    with pytest.raises(DatasetError, match=r"unknown: lorry") as info:
        label_ids_to_train_ids(np.zeros(2, np.uint8), ("car", "lorry"))
    assert "\n" not in str(info.value)


# --- the dataset ----------------------------------------------------------------------------


def test_dataset_reads_the_layout_and_maps_label_ids(tiny_cityscapes: Path) -> None:
    dataset = CityscapesSegmentation(tiny_cityscapes, "train")
    assert len(dataset) == 4
    assert [dataset.name(i) for i in range(4)] == [
        "aachen_000000_000019",
        "aachen_000003_000019",
        "bremen_000001_000019",
        "bremen_000002_000019",
    ]
    sample = dataset[2]
    assert isinstance(sample["image"], tv_tensors.Image) and sample["image"].shape == (3, H, W)
    assert isinstance(sample["mask"], tv_tensors.Mask) and sample["mask"].shape == (H, W)
    assert sample["orig_size"] == (H, W) and sample["name"] == "bremen_000001_000019"
    expected = np.vectorize(lambda i: TRAIN_ID.get(int(i), 255))(street_label(2))
    assert np.array_equal(sample["mask"].numpy(), expected)
    assert set(np.unique(expected)) == {0, 2, 10, 13, 255}


def test_a_shipped_train_ids_file_is_ignored(tiny_cityscapes: Path) -> None:
    label_dir = tiny_cityscapes / "gtFine" / "val" / "frankfurt"
    # A trainIds file that disagrees everywhere with the labelIds it should derive from.
    wrong = np.full((H, W), 5, dtype=np.uint8)
    Image.fromarray(wrong).save(label_dir / "frankfurt_000000_000294_gtFine_labelTrainIds.png")
    sample = CityscapesSegmentation(tiny_cityscapes, "val")[0]
    expected = np.vectorize(lambda i: TRAIN_ID.get(int(i), 255))(street_label(10))
    assert np.array_equal(sample["mask"].numpy(), expected)


def test_missing_label_file_names_both_files(tiny_cityscapes: Path) -> None:
    label = tiny_cityscapes / "gtFine/train/bremen/bremen_000002_000019_gtFine_labelIds.png"
    label.unlink()
    with pytest.raises(DatasetError) as info:
        CityscapesSegmentation(tiny_cityscapes, "train")  # detected when listing, not loading
    message = str(info.value)
    assert "\n" not in message
    assert "bremen_000002_000019_leftImg8bit.png" in message and str(label) in message
    assert "1 of 4 images" in message


def test_label_map_of_another_size_names_both_files_and_sizes(tiny_cityscapes: Path) -> None:
    label = tiny_cityscapes / "gtFine/train/aachen/aachen_000003_000019_gtFine_labelIds.png"
    Image.fromarray(np.full((H, W - 4), 7, dtype=np.uint8)).save(label)
    dataset = CityscapesSegmentation(tiny_cityscapes, "train")
    dataset[0]  # the other frames load
    with pytest.raises(DatasetError) as info:
        dataset[1]
    message = str(info.value)
    assert "\n" not in message
    assert str(label) in message and "aachen_000003_000019_leftImg8bit.png" in message
    assert f"{W - 4}x{H}" in message and f"{W}x{H}" in message


def test_foreign_label_ids_name_the_file_and_the_ids(tiny_cityscapes: Path) -> None:
    label = tiny_cityscapes / "gtFine/val/frankfurt/frankfurt_000001_000294_gtFine_labelIds.png"
    ids = street_label(0)
    ids[0, :3] = [40, 200, 40]
    Image.fromarray(ids).save(label)
    with pytest.raises(DatasetError) as info:
        CityscapesSegmentation(tiny_cityscapes, "val")[1]
    message = str(info.value)
    assert "\n" not in message and str(label) in message and "ids 40, 200 " in message


def test_colour_label_map_is_one_sentence(tiny_cityscapes: Path) -> None:
    label = tiny_cityscapes / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
    Image.new("RGB", (W, H), (128, 64, 128)).save(label)
    with pytest.raises(DatasetError, match="single-channel labelIds"):
        CityscapesSegmentation(tiny_cityscapes, "val")[0]


def test_unreadable_image_is_skipped_and_collated_away(tiny_cityscapes: Path) -> None:
    image = tiny_cityscapes / "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    image.write_bytes(b"not a png")
    dataset = CityscapesSegmentation(tiny_cityscapes, "val", SegmentationEvalPreset())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = collate_segmentation([dataset[0], dataset[1]])
    assert any(issubclass(w.category, UnreadableImageWarning) for w in caught)
    assert batch["skipped"] == 1 and batch["name"] == ["frankfurt_000001_000294"]
    assert batch["image"].shape == (1, 3, H, W) and batch["mask"].dtype == torch.int64
    empty = collate_segmentation([None])
    assert empty["image"].shape == (0, 0, 0, 0) and empty["skipped"] == 1


# --- presets and collate --------------------------------------------------------------------


def coded_sample() -> dict:
    """Blocks whose image value encodes their mask value (value = 20 * class), 32x64."""
    classes = np.zeros((H, W), dtype=np.uint8)
    for block, (r, c) in enumerate([(0, 0), (0, 32), (16, 0), (16, 32)]):
        classes[r : r + 16, c : c + 32] = block + 1
    classes[:, 30:34] = 7
    image = np.repeat((classes * 20)[None], 3, axis=0)
    return {
        "image": tv_tensors.Image(torch.from_numpy(image)),
        "mask": tv_tensors.Mask(torch.from_numpy(classes)),
        "name": "coded",
        "orig_size": (H, W),
    }


RAW = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def test_flip_moves_mask_with_pixels_exactly() -> None:
    sample = coded_sample()
    preset = SegmentationTrainPreset((H, W), (1.0, 1.0), hflip_prob=1.0, photometric=False, **RAW)
    out = preset(sample)
    assert torch.equal(out["mask"], sample["mask"].flip(-1))
    assert torch.allclose(out["image"] * 255, sample["image"].flip(-1).float(), atol=1e-3)
    assert out["name"] == "coded" and out["orig_size"] == (H, W)


@pytest.mark.parametrize("seed", range(6))
def test_scale_and_crop_keep_image_and_mask_aligned(seed: int) -> None:
    torch.manual_seed(seed)
    preset = SegmentationTrainPreset((24, 40), (0.5, 2.0), photometric=False, **RAW)
    out = preset(coded_sample())
    mask, value = out["mask"], torch.round(out["image"][0] * 255 / 20)
    assert out["image"].dtype == torch.float32 and out["image"].shape == (3, 24, 40)
    assert mask.shape == (24, 40) and mask.dtype == torch.uint8
    labelled = mask != 255
    # Bilinear pixels blend across block edges; away from edges image and mask agree.
    agree = (value[labelled] == mask[labelled].float()).float().mean()
    assert agree > 0.85
    assert torch.all(value[~labelled] == 0)  # padding: image fill 0 (the mean), mask 255


def test_padding_is_255_in_the_mask_and_the_mean_in_the_image() -> None:
    torch.manual_seed(0)
    mean = (0.5, 0.25, 0.125)
    preset = SegmentationTrainPreset((H, W), (0.5, 0.5), hflip_prob=0, photometric=False, mean=mean)
    out = preset(coded_sample())
    ignored = out["mask"] == 255
    assert int(ignored.sum()) == H * W - (H // 2) * (W // 2)  # the image shrank to 16x32
    # The padding normalises to (round(255 * mean) / 255 - mean) / std, about 0.
    assert out["image"][:, ignored].abs().max() < 0.01
    kept = out["mask"][~ignored].reshape(H // 2, W // 2)
    assert set(kept.unique().tolist()) == {1, 2, 3, 4, 7}


def test_eval_preset_keeps_full_resolution_or_resizes_both() -> None:
    out = SegmentationEvalPreset(**RAW)(coded_sample())
    assert out["image"].shape == (3, H, W) and torch.equal(out["mask"], coded_sample()["mask"])
    small = SegmentationEvalPreset(resize=(16, 32), **RAW)(coded_sample())
    assert small["image"].shape == (3, 16, 32) and small["mask"].shape == (16, 32)
    assert torch.equal(small["mask"], coded_sample()["mask"][1::2, 1::2])


def test_collate_refuses_mixed_frame_sizes() -> None:
    big, small = coded_sample(), SegmentationEvalPreset(resize=16)(coded_sample())
    with pytest.raises(DatasetError, match="mixes frame sizes") as info:
        collate_segmentation([SegmentationEvalPreset()(big), small])
    assert "\n" not in str(info.value)


# --- the generated street scenes ------------------------------------------------------------

GEN = {"seed": 3, "train_images": 4, "val_images": 2, "height": 32, "width": 64}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_generator_is_deterministic_idempotent_and_uses_cityscapes_ids(tmp_path: Path) -> None:
    first = generate_shapes_cityscapes(tmp_path / "a", **GEN)
    second = generate_shapes_cityscapes(tmp_path / "b", **GEN)
    files = tree_bytes(first)
    assert files == tree_bytes(second) and len(files) == 2 * (4 + 2)
    assert "leftImg8bit/val/dunmore/dunmore_000001_000019_leftImg8bit.png" in files
    stamp = {p: os.stat(first / p).st_mtime_ns for p in files}
    generate_shapes_cityscapes(first, **GEN)  # already there: nothing is rewritten
    assert stamp == {p: os.stat(first / p).st_mtime_ns for p in files}
    with pytest.raises(DatasetError, match="seed differ"):
        generate_shapes_cityscapes(first, **{**GEN, "seed": 4})
    ids = set()
    for path in (first / "gtFine").rglob("*_labelIds.png"):
        ids |= set(np.unique(np.asarray(Image.open(path))).tolist())
    # Road, sidewalk, building, sky (always drawn) are among ego vehicle, person and car.
    assert {7, 8, 11, 23} <= ids <= {1, 7, 8, 11, 23, 24, 26}


# --- through the data module ----------------------------------------------------------------


def check_batch(batch: dict, n: int, size: tuple[int, int], num_classes: int) -> None:
    assert batch["image"].shape == (n, 3, *size) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (n, *size) and batch["mask"].dtype == torch.int64
    assert type(batch["image"]) is torch.Tensor and type(batch["mask"]) is torch.Tensor
    values = set(batch["mask"].unique().tolist())
    assert values <= set(range(num_classes)) | {255} and values - {255}
    assert len(batch["name"]) == n and all(isinstance(s, str) for s in batch["name"])
    assert batch["orig_size"] == [(H, W)] * n and batch["skipped"] == 0


def test_datamodule_cityscapes_batches(tiny_cityscapes: Path) -> None:
    dm = DataModule(
        str(tiny_cityscapes),
        dataset="cityscapes",
        batch_size=2,
        num_workers=0,
        test_split=None,
        crop_size=(24, 24),
        frame_size=(H, W),
    )
    assert dm.task == "segmentation" and dm.num_classes == 19
    assert dm.class_names == list(CITYSCAPES_CLASSES) and dm.classes[0] == "7"
    assert dm.input_size == (H, W) and not dm.has_test
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), 2, (24, 24), 19)
    val = next(iter(dm.val_dataloader()))
    check_batch(val, 2, (H, W), 19)
    assert val["name"] == ["frankfurt_000000_000294", "frankfurt_000001_000294"]


def test_datamodule_generated_streets_use_their_six_classes(tmp_path: Path) -> None:
    dm = DataModule(
        str(tmp_path / "streets"),
        dataset="shapes_cityscapes",
        batch_size=2,
        num_workers=0,
        test_split=None,
        generate=GEN,
        crop_size=(H, W),
        frame_size=(H, W),
    )
    assert dm.class_names == list(STREET_CLASSES) and dm.num_classes == 6
    dm.prepare_data()
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), 2, (H, W), 6)
    check_batch(next(iter(dm.val_dataloader())), 2, (H, W), 6)
