"""Optimizers and learning-rate schedules of the paper's recipe and the common alternatives.

Paper §6.1 (ImageNet): RMSProp with momentum 0.9 and decay 0.9, initial lr 0.1 at batch 4096,
lr multiplied by 0.99 every 3 epochs, weight decay 1e-5, EMA 0.9999. RMSProp here follows
TensorFlow's update (epsilon inside the square root, mean-square initialised to one), because
PyTorch's form (epsilon outside the root, zero-initialised) takes huge first steps on this model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


class RMSpropTF(torch.optim.Optimizer):
    """RMSProp as in TensorFlow's ``tf.compat.v1.train.RMSPropOptimizer``.

    ms  <- decay * ms + (1 - decay) * g^2          (ms starts at 1, not 0)
    mom <- momentum * mom + lr * g / sqrt(ms + eps)
    w   <- w - mom

    Weight decay is added to the gradient (L2), as the paper's "l2 weight decay 1e-5".
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        decay: float = 0.9,
        momentum: float = 0.9,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or eps <= 0 or not 0 <= decay < 1 or momentum < 0:
            raise ValueError(
                f"invalid RMSpropTF settings lr={lr} eps={eps} decay={decay} momentum={momentum}"
            )
        defaults = {
            "lr": lr,
            "decay": decay,
            "momentum": momentum,
            "eps": eps,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["square_avg"] = torch.ones_like(p)
                    state["momentum_buffer"] = torch.zeros_like(p)
                square_avg = state["square_avg"]
                square_avg.mul_(group["decay"]).addcmul_(grad, grad, value=1 - group["decay"])
                update = grad / (square_avg + group["eps"]).sqrt_()
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update, alpha=group["lr"])
                p.sub_(buf)
        return loss


def param_groups_without_norm_and_bias_decay(
    model: nn.Module, weight_decay: float
) -> list[dict[str, Any]]:
    """Two parameter groups: weights of convs / linears decay; BatchNorm and biases do not.

    Decaying BN scales and biases only shrinks them toward zero with no regularising benefit
    (they do not change the model's capacity), so modern recipes exempt them.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    decay: float = 0.9,
    eps: float | None = None,
    nesterov: bool = True,
    betas: tuple[float, float] | list[float] = (0.9, 0.999),
    param_groups: list[dict[str, Any]] | None = None,
) -> torch.optim.Optimizer:
    """``rmsprop_tf`` (the paper's), ``sgd`` (Nesterov momentum) or ``adamw``.

    ``param_groups`` may be given to override the default grouping (e.g. a lower backbone lr);
    each group may carry its own ``lr``.
    """
    groups = (
        param_groups
        if param_groups is not None
        else param_groups_without_norm_and_bias_decay(model, weight_decay)
    )
    if name == "rmsprop_tf":
        return RMSpropTF(
            groups, lr=lr, decay=decay, momentum=momentum, eps=1e-3 if eps is None else eps
        )
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(
            groups, lr=lr, betas=tuple(betas), eps=1e-8 if eps is None else eps
        )
    raise ValueError(f"unknown optimizer {name!r}; expected rmsprop_tf, sgd or adamw")


class WarmupSchedule:
    """Per-step lr multiplier: linear warmup, then exponential staircase or cosine decay.

    A callable object (not a closure) so LambdaLR can save and restore it in checkpoints as
    plain numbers.
    """

    def __init__(
        self,
        name: str,
        total_steps: int,
        steps_per_epoch: int,
        warmup_steps: int = 0,
        warmup_start_factor: float = 0.01,
        decay_rate: float = 0.99,
        decay_epochs: float = 3.0,
        min_factor: float = 0.0,
    ) -> None:
        if name not in ("exponential", "cosine", "constant"):
            raise ValueError(f"unknown schedule {name!r}; expected exponential, cosine or constant")
        self.name = name
        self.total_steps = max(1, int(total_steps))
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_factor = float(warmup_start_factor)
        self.decay_rate = float(decay_rate)
        self.decay_epochs = float(decay_epochs)
        self.min_factor = float(min_factor)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            t = step / self.warmup_steps
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * t
        if self.name == "constant":
            return 1.0
        if self.name == "exponential":
            # Paper §6.1: x0.99 every 3 epochs, as a staircase on whole decay periods.
            periods = math.floor(step / (self.decay_epochs * self.steps_per_epoch))
            return max(self.min_factor, self.decay_rate**periods)
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    **kwargs: Any,
) -> LambdaLR:
    """A LambdaLR stepped once per optimizer step with :class:`WarmupSchedule`."""
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    return LambdaLR(
        optimizer, WarmupSchedule(name, total_steps, steps_per_epoch, warmup_steps, **kwargs)
    )
