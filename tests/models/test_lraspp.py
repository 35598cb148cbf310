"""LR-ASPP / R-ASPP segmenters: torchvision parity, gate pooling, taps, sizes, weights, Table 7."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

from mnv3.models import (
    MODELS,
    build_model,
    count_params,
    load_segmentation_weights,
    lraspp,
    mobilenet_v3_large,
    mobilenet_v3_small,
    raspp,
)
from mnv3.models.checkpoints import CheckpointError
from mnv3.models.segmentation.heads import LRASPPHead

SEGMENTERS = MODELS["segmenter"]
build_segmenter = partial(build_model, "segmenter")

TORCHVISION_PARAMS = 3_221_538  # torchvision's LRASPP_MobileNet_V3_Large_Weights meta, 21 classes


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Random BN affine parameters and running statistics, so eval-mode parity means something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).eval()
    randomize_bn(tv)
    path = tmp_path_factory.mktemp("tv") / "lraspp_tv.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


def torchvision_like(**kwargs: object) -> nn.Module:
    return lraspp(
        pool="global",
        reduced_tail=False,
        output_stride=16,
        low_tap="C3_first",
        num_classes=21,
        **kwargs,
    )


def test_torchvision_state_dict_loads_and_gives_the_same_logits(
    torchvision_file: tuple[nn.Module, Path],
) -> None:
    tv, path = torchvision_file
    ours = torchvision_like()
    assert count_params(ours) == count_params(tv) == TORCHVISION_PARAMS
    report = load_segmentation_weights(ours, path)
    assert report.format == "torchvision" and not report.reinitialized
    ours.eval()
    x = torch.randn(2, 3, 131, 197)  # odd sizes exercise every resize's rounding
    with torch.no_grad():
        expected, got = tv(x)["out"], ours(x)
    assert got.shape == (2, 21, 131, 197)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The builder's weights= path does the same load.
    rebuilt = torchvision_like(weights=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), expected, rtol=1e-5, atol=1e-5)


def test_another_class_count_keeps_all_but_the_logits_layers(
    torchvision_file: tuple[nn.Module, Path],
) -> None:
    tv, path = torchvision_file
    ours = lraspp(pool="global", reduced_tail=False, num_classes=19)
    report = load_segmentation_weights(ours, path)
    assert report.reinitialized == [
        "head.high_classifier.bias",
        "head.high_classifier.weight",
        "head.low_classifier.bias",
        "head.low_classifier.weight",
    ]
    torch.testing.assert_close(ours.head.gate.weight, tv.classifier.scale[1].weight)
    torch.testing.assert_close(ours.backbone.stem.conv.weight, tv.backbone["0"][0].weight)
    assert ours.head.low_classifier.weight.shape == (19, 40, 1, 1)


def test_a_checkpoint_of_another_architecture_is_one_clear_error(
    torchvision_file: tuple[nn.Module, Path],
) -> None:
    _, path = torchvision_file
    with pytest.raises(CheckpointError, match=r"does not fit lraspp\(.*reduced_tail=True.*shape"):
        lraspp(num_classes=21, weights=str(path))  # the paper's RF2 tail vs torchvision's full one
    with pytest.raises(CheckpointError, match="only LR-ASPP maps"):
        raspp(reduced_tail=False, num_classes=21, weights=str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        lraspp(weights="/nonexistent/lraspp.pth")


def test_own_and_lightning_checkpoints_round_trip(tmp_path: Path) -> None:
    model = raspp(backbone="mobilenet_v3_small", num_classes=5, inter_channels=32).eval()
    randomize_bn(model, seed=3)
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "run.ckpt"
    torch.save(model.state_dict(), plain)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    x = torch.randn(1, 3, 96, 160)
    for source in (plain, wrapped):
        loaded = raspp(
            backbone="mobilenet_v3_small", num_classes=5, inter_channels=32, weights=str(source)
        ).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x))


def test_paper_pool_is_global_pooling_at_a_769_crop() -> None:
    torch.manual_seed(0)
    paper = lraspp(backbone="mobilenet_v3_small", pool="paper").eval()  # Table 7 row 11
    randomize_bn(paper)
    global_ = lraspp(backbone="mobilenet_v3_small", pool="global").eval()
    global_.load_state_dict(paper.state_dict())
    assert paper.head.pool_kernel == (49, 49)  # ceil(769 / 16)
    x = torch.randn(1, 3, 769, 769)
    with torch.no_grad():
        out = paper(x)
        torch.testing.assert_close(out, global_(x))
    assert out.shape == (1, 19, 769, 769)


def test_paper_gate_grid_at_cityscapes_size_and_clamping_on_small_maps() -> None:
    head = LRASPPHead(40, 480, 19, pool="paper")
    high = torch.randn(1, 480, 64, 128)  # a 1024x2048 image at output stride 16
    pooled = head.gate_pool(high)
    assert pooled.shape[-2:] == (1, 4)  # (64 - 49) // 16 + 1, (128 - 49) // 20 + 1
    torch.testing.assert_close(pooled[..., 0, 1], high[..., 0:49, 20:69].mean(dim=(-2, -1)))
    small = torch.randn(2, 480, 12, 30)  # a map smaller than the kernel: global pooling
    torch.testing.assert_close(head.gate_pool(small), small.mean(dim=(-2, -1), keepdim=True))
    # Output stride 32 sizes the kernel for the same 769 crop: scale(769, 1/32) = 25.
    assert LRASPPHead(40, 480, 19, output_stride=32).pool_kernel == (25, 25)
    with pytest.raises(ValueError, match="pool must be 'paper' or 'global'"):
        LRASPPHead(40, 480, 19, pool="max")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("backbone", "size", "output_stride"),
    [
        ("mobilenet_v3_large", (512, 1024), 16),
        ("mobilenet_v3_small", (1024, 2048), 16),
        ("mobilenet_v3_small", (512, 1024), 32),  # Table 8's OS32
    ],
)
def test_runs_at_cityscapes_sizes_with_logits_at_the_input_size(
    backbone: str, size: tuple[int, int], output_stride: int
) -> None:
    model = lraspp(backbone=backbone, output_stride=output_stride).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 19, *size)


def test_low_taps_are_chosen_by_name() -> None:
    large, small = mobilenet_v3_large(num_classes=0), mobilenet_v3_small(num_classes=0)
    # torchvision's skip: features[4] = our block index 3, 40 channels (Large); 24 in Small.
    assert (large.tap("C3_first").location, large.tap("C3_first").channels) == ("blocks.3", 40)
    assert small.tap("C3_first").channels == 24
    # TF DeepLab's: layer_7 / layer_4 depthwise output = block 6 / block 3, before SE.
    assert large.tap("C3_depthwise").location == "blocks.5.depthwise"
    assert (large.tap("C3_depthwise").channels, small.tap("C3_depthwise").channels) == (120, 88)
    captured: dict[str, torch.Tensor] = {}
    large.blocks[5].depthwise.register_forward_hook(
        lambda m, i, o: captured.setdefault("dw", o.clone())
    )
    large.eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        taps = large.forward_taps(x, ["C3_first", "C3_depthwise", "C3", "C5"])
    torch.testing.assert_close(taps["C3_depthwise"], captured["dw"])
    assert taps["C3_first"].shape == (1, 40, 12, 16) and taps["C3_depthwise"].shape[-2:] == (12, 16)
    with torch.no_grad():
        torch.testing.assert_close(taps["C5"], large.forward_features(x))
    model = lraspp(low_tap="C3_depthwise")
    assert model.head.low_classifier.in_channels == 120
    with pytest.raises(KeyError, match=r"no feature tap 'layer_7'.*C3_depthwise"):
        lraspp(low_tap="layer_7")


def test_table7_parameter_counts_match_the_paper() -> None:
    # Table 7 (Cityscapes, RF2): row 7 LR-ASPP F256 1.63M, row 8 F128 1.51M, row 11 Small 0.47M.
    assert round(count_params(lraspp(inter_channels=256)) / 1e6, 2) == 1.63
    assert round(count_params(lraspp(inter_channels=128)) / 1e6, 2) == 1.51
    assert round(count_params(lraspp(backbone="mobilenet_v3_small")) / 1e6, 2) == 0.47
    # torchvision's RF2 keeps the first tail block's 672 expansion: 0.24M more than the paper's.
    tv_tail = lraspp(reduced_tail_style="torchvision")
    assert tv_tail.backbone.blocks[12].expanded_channels == 672
    assert lraspp().backbone.blocks[12].expanded_channels == 336


def test_built_by_name_from_plain_kwargs_with_backbone_and_head_submodules() -> None:
    assert set(SEGMENTERS) >= {"lraspp", "raspp"}
    model = build_segmenter(
        "lraspp",
        backbone="mobilenet_v3_small",
        num_classes=3,
        inter_channels=16,
        pool_stride=[16, 20],
        pool_crop_size=[385, 769],
    )
    assert model.head.pool_kernel == (25, 49)
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == {"backbone", "head"}
    assert model.config["backbone"] == "mobilenet_v3_small" and model.num_classes == 3
    with pytest.raises(ValueError, match="unknown segmenter 'deeplab'"):
        build_segmenter("deeplab")
    with pytest.raises(ValueError, match="'mobilenet_v2' is not supported"):
        lraspp(backbone="mobilenet_v2")  # type: ignore[arg-type]


@pytest.mark.parametrize("build", [lraspp, raspp])
def test_trains_one_step_in_train_mode(build: object) -> None:
    model = build(backbone="mobilenet_v3_small", num_classes=4, inter_channels=16)  # type: ignore[operator]
    model.train()
    x, y = torch.randn(2, 3, 64, 96), torch.randint(0, 4, (2, 64, 96))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in model.head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.stem.conv.weight.grad.abs().sum() > 0
