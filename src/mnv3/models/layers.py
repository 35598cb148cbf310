"""Building blocks shared by MobileNetV2 and MobileNetV3.

The block is the MobileNetV2 inverted residual (Sandler et al. 2018, Fig. 3) extended as in
"Searching for MobileNetV3" §5: optional squeeze-excite after the depthwise activation
(hard-sigmoid gate, §5.3) and a per-block choice of non-linearity (ReLU or h-swish, §5.2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

# BatchNorm settings of the reference TensorFlow training (eps 1e-3, decay 0.99 = momentum 0.01).
BN_EPS_V3 = 1e-3
BN_MOMENTUM_V3 = 0.01

ActivationName = str  # "relu", "relu6", "hswish" or "none"


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to the nearest multiple of ``divisor``, never dropping below 90%.

    This is the rounding every MobileNet release uses for widths (TF ``_make_divisible``);
    keeping channels multiples of 8 is what makes them fast on mobile vector units.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return int(rounded)


def make_activation(name: ActivationName) -> nn.Module:
    """Activation module by the name used in the block tables (paper: RE = ReLU, HS = h-swish)."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    if name == "hswish":
        return nn.Hardswish(inplace=True)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}; expected one of relu, relu6, hswish, none")


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation, the unit every MobileNet layer is made of.

    Padding keeps 'same' geometry for odd kernels at any dilation, so a stride-1 dilated layer
    keeps the spatial size (needed for ``output_stride`` 16 / 8).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        activation: ActivationName = "relu",
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.act = make_activation(activation)
        self.out_channels = out_channels


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite with the paper's hard-sigmoid gate (§5.3).

    Global average pool -> 1x1 conv (ReLU) -> 1x1 conv -> hard-sigmoid, then a channel-wise
    scale of the input. The squeeze width is fixed by the caller (MobileNetV3:
    make_divisible(exp / 4, 8), i.e. a quarter of the expansion layer, §5.3).
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.relu(self.reduce(scale), inplace=True)
        scale = F.hardsigmoid(self.expand(scale), inplace=True)
        return x * scale


class InvertedResidual(nn.Module):
    """The inverted residual bottleneck of MobileNetV2, with MobileNetV3's SE and activations.

    1x1 expansion (skipped when the expansion width equals the input width, as in the first
    block of both papers) -> kxk depthwise -> [squeeze-excite] -> 1x1 linear projection, with an
    identity shortcut when stride is 1 and the widths match.
    """

    def __init__(
        self,
        in_channels: int,
        expanded_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        activation: ActivationName,
        use_se: bool = False,
        dilation: int = 1,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        se_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        bn = {"bn_eps": bn_eps, "bn_momentum": bn_momentum}
        self.in_channels = in_channels
        self.expanded_channels = expanded_channels
        self.out_channels = out_channels
        self.stride = stride
        self.use_residual = stride == 1 and in_channels == out_channels

        self.expand: nn.Module | None = None
        if expanded_channels != in_channels:
            self.expand = ConvBNAct(in_channels, expanded_channels, 1, activation=activation, **bn)
        self.depthwise = ConvBNAct(
            expanded_channels,
            expanded_channels,
            kernel_size,
            stride=stride,
            groups=expanded_channels,
            dilation=dilation,
            activation=activation,
            **bn,
        )
        self.se: nn.Module | None = None
        if use_se:
            if se_layer is None:
                se_layer = default_squeeze_excite
            self.se = se_layer(expanded_channels)
        self.project = ConvBNAct(expanded_channels, out_channels, 1, activation="none", **bn)

    def forward_with_expansion(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (block output, expansion-layer output); the latter is SSDLite's C4 tap."""
        expanded = self.expand(x) if self.expand is not None else x
        out = self.depthwise(expanded)
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)
        if self.use_residual:
            out = out + x
        return out, expanded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_expansion(x)[0]


def default_squeeze_excite(expanded_channels: int) -> SqueezeExcite:
    """MobileNetV3's SE: squeeze to make_divisible(exp / 4, 8) channels (paper §5.3)."""
    return SqueezeExcite(expanded_channels, make_divisible(expanded_channels // 4, 8))


@contextlib.contextmanager
def running_stats_for_single_values(network: nn.Module) -> Iterator[None]:
    """Inside the block, a training-mode BatchNorm whose input holds one value per channel
    normalizes with its running statistics (and leaves them as they are) instead of raising.

    A batch of one image reaches 1x1 maps in SSDLite's last extra blocks (and R-ASPP's image
    pooling branch), where batch statistics do not exist: PyTorch raises "Expected more than 1
    value per channel when training". ``data.batch_size=1``, or a batch that unreadable images
    shrank to one, trains those layers as frozen BatchNorm for that step; every other layer,
    and every batch of two or more, is unchanged. The task enters this only for batches of one.
    """
    switched: set[int] = set()

    def before(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        if module.training and x.dim() > 1 and x.numel() == x.shape[1]:
            switched.add(id(module))
            module.train(False)

    def after(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if id(module) in switched:
            switched.discard(id(module))
            module.train(True)

    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_pre_hook(before) for m in norms]
    handles += [m.register_forward_hook(after) for m in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in norms:
            if id(module) in switched:  # an exception inside that module's forward
                module.train(True)
