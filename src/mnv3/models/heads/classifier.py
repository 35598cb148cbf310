"""The image-classification head of MobileNetV3 (paper Tables 1 and 2, last three rows).

pool 7x7 -> conv2d 1x1 NBN (1280 or 1024 channels, h-swish) -> dropout -> conv2d 1x1 NBN (k).
On a 1x1 pooled map a 1x1 convolution *is* a fully connected layer, so both are ``nn.Linear``
here (identical parameters and MAdds, and the weight layout of torchvision's checkpoints).
MobileNetV2's head has no hidden layer (``hidden_channels=None``): pool -> dropout -> linear.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mnv3.models.layers import ActivationName, make_activation


class ClassifierHead(nn.Module):
    """Global average pool, optional hidden layer without BN, dropout, and the logits layer."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden_channels: int | None = None,
        activation: ActivationName = "hswish",
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.pre_logits: nn.Linear | None = None
        self.act: nn.Module = nn.Identity()
        if hidden_channels is not None:
            self.pre_logits = nn.Linear(in_channels, hidden_channels)
            self.act = make_activation(activation)
        # Not in-place: after a ReLU (minimal models) it would overwrite what ReLU's backward reads.
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(hidden_channels or in_channels, num_classes)
        self.reset_parameters()

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def reset_parameters(self) -> None:
        """Small-normal weights and zero biases for the linear layers (as the reference models)."""
        for layer in (self.pre_logits, self.fc):
            if layer is not None:
                nn.init.normal_(layer.weight, 0.0, 0.01)
                nn.init.zeros_(layer.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the logits layer with a freshly initialised one for ``num_classes`` classes.

        The hidden 1x1 layer is kept: it is part of what ImageNet pre-training learned, and
        fine-tuning recipes keep it.
        """
        self.fc = nn.Linear(self.fc.in_features, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
        if self.pre_logits is not None:
            x = self.act(self.pre_logits(x))
        return self.fc(self.dropout(x))
