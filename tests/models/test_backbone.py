"""build_backbone: one builder for every backbone, from a name, a block table or an ArchSpec."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mnv3.models import (
    BACKBONES,
    backbone_arch,
    build_backbone,
    count_params,
    mobilenet_v3_large,
    mobilenet_v3_small,
)
from mnv3.models.backbone import UnsupportedBackbone, backbone_options, check_backbone_limits
from mnv3.models.mobilenetv3 import MOBILENET_V3_SMALL, SMALL_TABLE, V3Table


def test_names_build_the_papers_networks_with_or_without_classifier() -> None:
    assert set(BACKBONES) == {
        "mobilenet_v3_large",
        "mobilenet_v3_small",
        "mobilenet_v3",
        "mobilenet_v2",
    }
    assert count_params(build_backbone("mobilenet_v3_large", num_classes=1000)) == 5_483_032
    backbone = build_backbone("mobilenet_v3_small")
    assert backbone.classifier is None
    classifier = mobilenet_v3_small()
    assert count_params(backbone) == count_params(classifier) - count_params(classifier.classifier)


def test_a_block_table_builds_like_a_name_and_a_new_table_is_just_another_network() -> None:
    assert backbone_arch(MOBILENET_V3_SMALL, width_mult=0.75) == backbone_arch(
        "mobilenet_v3_small", width_mult=0.75
    )
    # A "searched" network: Small without its last block, another last-conv width.
    searched = V3Table("searched", SMALL_TABLE[:-1], stem=16, last=512, head=1024)
    net = build_backbone(searched, num_classes=7, reduced_tail=True)
    assert net.arch.name == "searched" and net.arch.num_blocks == len(SMALL_TABLE) - 1
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    assert net.tap("C5").channels == 256  # the reduced tail halves the table's 512


def test_an_archspec_is_built_as_it_is_and_options_apply_to_it() -> None:
    arch = backbone_arch("mobilenet_v3_large", reduced_tail=True)
    net = build_backbone(arch, output_stride=16, bn_momentum=0.1, bn_eps=1e-3, in_channels=1)
    assert net.arch.blocks == arch.blocks and net.arch.output_stride == 16
    assert net.stem.conv.in_channels == 1
    assert net.stem.bn.momentum == 0.1 and net.stem.bn.eps == 1e-3
    assert net.tap("C5").stride == 16
    assert count_params(build_backbone(replace(arch, output_stride=32))) == count_params(
        build_backbone("mobilenet_v3_large", reduced_tail=True)
    )


def test_reduced_tail_styles_differ_only_in_the_first_tail_expansion() -> None:
    torchvision = backbone_arch("mobilenet_v3_large", reduced_tail=True)
    deeplab = backbone_arch("mobilenet_v3_large", reduced_tail=True, reduced_tail_style="deeplab")
    assert (torchvision.blocks[12].expanded_channels, deeplab.blocks[12].expanded_channels) == (
        672,
        336,
    )
    assert torchvision.blocks[13:] == deeplab.blocks[13:]
    with pytest.raises(ValueError, match="reduced_tail_style must be"):
        backbone_arch("mobilenet_v3_large", reduced_tail=True, reduced_tail_style="tf")


def test_options_are_those_of_the_backbone_and_unknown_names_are_one_sentence() -> None:
    v3, v2 = backbone_options("mobilenet_v3_large"), backbone_options("mobilenet_v2")
    assert {"minimal", "reduced_tail", "width_rounding", "weights", "in_channels"} <= set(v3)
    assert "minimal" not in v2 and {"width_mult", "output_stride", "weights"} <= set(v2)
    with pytest.raises(ValueError, match="unknown backbone 'mobilenet_v4'; expected one of"):
        build_backbone("mobilenet_v4")
    with pytest.raises(TypeError):
        build_backbone("mobilenet_v2", minimal=True)


def test_named_builders_are_build_backbone_with_a_classifier() -> None:
    torch.manual_seed(0)
    a = mobilenet_v3_large(width_mult=0.75)
    torch.manual_seed(0)
    b = build_backbone("mobilenet_v3_large", num_classes=1000, width_mult=0.75)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_a_head_refuses_the_backbone_options_it_cannot_use_in_one_sentence() -> None:
    limits = {"minimal": False, "output_stride": 32}
    check_backbone_limits("ssdlite", limits, {"minimal": False, "output_stride": None})
    with pytest.raises(
        UnsupportedBackbone,
        match=r"^backbone\.output_stride=16 is not supported by head=ssdlite; expected 32$",
    ):
        check_backbone_limits("ssdlite", limits, {"minimal": False, "output_stride": 16})
