"""Parameter and multiply-add counts, the two cost figures of the paper's Table 3.

MAdds follow the papers' convention: one multiply-accumulate per weight use in convolutions
and fully connected layers; BatchNorm, activations, pooling and the SE channel scaling are not
counted (they are elementwise, and the papers leave them out).
"""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (BatchNorm running statistics are buffers and are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_madds(
    model: nn.Module, input_size: tuple[int, int] | int = 224, in_channels: int | None = None
) -> int:
    """Multiply-adds of one forward pass on one ``in_channels`` x H x W image.

    ``in_channels`` None: what the model reads (``model.arch.in_channels`` of a
    :class:`~mnv3.models.mobilenet.MobileNet`, 3 for any other module).

    Counted by running the model once with forward hooks on every ``nn.Conv2d`` and
    ``nn.Linear``, so any model (heads, dilated backbones, non-square inputs) is measured by what
    it really computes at that size, not by a formula that could drift from the code.
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    if in_channels is None:
        in_channels = model_in_channels(model)
    total = 0

    def conv_hook(
        module: nn.Conv2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        per_output = kh * kw * module.in_channels // module.groups
        total += output[0].numel() * per_output

    def linear_hook(
        module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        nonlocal total
        total += output[0].numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    # Each module's own mode: a parent in training mode may hold children kept in eval mode.
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model(torch.zeros(1, in_channels, h, w, device=device))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return int(total)


def model_in_channels(model: nn.Module) -> int:
    """Input channels a model reads: its ``arch.in_channels`` when it has one, else 3 (RGB)."""
    arch = getattr(model, "arch", None)
    return int(getattr(arch, "in_channels", 3))
