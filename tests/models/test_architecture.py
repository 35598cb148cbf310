"""The paper's figures: exact parameter counts, MAdds within 2%, width rules, taps."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from mnv3.models import (
    count_madds,
    count_params,
    mobilenet_v2,
    mobilenet_v3_arch,
    mobilenet_v3_large,
    mobilenet_v3_small,
)
from mnv3.models.mobilenetv3 import LARGE_TABLE, SMALL_TABLE

# Parameters with 1000 classes, equal to torchvision's (and the paper's 5.4M / 2.5M / 3.4M).
EXACT_PARAMS = {
    "large": (mobilenet_v3_large, 5_483_032),
    "small": (mobilenet_v3_small, 2_542_856),
    "v2": (mobilenet_v2, 3_504_872),
}


@pytest.mark.parametrize("name", EXACT_PARAMS)
def test_exact_parameter_counts(name: str) -> None:
    build, expected = EXACT_PARAMS[name]
    assert count_params(build()) == expected


# Paper Table 3 (MobileNetV3) and MobileNetV2 Table 4: MAdds at 224 (millions), params (millions).
PAPER = [
    ("large_1.0", lambda: mobilenet_v3_large(), 217, None),
    ("large_0.75", lambda: mobilenet_v3_large(width_mult=0.75), 155, 4.0),
    ("small_1.0", lambda: mobilenet_v3_small(), 56, None),
    ("small_0.75", lambda: mobilenet_v3_small(width_mult=0.75), 44, 2.0),
    ("v2_1.0", lambda: mobilenet_v2(), 300, None),
]


@pytest.mark.parametrize(("name", "build", "madds_m", "params_m"), PAPER, ids=[p[0] for p in PAPER])
def test_madds_and_params_match_paper(name, build, madds_m, params_m) -> None:
    model = build()
    madds = count_madds(model, 224) / 1e6
    assert abs(madds - madds_m) / madds_m <= 0.02, f"{name}: {madds:.1f}M MAdds vs paper {madds_m}M"
    if params_m is not None:
        params = count_params(model) / 1e6
        assert abs(params - params_m) / params_m <= 0.03, f"{name}: {params:.3f}M vs {params_m}M"


def test_madds_counter_matches_hand_count() -> None:
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, groups=2)
    # 16 output channels x 10x10 positions x (3*3*8/2) MACs each.
    assert count_madds(conv, 10, in_channels=8) == 16 * 100 * 36
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 7))
    assert count_madds(lin, 4) == 48 * 7


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            lambda: mobilenet_v3_large(width_mult=0.75, width_rounding="torchvision"),
            lambda: torchvision.models.mobilenet_v3_large(width_mult=0.75),
        ),
        (
            lambda: mobilenet_v3_small(width_mult=0.5, width_rounding="torchvision"),
            lambda: torchvision.models.mobilenet_v3_small(width_mult=0.5),
        ),
        (
            lambda: mobilenet_v3_large(reduced_tail=True),
            lambda: torchvision.models.mobilenet_v3_large(reduced_tail=True),
        ),
        (
            lambda: mobilenet_v3_small(reduced_tail=True),
            lambda: torchvision.models.mobilenet_v3_small(reduced_tail=True),
        ),
        (
            lambda: mobilenet_v2(width_mult=0.5),
            lambda: torchvision.models.mobilenet_v2(width_mult=0.5),
        ),
    ],
    ids=["large_075_tv", "small_050_tv", "large_reduced", "small_reduced", "v2_050"],
)
def test_torchvision_convention_gives_torchvision_network(ours, theirs) -> None:
    a, b = ours(), theirs()
    assert count_params(a) == count_params(b)
    assert count_madds(a, 224) == count_madds(b, 224)


def test_paper_width_rule_scales_expansion_from_rounded_input() -> None:
    # Large 0.75: block 4 input is make_divisible(24*0.75)=24 (18 rounds up past 90%), its
    # expansion factor 72/24=3 gives 72; torchvision's rule gives make_divisible(72*0.75)=56.
    paper = mobilenet_v3_arch("large", 0.75)
    tv = mobilenet_v3_arch("large", 0.75, width_rounding="torchvision")
    assert paper.blocks[3].in_channels == 24 and paper.blocks[3].expanded_channels == 72
    assert tv.blocks[3].expanded_channels == 56
    assert paper.head_hidden_channels == 1280 and tv.head_hidden_channels == 960
    # At 1.0 both conventions are the same network.
    assert mobilenet_v3_arch("large", 1.0) == mobilenet_v3_arch(
        "large", 1.0, width_rounding="torchvision"
    )


def test_tables_match_paper_rows() -> None:
    # Spot-check against the paper: Table 1 row 13 and Table 2 row 9 (the C4_expansion blocks).
    assert (
        LARGE_TABLE[12].kernel,
        LARGE_TABLE[12].exp,
        LARGE_TABLE[12].out,
        LARGE_TABLE[12].s,
    ) == (5, 672, 160, 2)
    assert (SMALL_TABLE[8].kernel, SMALL_TABLE[8].exp, SMALL_TABLE[8].out, SMALL_TABLE[8].s) == (
        5,
        288,
        96,
        2,
    )
    assert sum(r.se for r in LARGE_TABLE) == 8 and sum(r.se for r in SMALL_TABLE) == 9
    assert [r.nl for r in SMALL_TABLE[:3]] == ["RE"] * 3


def test_squeeze_excite_uses_hard_sigmoid_and_quarter_width() -> None:
    model = mobilenet_v3_large()
    block = model.blocks[3]  # 72 expansion with SE: squeeze to make_divisible(72/4, 8) = 24
    assert block.se.reduce.out_channels == 24
    x = torch.randn(1, 72, 8, 8)
    gate = torch.nn.functional.hardsigmoid(
        block.se.expand(torch.relu(block.se.reduce(x.mean((2, 3), keepdim=True))))
    )
    assert torch.allclose(block.se(x), x * gate)
    bn = model.stem.bn
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)


def test_minimal_variant_has_no_se_no_hswish_3x3_only() -> None:
    model = mobilenet_v3_large(minimal=True)
    mods = list(model.modules())
    assert not any(isinstance(m, torch.nn.Hardswish) for m in mods)
    assert all(b.se is None for b in model.blocks)
    assert {b.depthwise.conv.kernel_size for b in model.blocks} == {(3, 3)}


def test_reduced_tail_halves_last_stage() -> None:
    arch = mobilenet_v3_arch("large", reduced_tail=True)
    assert [b.out_channels for b in arch.blocks[-3:]] == [80, 80, 80]
    assert arch.blocks[-3].expanded_channels == 672 and arch.blocks[-1].expanded_channels == 480
    assert arch.last_channels == 480


VARIANTS = {
    "large": dict(build=mobilenet_v3_large),
    "small": dict(build=mobilenet_v3_small),
    "large_075": dict(build=mobilenet_v3_large, width_mult=0.75),
    "small_075": dict(build=mobilenet_v3_small, width_mult=0.75),
    "large_minimal": dict(build=mobilenet_v3_large, minimal=True),
    "small_minimal": dict(build=mobilenet_v3_small, minimal=True),
    "large_reduced": dict(build=mobilenet_v3_large, reduced_tail=True),
    "small_reduced": dict(build=mobilenet_v3_small, reduced_tail=True),
    "mobilenet_v2": dict(build=mobilenet_v2),
}


@pytest.mark.parametrize("output_stride", [32, 16, 8])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_runs_with_taps_at_claimed_strides(variant: str, output_stride: int) -> None:
    kwargs = dict(VARIANTS[variant])
    model = kwargs.pop("build")(num_classes=10, output_stride=output_stride, **kwargs).eval()
    names = [info.name for info in model.feature_info]
    assert names == ["C1", "C2", "C3", "C4", "C4_expansion", "C5"]
    with torch.no_grad():
        for h, w in ((224, 224), (320, 480)):
            x = torch.randn(1, 3, h, w)
            assert model(x).shape == (1, 10)
            taps = model.forward_taps(x, names)
            for info in model.feature_info:
                assert info.stride == min(info.stride, output_stride)
                t = taps[info.name]
                assert t.shape[1] == info.channels, info
                assert (t.shape[2], t.shape[3]) == (-(-h // info.stride), -(-w // info.stride)), (
                    info
                )
            assert torch.equal(taps["C5"], model.forward_features(x))


def test_c4_expansion_is_block_13_of_large_and_block_9_of_small() -> None:
    assert mobilenet_v3_large().tap("C4_expansion").location == "blocks.12.expand"  # 1-based 13
    assert mobilenet_v3_large().tap("C4_expansion").channels == 672
    assert mobilenet_v3_small().tap("C4_expansion").location == "blocks.8.expand"  # 1-based 9
    assert mobilenet_v3_small().tap("C4_expansion").channels == 288
    assert mobilenet_v3_large(output_stride=16).tap("C5").stride == 16
    with pytest.raises(KeyError, match="available: C1"):
        mobilenet_v3_large().tap("P3")


def test_dilated_model_matches_torchvision_dilated_backbone() -> None:
    ours = mobilenet_v3_large(output_stride=16)
    theirs = torchvision.models.mobilenet_v3_large(dilated=True)
    dil = [b.depthwise.conv.dilation[0] for b in ours.blocks]
    assert dil == [1] * 12 + [2, 2, 2]
    assert count_madds(ours, 224) == count_madds(theirs, 224)


def test_bad_arguments_fail_with_clear_messages() -> None:
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        mobilenet_v3_large(output_stride=4)
    with pytest.raises(ValueError, match="width_rounding"):
        mobilenet_v3_small(width_rounding="tf")


# One fresh interpreter answers both import tests (each interpreter start imports torch: seconds).
# It imports mnv3.models first and lists the unwanted packages then loaded; then, for each
# module, it drops every mnv3 module from sys.modules and imports that module first. A cycle can
# only run through mnv3's own modules, so torch staying loaded does not hide one.
UNWANTED = ("hydra", "omegaconf", "lightning", "pytorch_lightning", "wandb")
FIRST_IMPORTS = ("checkpoints", "mobilenet", "backbone", "detection", "segmentation")
IMPORT_PROBE = f"""
import importlib, json, sys, traceback
import mnv3.models
unwanted = [m for m in {UNWANTED!r} if m in sys.modules]
failed = {{}}
for module in {FIRST_IMPORTS!r}:
    for name in [n for n in sys.modules if n == "mnv3" or n.startswith("mnv3.")]:
        del sys.modules[name]
    try:
        importlib.import_module("mnv3.models." + module)
    except Exception:
        failed[module] = traceback.format_exc()
print(json.dumps({{"unwanted": unwanted, "failed": failed}}))
"""


@pytest.fixture(scope="module")
def import_probe() -> dict[str, Any]:
    """What :data:`IMPORT_PROBE` saw in a fresh interpreter: ``unwanted`` packages loaded by
    ``import mnv3.models``, and the modules of :data:`FIRST_IMPORTS` that ``failed`` to import
    first (with their tracebacks)."""
    result = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_models_package_imports_no_hydra_lightning_or_wandb(import_probe: dict[str, Any]) -> None:
    assert import_probe["unwanted"] == []


def test_models_modules_import_in_one_direction(import_probe: dict[str, Any]) -> None:
    """The network class never imports the checkpoint code that needs it (no import cycle):
    every models module imports first, with no other mnv3 module loaded before it."""
    import ast

    import mnv3.models.mobilenet as mobilenet_module

    tree = ast.parse(Path(mobilenet_module.__file__).read_text())
    imported = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module is not None
    }
    assert "mnv3.models.checkpoints" not in imported
    assert import_probe["failed"] == {}, "\n".join(import_probe["failed"].values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_one_step(variant: str) -> None:
    kwargs = dict(VARIANTS[variant])
    model = kwargs.pop("build")(num_classes=3, **kwargs).train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 2]))
    loss.backward()  # in-place ops in the head or blocks would fail here
    assert all(p.grad is not None for p in model.parameters())


def test_count_madds_restores_each_modules_own_mode() -> None:
    model = mobilenet_v3_small(num_classes=3).train()
    model.blocks[0].eval()  # e.g. a frozen part during fine-tuning
    count_madds(model, 64)
    assert model.training and model.classifier.training
    assert not any(m.training for m in model.blocks[0].modules())
