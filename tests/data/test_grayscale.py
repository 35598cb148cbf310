"""Gray input (``channels=1``): luma conversion, one-value normalisation, datamodule batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mnv3.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationEvalPreset,
    ClassificationTrainPreset,
    DataModule,
    DatasetError,
    RGBToLuma,
    channel_stats,
    load_rgb,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

GRAY_MEAN = sum(IMAGENET_MEAN) / 3
GRAY_STD = sum(IMAGENET_STD) / 3


def test_luma_of_replicated_gray_is_the_gray_value_exactly() -> None:
    values = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)
    out = RGBToLuma()(values.expand(3, -1, -1))
    assert out.shape == (1, 16, 16) and out.dtype == torch.uint8
    assert torch.equal(out, values)


def test_luma_uses_bt601_weights_rounded() -> None:
    pixels = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], dtype=torch.uint8)
    image = pixels.T.reshape(3, 1, 4)
    expected = [round(0.299 * r + 0.587 * g + 0.114 * b) for r, g, b in pixels.tolist()]
    assert RGBToLuma()(image).flatten().tolist() == expected  # [76, 150, 29, 18]
    batch = image.unsqueeze(0).expand(2, -1, -1, -1)
    assert RGBToLuma()(batch).shape == (2, 1, 1, 4)
    with pytest.raises(ValueError, match="uint8"):
        RGBToLuma()(image.float())


def test_channel_stats() -> None:
    assert channel_stats(IMAGENET_MEAN, "mean") == IMAGENET_MEAN
    assert channel_stats(IMAGENET_MEAN, "mean", 1) == pytest.approx((GRAY_MEAN,))
    assert channel_stats([0.5], "mean", 1) == (0.5,)
    assert channel_stats([0.5], "mean", 3) == (0.5,)  # Normalize broadcasts one value
    with pytest.raises(ValueError, match="std"):
        channel_stats([0.2, 0.3], "std", 1)
    with pytest.raises(ValueError, match="channels"):
        channel_stats([0.5], "mean", 2)


@pytest.mark.parametrize("auto_augment", [None, "autoaugment", "trivialaugment", "xray"])
def test_gray_train_preset_output(auto_augment: str | None) -> None:
    preset = ClassificationTrainPreset(
        crop_size=32, auto_augment=auto_augment, random_erase_prob=0.5, channels=1
    )
    out = preset(torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8))
    assert out.shape == (1, 32, 32) and out.dtype == torch.float32
    assert preset.mean == pytest.approx((GRAY_MEAN,)) and preset.std == pytest.approx((GRAY_STD,))


@pytest.mark.parametrize(
    "preset",
    [
        ClassificationTrainPreset(24, channels=1),
        ClassificationEvalPreset(24, channels=1),
        ClassificationEvalPreset(24, mean=[0.4], std=[0.2], channels=1),
    ],
)
def test_gray_constant_image_normalises_exactly(preset) -> None:
    gray = 173
    out = preset(torch.full((3, 50, 70), gray, dtype=torch.uint8))
    expected = (gray / 255 - preset.mean[0]) / preset.std[0]
    assert out.shape == (1, 24, 24)
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-5)


def test_one_value_stats_on_rgb_preset() -> None:
    preset = ClassificationEvalPreset(24, mean=[0.5], std=[0.25])
    out = preset(torch.full((3, 30, 30), 255, dtype=torch.uint8))
    assert out.shape == (3, 24, 24) and torch.allclose(out, torch.full_like(out, 2.0))


# --- the datamodule -------------------------------------------------------------------------------

GRAYS = {"normal": 40, "pneumonia": 210}


@pytest.fixture
def gray_root(tmp_path: Path, write_image) -> Path:
    """An ImageFolder of constant gray ("L" mode) PNGs: 4 training, 2 validation images a class."""
    root = tmp_path / "xray"
    for name, value in GRAYS.items():
        for i in range(4):
            write_image(root / "train" / name / f"{i}.png", value, mode="L", size=(40, 30))
        for i in range(2):
            write_image(root / "val" / name / f"{i}.png", value, mode="L", size=(40, 30))
    return root


def _module(root: Path, **kwargs) -> DataModule:
    options = {"batch_size": 4, "num_workers": 0, "image_size": 24} | kwargs
    return DataModule(str(root), **options)


def test_gray_pngs_decode_as_replicated_rgb(gray_root: Path) -> None:
    image = load_rgb(gray_root / "train" / "normal" / "0.png")
    assert image.shape == (3, 30, 40) and torch.all(image == GRAYS["normal"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_gray_batches_have_one_channel_and_averaged_normalisation(gray_root, split) -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    dm = _module(gray_root, channels=1, mean=mean, std=std)
    assert dm.channels == 1
    assert dm.mean == pytest.approx((0.4,)) and dm.std == pytest.approx((0.25,))
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 24, 24) and batch["image"].dtype == torch.float32
    for image, label in zip(batch["image"], batch["label"], strict=True):
        gray = GRAYS[dm.class_names[label]]
        expected = (gray / 255 - 0.4) / 0.25
        assert torch.allclose(image, torch.full_like(image, expected), atol=1e-5)


def test_rgb_default_is_unchanged(gray_root: Path) -> None:
    dm = _module(gray_root)
    assert dm.channels == 3 and dm.mean == IMAGENET_MEAN and dm.std == IMAGENET_STD
    dm.setup("fit")
    assert next(iter(dm.val_dataloader()))["image"].shape == (4, 3, 24, 24)


def test_channels_must_be_one_or_three(gray_root: Path) -> None:
    with pytest.raises(DatasetError, match="channels"):
        _module(gray_root, channels=2)
