"""Exponential moving average of model weights (paper §6.1: decay 0.9999)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma(nn.Module):
    """A shadow copy of a model whose weights track an exponential moving average.

    Follows TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``: the effective decay is
    ``min(decay, (1 + n) / (10 + n))``, so early averages are not dominated by the random
    initialisation. BatchNorm running statistics are copied, not averaged, as in the reference
    training. The shadow is a submodule, so it is saved in checkpoints as plain tensors.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buf, buf in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buf.copy_(buf)
        self.num_updates += 1

    def train(self, mode: bool = True) -> ModelEma:
        """The shadow is only ever evaluated: it stays in eval mode whatever its parent does."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)
