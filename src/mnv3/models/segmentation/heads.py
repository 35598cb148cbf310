"""Segmentation heads of "Searching for MobileNetV3" §6.4: LR-ASPP (Figure 10) and R-ASPP.

LR-ASPP (Lite Reduced Atrous Spatial Pyramid Pooling), on the 1/16 feature ``high`` and the 1/8
feature ``low``:

    high -> 1x1 conv (F filters) -> BN -> ReLU ---------------------.
    high -> avg pool -> 1x1 conv (F) -> sigmoid -> (resize) ------ x -> upsample to 1/8 -> 1x1 conv (k)
    low  -> 1x1 conv (k) ------------------------------------------------------------------------ + -> logits

Gate pooling (``pool``):

- ``"paper"``: Figure 10's average pool, kernel ``scale(crop) = (crop - 1) // os + 1`` (49 for
  769-pixel crops at output stride 16, as TF DeepLab's ``image_pooling_crop_size``), stride
  (16, 20), no padding. The gate grid this gives is resized bilinearly back to the feature map
  (TF DeepLab's ``_resize_bilinear``, corners aligned). On a feature map smaller than the kernel
  the kernel is clamped to the map along that axis, which is global pooling there: at a 769
  crop it *is* global pooling, and a smaller input (512x1024 training crops, tests) never crashes.
- ``"global"``: one average over the whole map (torchvision's ``AdaptiveAvgPool2d(1)``).

R-ASPP (MobileNetV2 paper §6.3, "reduced design of ASPP"; the comparison head of Table 7 rows 1-2
and 5-6): DeepLabv3's ASPP with the atrous 3x3 branches removed, keeping its 1x1 conv branch and
its image-pooling branch (global average pool -> 1x1 conv -> BN -> ReLU, broadcast back), both
with F filters; the two are concatenated and projected by a 1x1 conv (F) + BN + ReLU (DeepLab's
``concat_projection``, dropout 0.1 after it), then a 1x1 conv gives the k logits at 1/16. No 1/8
skip: the skip is what LR-ASPP adds.

Layer names follow torchvision's ``LRASPPHead`` where it has the layer (``low_classifier``,
``high_classifier``), so its checkpoints map by a short table.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from mnv3.models.layers import ConvBNAct

GatePool = Literal["paper", "global"]

# Figure 10: 49x49 average pool with stride (16, 20); 49 = scale(769, 1/16), a 769x769 crop.
PAPER_POOL_CROP = (769, 769)
PAPER_POOL_STRIDE = (16, 20)


def scale_dimension(size: int, output_stride: int) -> int:
    """Feature-map size of an input side at ``output_stride`` (TF DeepLab's ``scale_dimension``).

    ``(size - 1) // os + 1`` is also what our stride-2 convolutions with 'same' padding give.
    """
    return (size - 1) // output_stride + 1


class LRASPPHead(nn.Module):
    """Figure 10's LR-ASPP on (high, low) features; returns logits at the ``low`` resolution.

    Args:
        low_channels: channels of the 1/8 feature (40 for Large's ``C3_first``).
        high_channels: channels of the 1/16 (or 1/32) feature (960, or 480 with the reduced tail).
        num_classes: logits per pixel.
        inter_channels: F, the filters of the 1x1 conv branch and of the gate (128 or 256).
        pool: gate pooling, ``"paper"`` or ``"global"`` (see the module docstring).
        output_stride: the stride of ``high``; sets the paper pool's kernel from the crop size.
        pool_crop_size: the crop the paper pool's kernel is sized for (769x769 in the paper).
        pool_stride: the paper pool's stride on the feature map, (16, 20) in Figure 10 (TF
            DeepLab's released MobileNetV3 commands pass ``image_pooling_stride=4,5``).
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        num_classes: int,
        inter_channels: int = 128,
        pool: GatePool = "paper",
        output_stride: int = 16,
        pool_crop_size: tuple[int, int] = PAPER_POOL_CROP,
        pool_stride: tuple[int, int] = PAPER_POOL_STRIDE,
    ) -> None:
        super().__init__()
        if pool not in ("paper", "global"):
            raise ValueError(f"LR-ASPP pool must be 'paper' or 'global', got {pool!r}")
        self.pool = pool
        self.pool_kernel = tuple(scale_dimension(s, output_stride) for s in pool_crop_size)
        self.pool_stride = tuple(int(s) for s in pool_stride)
        # BN with PyTorch's defaults (eps 1e-5), as torchvision's head, so its weights load as is.
        self.conv = ConvBNAct(high_channels, inter_channels, 1, activation="relu")
        # torchvision's gate conv has no bias (TF DeepLab's has one): parity with its weights.
        self.gate = nn.Conv2d(high_channels, inter_channels, 1, bias=False)
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def gate_pool(self, high: torch.Tensor) -> torch.Tensor:
        """Average-pool ``high`` for the gate: a (gh, gw) grid, 1x1 when global."""
        if self.pool == "global":
            return F.adaptive_avg_pool2d(high, 1)
        h, w = high.shape[-2:]
        kernel = (min(self.pool_kernel[0], h), min(self.pool_kernel[1], w))
        return F.avg_pool2d(high, kernel, self.pool_stride)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        x = self.conv(high)
        gate = torch.sigmoid(self.gate(self.gate_pool(high)))
        if gate.shape[-2:] != (1, 1):
            gate = F.interpolate(gate, size=x.shape[-2:], mode="bilinear", align_corners=True)
        x = F.interpolate(x * gate, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


class RASPPHead(nn.Module):
    """R-ASPP: 1x1 conv branch + image-pooling branch, concat projection, 1x1 logits at 1/16.

    ``low`` is accepted and ignored so every segmentation head has one call signature.
    """

    def __init__(
        self, high_channels: int, num_classes: int, inter_channels: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.conv = ConvBNAct(high_channels, inter_channels, 1, activation="relu")
        self.image_pool = ConvBNAct(high_channels, inter_channels, 1, activation="relu")
        self.project = ConvBNAct(2 * inter_channels, inter_channels, 1, activation="relu")
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, high: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.image_pool(F.adaptive_avg_pool2d(high, 1))
        branches = (self.conv(high), pooled.expand(-1, -1, *high.shape[-2:]))
        return self.classifier(self.dropout(self.project(torch.cat(branches, dim=1))))
