"""Grad-CAM heat maps for any MobileNet feature tap, and a colour overlay to look at them.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017): the importance of channel ``k`` of a feature map ``A`` for class ``c`` is
the spatial mean of ``d y_c / d A_k``; the heat map is ``ReLU(sum_k alpha_k A_k)``, i.e. where the
channels that raise the class score are active. On the C5 tap (the last conv before pooling) it
localises at 1/32 of the input resolution (1/16 or 1/8 for a dilated network).

Pure torch: the tap's output is caught by a temporary forward hook that hands the rest of the
network a fresh leaf tensor, so gradients are taken with respect to that tensor only. No parameter
gradient is computed or stored, ``requires_grad`` flags are never touched (EMA copies with frozen
parameters work), and it runs even when called under ``torch.no_grad`` or ``torch.inference_mode``
(a Lightning validation hook).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mnv3.models.mobilenet import MobileNet

__all__ = ["colorize", "grad_cam", "overlay_heatmap"]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate in eval mode and put every submodule's own train/eval flag back afterwards.

    Train mode would make dropout random, let BatchNorm mix the images of a batch (so one image's
    gradient would depend on the others) and update the running statistics as a side effect.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _tap_module(model: MobileNet, tap: str) -> nn.Module:
    """The submodule whose output is tap ``tap`` (``model.tap`` lists the valid names on error)."""
    location = model.tap(tap).location
    try:
        module = model.get_submodule(location)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Module):
        raise ValueError(f"tap {tap!r} of {model.arch.name} has no module at {location!r}")
    return module


def _targets(logits: torch.Tensor, target: int | torch.Tensor | None) -> torch.Tensor:
    """Per-image class indices (N,): the top logit by default, else the given index or indices."""
    n, num_classes = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    index = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if index.numel() == 1:
        index = index.expand(n)
    if index.numel() != n:
        raise ValueError(f"target needs one class index per image ({n}), got {index.numel()}")
    if bool(((index < 0) | (index >= num_classes)).any()):
        raise ValueError(f"target {index.tolist()} is out of range for {num_classes} classes")
    return index


def grad_cam(
    model: MobileNet,
    images: torch.Tensor,
    target: int | torch.Tensor | None = None,
    tap: str = "C5",
) -> torch.Tensor:
    """Grad-CAM heat maps of ``images`` for one class each, upsampled to the input size.

    Args:
        model: a MobileNet with a classifier (``num_classes > 0``); evaluated in eval mode, its
            modules' train/eval flags are restored afterwards.
        images: normalised input batch ``(N, 3, H, W)``.
        target: the class to explain: None for each image's top logit (the predicted class of a
            softmax model, the most confident finding of a multi-label one), an int for the same
            class in every image, or an ``(N,)`` tensor of per-image classes.
        tap: the feature tap to explain (``model.feature_info`` names; C5 by default, the map
            the classifier pools).

    Returns:
        float32 ``(N, H, W)`` in [0, 1], detached, each map divided by its own maximum; an
        all-zero map means no location raised the target logit.
    """
    if model.classifier is None:
        raise ValueError(f"{model.arch.name} was built without a classifier (num_classes=0)")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    module = _tap_module(model, tap)
    caught: list[torch.Tensor] = []

    def catch(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        caught.append(leaf)
        # A non-leaf copy goes on, so an in-place op downstream cannot touch the leaf.
        return leaf.clone()

    with torch.inference_mode(False), torch.enable_grad(), _eval_mode(model):
        # Tensors made under inference_mode cannot enter autograd; a clone made here can.
        x = images.clone() if images.is_inference() else images
        handle = module.register_forward_hook(catch)
        try:
            logits = model(x)
        finally:
            handle.remove()
        if len(caught) != 1:
            raise RuntimeError(f"tap {tap!r} ran {len(caught)} times in one forward pass")
        activations = caught[0]
        index = _targets(logits.detach(), target)
        score = logits.gather(1, index[:, None]).sum()
        (gradients,) = torch.autograd.grad(score, activations)

    weights = gradients.float().mean(dim=(2, 3), keepdim=True)  # alpha_k, Grad-CAM eq. 1
    cam = F.relu((weights * activations.detach().float()).sum(dim=1, keepdim=True))  # eq. 2
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(torch.finfo(cam.dtype).tiny)
    return (cam / peak[:, None, None]).clamp_(0.0, 1.0)


def colorize(heat: torch.Tensor) -> torch.Tensor:
    """Map a heat map ``(H, W)`` in [0, 1] to ``(H, W, 3)`` uint8 RGB with a jet-like colour map.

    Blue (0) -> cyan -> yellow -> red (1): each channel is a clipped tent function of the value,
    a three-line stand-in for matplotlib's "jet".
    """
    v = heat.detach().float().clamp(0.0, 1.0)[..., None]
    centres = torch.tensor(
        [3.0, 2.0, 1.0], device=v.device
    )  # red, green, blue peaks at 3/4, 1/2, 1/4
    rgb = (1.5 - (4.0 * v - centres).abs()).clamp(0.0, 1.0)
    return (rgb * 255.0).round().to(torch.uint8)


def overlay_heatmap(
    image_uint8_chw: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5
) -> np.ndarray:
    """Blend a coloured heat map onto an image, for display.

    Args:
        image_uint8_chw: the image as uint8 ``(3, H, W)`` RGB or ``(1, H, W)`` gray.
        heat: ``(h, w)`` in [0, 1]; resized (bilinear) to ``(H, W)`` when the sizes differ.
        alpha: weight of the heat map colour (0: the image only, 1: the colour map only).

    Returns:
        uint8 ``(H, W, 3)`` numpy array (what PIL's ``Image.fromarray`` and loggers take).
    """
    if image_uint8_chw.ndim != 3 or image_uint8_chw.shape[0] not in (1, 3):
        raise ValueError(
            f"image must be (3, H, W) or (1, H, W), got shape {tuple(image_uint8_chw.shape)}"
        )
    if image_uint8_chw.shape[0] == 1:  # a gray model's input: shown as gray RGB
        image_uint8_chw = image_uint8_chw.expand(3, -1, -1)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    height, width = image_uint8_chw.shape[-2:]
    heat = heat.detach().float().cpu()
    if heat.shape != (height, width):
        heat = F.interpolate(heat[None, None], size=(height, width), mode="bilinear")[0, 0]
    image = image_uint8_chw.detach().cpu().permute(1, 2, 0).float()
    blended = (1.0 - alpha) * image + alpha * colorize(heat).float()
    return blended.round().clamp(0, 255).to(torch.uint8).numpy()
