"""Transform presets: output shapes and dtypes, sizes, normalisation, options."""

from __future__ import annotations

import pytest
import torch

from mnv3.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationEvalPreset,
    ClassificationTrainPreset,
)


def _constant(colour: tuple[int, int, int], h: int = 50, w: int = 70) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.uint8)[:, None, None].expand(3, h, w).contiguous()


@pytest.mark.parametrize("auto_augment", [None, "autoaugment", "trivialaugment"])
def test_train_preset_output(auto_augment: str | None) -> None:
    preset = ClassificationTrainPreset(
        crop_size=32, auto_augment=auto_augment, random_erase_prob=0.5
    )
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    out = preset(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert preset.mean == IMAGENET_MEAN and preset.std == IMAGENET_STD


def test_eval_preset_default_resize_keeps_87_5_percent() -> None:
    assert ClassificationEvalPreset().resize_size == 256
    assert ClassificationEvalPreset(crop_size=64).resize_size == 73
    preset = ClassificationEvalPreset(crop_size=32, resize_size=40, interpolation="bicubic")
    assert preset(torch.zeros(3, 50, 90, dtype=torch.uint8)).shape == (3, 32, 32)


@pytest.mark.parametrize("preset", [ClassificationTrainPreset(24), ClassificationEvalPreset(24)])
def test_constant_colour_normalises_exactly(preset) -> None:
    colour = (200, 30, 90)
    out = preset(_constant(colour))
    for c in range(3):
        expected = (colour[c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(out[c], torch.full_like(out[c], expected), atol=1e-5)


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        ClassificationEvalPreset(interpolation="lanczos7")
    with pytest.raises(ValueError, match="auto_augment"):
        ClassificationTrainPreset(auto_augment="randaugment")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mean"):
        ClassificationTrainPreset(mean=(0.5, 0.5))
