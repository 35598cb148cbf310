"""One-channel (gray) MobileNets: the stem reads 1 channel, everything after it is unchanged."""

import pytest
import torch

from mnv3.models import build_backbone as build_model
from mnv3.models import count_madds, mobilenet_v3_large, mobilenet_v3_small

BUILDERS = ("mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v2")


@pytest.mark.parametrize("name", BUILDERS)
def test_in_channels_reaches_the_stem(name) -> None:
    model = build_model(name, num_classes=2, in_channels=1)
    assert model.arch.in_channels == 1
    assert model.stem.conv.in_channels == 1
    assert build_model(name, num_classes=2).stem.conv.in_channels == 3


@pytest.mark.parametrize("size", [(224, 224), (320, 480)])
def test_gray_model_runs_forward_and_backward(size) -> None:
    model = mobilenet_v3_small(num_classes=3, in_channels=1, bn_momentum=0.1).train()
    x = torch.randn(2, 1, *size)
    logits = model(x)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert model.stem.conv.weight.grad is not None
    assert model.stem.conv.weight.grad.shape == (16, 1, 3, 3)


@pytest.mark.parametrize("size", [224, (320, 480)])
def test_gray_madds_save_exactly_the_stems_two_channels(size) -> None:
    rgb, gray = mobilenet_v3_large(), mobilenet_v3_large(in_channels=1)
    h, w = (size, size) if isinstance(size, int) else size
    stem_out = (h // 2) * (w // 2) * rgb.arch.stem_channels  # stride-2 3x3 conv, padding 1
    saved = stem_out * 3 * 3 * (3 - 1)  # per output: 3x3 kernel, 2 fewer input channels
    assert count_madds(gray, size) == count_madds(gray, size, in_channels=1)
    assert count_madds(rgb, size) - count_madds(gray, size, in_channels=1) == saved


def test_in_channels_must_be_positive() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        mobilenet_v3_small(in_channels=0)
