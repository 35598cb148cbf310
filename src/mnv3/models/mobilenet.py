"""One network class for every MobileNet the project builds (V2 and all V3 variants).

A network is fully described by an :class:`ArchSpec` of concrete channel counts, built from the
papers' tables by ``mobilenetv3.py`` / ``mobilenetv2.py``. The class takes plain constructor
arguments only (no config system), so notebooks and export scripts import it with nothing else.

Feature taps (the backbone contract): every network exposes ``feature_info``, a list of
:class:`FeatureInfo` (name, channels, stride), and ``forward_taps(x, names)`` returning a dict.
Tap names:

- ``C1`` .. ``C4``: the last layer output at stride 2, 4, 8, 16;
- ``C4_expansion``: the 1x1 expansion output of the first block of the last stage (block 13 of
  Large, block 9 of Small, block 14 of MobileNetV2), the feature SSDLite attaches to (paper §6.2);
- ``C5``: the last 1x1 conv before pooling (960 / 576 / 1280 channels).

Inner taps (``inner_taps``; reachable through ``tap`` and ``forward_taps`` like the levels above,
but not pyramid levels, so ``feature_info`` keeps its one-tap-per-level shape):

- ``C3_first``: the output of the first stride-8 block (block 4 of Large, 40 channels: the 1/8
  feature torchvision's LR-ASPP reads, its ``features[4]``);
- ``C3_depthwise``: the depthwise output (after its activation, before SE) of the last stride-8
  block (Large block 6 = TF's ``layer_7/depthwise_output``, 120 channels; Small block 3 = TF's
  ``layer_4/depthwise_output``, 88 channels): the 1/8 feature TF DeepLab's LR-ASPP reads.

With ``output_stride`` 16 or 8 the later stages are dilated, so taps report their real stride.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mnv3.models.heads.classifier import ClassifierHead
from mnv3.models.layers import ActivationName, ConvBNAct, InvertedResidual


@dataclass(frozen=True)
class BlockSpec:
    """One inverted-residual block with concrete widths (after width multiplier and reduction)."""

    in_channels: int
    expanded_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    use_se: bool
    activation: ActivationName
    dilation: int = 1


@dataclass(frozen=True)
class ArchSpec:
    """A whole network as plain data: stem, blocks, last conv and classifier widths.

    ``blocks`` keep the paper's strides; ``output_stride`` < 32 is applied when the network is
    built (:func:`apply_output_stride`), so the spec reads like the paper's table.
    ``in_channels`` is what the stem conv reads: 3 for RGB, 1 for single-channel (gray) images.
    """

    name: str
    stem_channels: int
    stem_activation: ActivationName
    blocks: tuple[BlockSpec, ...]
    last_channels: int
    last_activation: ActivationName
    head_hidden_channels: int | None
    head_activation: ActivationName
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    output_stride: int = 32
    in_channels: int = 3

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True)
class FeatureInfo:
    """A named feature tap: its channel count, its stride, and where it is taken."""

    name: str
    channels: int
    stride: int
    location: str = field(compare=False)  # "stem", "blocks.{i}", "blocks.{i}.expand", "last_conv"


def apply_output_stride(blocks: Sequence[BlockSpec], output_stride: int) -> tuple[BlockSpec, ...]:
    """Replace strides that would go past ``output_stride`` by dilation (atrous convolution).

    The stem contributes stride 2. Once the running stride reaches ``output_stride``, every later
    stride-2 block keeps its resolution and doubles the dilation instead; the converted block and
    all blocks after it use the new dilation (the convention of torchvision's dilated backbones,
    so their segmentation checkpoints load unchanged).
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    stride, dilation, out = 2, 1, []
    for block in blocks:
        s = block.stride
        if s == 2 and stride >= output_stride:
            dilation *= 2
            s = 1
        else:
            stride *= s
        out.append(
            BlockSpec(
                block.in_channels,
                block.expanded_channels,
                block.out_channels,
                block.kernel_size,
                s,
                block.use_se,
                block.activation,
                dilation,
            )
        )
    return tuple(out)


def feature_taps(arch: ArchSpec) -> list[FeatureInfo]:
    """Compute the tap table of a network: C1..C5 and C4_expansion, with real strides.

    Levels follow the paper's nominal strides (``arch.blocks``); a dilated network reports
    ``min(nominal, output_stride)``, the resolution the tap really has.
    """
    real = lambda nominal: min(nominal, arch.output_stride)  # noqa: E731
    taps: dict[str, FeatureInfo] = {"C1": FeatureInfo("C1", arch.stem_channels, 2, "stem")}
    nominal = 2
    for i, block in enumerate(arch.blocks):
        if block.stride == 2 and nominal == 16:
            taps["C4_expansion"] = FeatureInfo(
                "C4_expansion", block.expanded_channels, real(16), f"blocks.{i}.expand"
            )
        nominal *= block.stride
        level = {2: "C1", 4: "C2", 8: "C3", 16: "C4"}.get(nominal)
        if level is not None:
            taps[level] = FeatureInfo(level, block.out_channels, real(nominal), f"blocks.{i}")
    taps["C5"] = FeatureInfo("C5", arch.last_channels, real(nominal), "last_conv")
    order = ("C1", "C2", "C3", "C4", "C4_expansion", "C5")
    return [taps[name] for name in order]


def inner_feature_taps(arch: ArchSpec) -> list[FeatureInfo]:
    """Taps inside the stride-8 stage that segmentation heads read: C3_first and C3_depthwise.

    Found from the nominal strides like :func:`feature_taps` (the first block that reaches
    stride 8, the last block that stays there), so width, minimal and reduced-tail variants and
    MobileNetV2 get theirs without per-model indices.
    """
    real = min(8, arch.output_stride)
    nominal, stride8 = 2, []
    for i, block in enumerate(arch.blocks):
        nominal *= block.stride
        if nominal == 8:
            stride8.append(i)
    first, last = stride8[0], stride8[-1]
    return [
        FeatureInfo("C3_first", arch.blocks[first].out_channels, real, f"blocks.{first}"),
        FeatureInfo(
            "C3_depthwise", arch.blocks[last].expanded_channels, real, f"blocks.{last}.depthwise"
        ),
    ]


def _block_with_inner(
    block: InvertedResidual, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run one block; return (output, expansion output, depthwise output after its activation).

    The steps are InvertedResidual's own, called by their submodule names, so a fused block
    (:func:`mnv3.models.optimize.fuse_conv_bn`) runs the same way.
    """
    expanded = block.expand(x) if block.expand is not None else x
    depthwise = block.depthwise(expanded)
    out = block.se(depthwise) if block.se is not None else depthwise
    out = block.project(out)
    if block.use_residual:
        out = out + x
    return out, expanded, depthwise


class MobileNet(nn.Module):
    """A MobileNet (V2 or V3) built from an :class:`ArchSpec`.

    ``forward`` returns class logits, or the C5 feature map when built with ``num_classes=0``
    (the form detection and segmentation heads use).
    """

    def __init__(self, arch: ArchSpec, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self.arch = arch
        bn = {"bn_eps": arch.bn_eps, "bn_momentum": arch.bn_momentum}
        self.stem = ConvBNAct(
            arch.in_channels, arch.stem_channels, 3, stride=2, activation=arch.stem_activation, **bn
        )
        self.blocks = nn.Sequential(
            *(
                InvertedResidual(
                    b.in_channels,
                    b.expanded_channels,
                    b.out_channels,
                    b.kernel_size,
                    b.stride,
                    b.activation,
                    use_se=b.use_se,
                    dilation=b.dilation,
                    **bn,
                )
                for b in apply_output_stride(arch.blocks, arch.output_stride)
            )
        )
        self.last_conv = ConvBNAct(
            arch.blocks[-1].out_channels,
            arch.last_channels,
            1,
            activation=arch.last_activation,
            **bn,
        )
        self.classifier: ClassifierHead | None = None
        if num_classes > 0:
            self.classifier = ClassifierHead(
                arch.last_channels,
                num_classes,
                hidden_channels=arch.head_hidden_channels,
                activation=arch.head_activation,
                dropout=dropout,
            )
        self.feature_info: list[FeatureInfo] = feature_taps(arch)
        self.inner_taps: list[FeatureInfo] = inner_feature_taps(arch)
        self._init_weights()

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes if self.classifier is not None else 0

    def backbone_modules(self) -> list[nn.Module]:
        """The feature extractor (stem, blocks, last conv): what fine-tuning freezes or trains
        at a lower lr, as opposed to the classification head."""
        return [self.stem, self.blocks, self.last_conv]

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.classifier is not None:
            self.classifier.reset_parameters()

    def tap(self, name: str) -> FeatureInfo:
        """The :class:`FeatureInfo` of tap ``name``; a clear error lists the valid names."""
        for info in (*self.feature_info, *self.inner_taps):
            if info.name == name:
                return info
        valid = ", ".join(i.name for i in (*self.feature_info, *self.inner_taps))
        raise KeyError(f"{self.arch.name} has no feature tap {name!r}; available: {valid}")

    def reset_classifier(self, num_classes: int) -> None:
        """Re-initialise the logits layer for a new class count (the fine-tuning path)."""
        if self.classifier is None:
            raise ValueError(f"{self.arch.name} was built without a classifier (num_classes=0)")
        self.classifier.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The C5 feature map (the last 1x1 conv, before pooling)."""
        return self.last_conv(self.blocks(self.stem(x)))

    def forward_taps(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Run the backbone only as far as needed and return the requested taps by name."""
        wanted = {self.tap(n).location: n for n in names}
        out: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        if "stem" in wanted:
            out[wanted["stem"]] = x
        for i, block in enumerate(self.blocks):
            if len(out) == len(wanted):
                return out
            expansion_key = f"blocks.{i}.expand"
            depthwise_key = f"blocks.{i}.depthwise"
            if depthwise_key in wanted:
                x, expanded, depthwise = _block_with_inner(block, x)
                out[wanted[depthwise_key]] = depthwise
                if expansion_key in wanted:
                    out[wanted[expansion_key]] = expanded
            elif expansion_key in wanted:
                x, expanded = block.forward_with_expansion(x)
                out[wanted[expansion_key]] = expanded
            else:
                x = block(x)
            if f"blocks.{i}" in wanted:
                out[wanted[f"blocks.{i}"]] = x
        if "last_conv" in wanted:
            out[wanted["last_conv"]] = self.last_conv(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        if self.classifier is None:
            return features
        return self.classifier(features)
