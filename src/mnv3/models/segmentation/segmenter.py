"""The segmenter of "Searching for MobileNetV3" §6.4: a dilated backbone and an LR-ASPP / R-ASPP head.

A :class:`Segmenter` joins a ``backbone`` (a :class:`~mnv3.models.mobilenet.MobileNet` without
classifier, its last stage dilated to ``output_stride``) and a ``head``
(:mod:`mnv3.models.segmentation.heads`), fed with backbone taps chosen by name. ``forward``
returns logits at the input size, (N, classes, H, W). Builders: :mod:`.builders`; checkpoints:
:mod:`.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mnv3.models.mobilenet import MobileNet
from mnv3.models.segmentation.heads import LRASPPHead, RASPPHead

# The 1/8 skip: torchvision's (first stride-8 block's output) or TF DeepLab's (last stride-8
# block's depthwise output); see mnv3.models.mobilenet's tap list.
DEFAULT_LOW_TAP = "C3_first"
HIGH_TAP = "C5"


class Segmenter(nn.Module):
    """A backbone and a segmentation head, joined by named taps; logits at the input size.

    ``backbone`` and ``head`` are separate submodules so a task can give them separate
    parameter groups (or freeze the backbone). ``config`` holds the builder's arguments as plain
    values (what hyper-parameters and error messages show).
    """

    def __init__(
        self,
        backbone: MobileNet,
        head: LRASPPHead | RASPPHead,
        low_tap: str | None,
        high_tap: str = HIGH_TAP,
        name: str = "segmenter",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.low_tap = low_tap
        self.high_tap = high_tap
        self.name = name
        self.config = dict(config or {})
        self.num_classes = int(
            head.low_classifier.out_channels
            if isinstance(head, LRASPPHead)
            else head.classifier.out_channels
        )
        self._taps = [high_tap] + ([low_tap] if low_tap is not None else [])

    @property
    def arch(self) -> Any:
        """The backbone's :class:`~mnv3.models.mobilenet.ArchSpec` (input channels, name)."""
        return self.backbone.arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.backbone.forward_taps(x, self._taps)
        low = taps[self.low_tap] if self.low_tap is not None else None
        logits = self.head(taps[self.high_tap], low)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def logits_layers(self) -> list[nn.Conv2d]:
        """The layers whose width is the class count (re-initialised for a new class count)."""
        if isinstance(self.head, LRASPPHead):
            return [self.head.low_classifier, self.head.high_classifier]
        return [self.head.classifier]
