"""BatchNorm folding and the inference-optimised path give the eager model's outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mnv3.models import (
    fuse_conv_bn,
    mobilenet_v2,
    mobilenet_v3_large,
    mobilenet_v3_small,
    optimize_for_inference,
)
from mnv3.models.layers import ConvBNAct

TOL = 1e-4


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    With the default init (mean 0, var 1, gamma 1, beta 0) a BatchNorm is almost the identity
    and a wrong fold could go unnoticed; random statistics make every term of the fold count.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
    return model.eval()


MODELS = {
    "large": lambda: mobilenet_v3_large(),
    "small": lambda: mobilenet_v3_small(),
    "large_minimal": lambda: mobilenet_v3_large(minimal=True),
    "small_minimal_075": lambda: mobilenet_v3_small(minimal=True, width_mult=0.75),
    "v2": lambda: mobilenet_v2(),
    "large_os16_backbone": lambda: mobilenet_v3_large(output_stride=16, num_classes=0),
    "v2_os8": lambda: mobilenet_v2(output_stride=8, num_classes=10),
}


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_matches_unfused(name: str, inputs: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(MODELS[name]())
    fused = fuse_conv_bn(model)
    assert not fused.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    # every ConvBNAct's conv now carries the folded BatchNorm as its bias
    units = [m for m in fused.modules() if isinstance(m, ConvBNAct)]
    assert units and all(isinstance(m.bn, nn.Identity) for m in units)
    assert all(m.conv.bias is not None for m in units)
    with torch.inference_mode():
        expected = model(inputs)
        got = fused(inputs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


def test_fuse_leaves_original_untouched() -> None:
    model = mobilenet_v3_small().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_conv_bn(model)
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fused_keeps_feature_taps() -> None:
    model = _randomize_bn(mobilenet_v3_large(num_classes=0))
    fused = fuse_conv_bn(model)
    x = torch.randn(1, 3, 64, 64)
    names = ["C2", "C4_expansion", "C5"]
    with torch.inference_mode():
        expected = model.forward_taps(x, names)
        got = fused.forward_taps(x, names)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=TOL)


@pytest.mark.parametrize("mode", ["freeze", "eager"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_optimize_for_inference_matches_eager(mode: str, channels_last: bool) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(mobilenet_v3_large())
    x = torch.randn(1, 3, 96, 96)
    fusion_before = torch.jit.onednn_fusion_enabled()
    optimized = optimize_for_inference(
        model, mode=mode, channels_last=channels_last, example_input=x
    )
    # the process-wide oneDNN fusion switch is restored after the warm-up compile
    assert torch.jit.onednn_fusion_enabled() == fusion_before
    if mode == "freeze":
        assert isinstance(optimized, torch.jit.ScriptModule)
    with torch.inference_mode():
        expected = model(x)
        got_nchw = optimized(x)
        got_nhwc = optimized(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got_nchw, expected, rtol=0, atol=TOL)
    torch.testing.assert_close(got_nhwc, expected, rtol=0, atol=TOL)
    # the input model is not modified (still has its BatchNorms)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_optimize_for_inference_other_shapes_and_grad_mode() -> None:
    """A plan compiled for one shape stays correct for other shapes, batch sizes, grad mode."""
    model = _randomize_bn(mobilenet_v3_small(minimal=True, num_classes=10))
    optimized = optimize_for_inference(model, example_input=torch.randn(1, 3, 64, 64))
    for shape in [(3, 3, 64, 64), (1, 3, 80, 48)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(optimized(x), model(x), rtol=0, atol=TOL)


def test_optimize_for_inference_freeze_fallback_float64() -> None:
    """Float64 cannot use the oneDNN Graph fuser: the optimize_for_inference fallback runs."""
    model = _randomize_bn(mobilenet_v3_small(num_classes=10)).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    optimized = optimize_for_inference(model, example_input=x)
    with torch.inference_mode():
        torch.testing.assert_close(optimized(x), model(x), rtol=0, atol=1e-9)


def test_optimize_for_inference_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        optimize_for_inference(mobilenet_v3_small(), mode="tensorrt")  # type: ignore[arg-type]
