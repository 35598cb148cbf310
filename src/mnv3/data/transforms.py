"""The transform steps the task presets (:mod:`mnv3.data.presets`) are built from, on uint8
tensors and sample dicts (torchvision.transforms.v2).

Each step here is what torchvision lacks or gets wrong for this project: an exact integer luma for
gray inputs, SSD's IoU crop that leaves box-less images alone, DeepLab's random scale and crop in
one resize, and an evaluation resize that treats masks as masks. Boxes and masks travel with the
pixels as ``tv_tensors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """Map ``"nearest" | "bilinear" | "bicubic"`` to torchvision's enum."""
    try:
        return _INTERPOLATIONS[name.lower()]
    except KeyError:
        known = ", ".join(_INTERPOLATIONS)
        raise ValueError(f"unknown interpolation {name!r}; expected one of {known}") from None


# ITU-R BT.601 luma weights, in thousandths so that the integer sum of the three is exactly 1000.
LUMA_WEIGHTS_1000: tuple[int, int, int] = (299, 587, 114)


_LUMA_ROWS = 256


class RGBToLuma(v2.Transform):
    """uint8 RGB ``(..., 3, H, W)`` -> uint8 luma ``(..., 1, H, W)``, rounded to nearest.

    ITU-R 601 weights 0.299 / 0.587 / 0.114, computed in integers: the weights sum to exactly 1,
    so a gray image replicated to RGB (what :func:`~mnv3.data.io.load_rgb` returns for gray
    files) comes back as its gray value, bit for bit. torchvision's ``Grayscale`` uses 0.2989 and
    truncates, which turns gray value v into v - 1.

    A ``transforms.v2`` transform that touches images only: in a sample dict, boxes, masks and
    labels pass through unchanged, so it fits any task's pipeline.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Reduce one uint8 RGB image (or a batch of them) to one luma channel."""
        if isinstance(inpt, tv_tensors.BoundingBoxes | tv_tensors.Mask):
            return inpt
        image = inpt.as_subclass(torch.Tensor) if isinstance(inpt, torch.Tensor) else inpt
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"RGBToLuma expects a uint8 tensor image, got {type(inpt).__name__}")
        if image.dtype != torch.uint8 or image.ndim < 3 or image.shape[-3] != 3:
            raise ValueError(
                f"RGBToLuma expects a uint8 (..., 3, H, W) tensor, got {image.dtype} "
                f"{tuple(image.shape)}"
            )
        weights = torch.tensor(LUMA_WEIGHTS_1000, dtype=torch.int32).view(3, 1, 1)
        luma = torch.empty((*image.shape[:-3], 1, *image.shape[-2:]), dtype=torch.uint8)
        # Bands of rows: the int32 intermediates of a whole 8000 x 8000 photo would take 2.7 GB.
        for top in range(0, image.shape[-2], _LUMA_ROWS):
            band = image[..., top : top + _LUMA_ROWS, :].to(torch.int32)
            weighted = (band * weights).sum(dim=-3, keepdim=True)
            luma[..., top : top + _LUMA_ROWS, :] = (weighted + 500) // 1000
        return tv_tensors.wrap(luma, like=inpt) if isinstance(inpt, tv_tensors.Image) else luma

    def extra_repr(self) -> str:
        return "weights=(0.299, 0.587, 0.114)"


def channel_stats(values: Sequence[float], what: str, channels: int = 3) -> tuple[float, ...]:
    """Normalisation values (mean or std) for ``channels`` input channels (1 or 3).

    Three values for three channels; one value for either (broadcast over RGB); three values for
    one gray channel are averaged: gray replicated to RGB has equal channels, and the average is
    the single value that treats them alike.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels}")
    if len(values) not in (1, 3):
        raise ValueError(
            f"{what} needs one value, or one value per RGB channel, got {list(values)}"
        )
    floats = tuple(float(v) for v in values)
    if channels == 1 and len(floats) == 3:
        return (sum(floats) / 3,)
    return floats


# --- Detection: whole sample dicts of tv_tensors (image, boxes, labels, eval_target) ----------

DetectionSample = dict[str, Any]


def detection_labels(sample: DetectionSample) -> torch.Tensor:
    """The training labels that ``SanitizeBoundingBoxes`` must filter along with the boxes.

    Named explicitly rather than found by torchvision's key heuristic: only the training labels
    follow the boxes; the labels inside ``eval_target`` must never be filtered.
    """
    return sample["labels"]


class RandomIoUCropWithBoxes(v2.RandomIoUCrop):
    """SSD's random IoU crop, leaving images without boxes as they are.

    torchvision's crop needs a box centre inside the crop to accept one; with no boxes it keeps
    sampling until its "no crop" option comes up (40 rejected trials per round), which costs time
    and returns the original anyway.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """No crop (empty params) for an image without boxes; torchvision's sampling otherwise."""
        boxes = [x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes)]
        if not boxes or boxes[0].shape[0] == 0:
            return {}
        return super().make_params(flat_inputs)


# --- Segmentation: sample dicts of tv_tensors (image, mask, name, orig_size) -------------------
# Mask value that takes no part in loss or metric (Cityscapes' ignore label, torchmetrics'
# ignore_index); also what padding outside the image is labelled with.
SEGMENTATION_IGNORE_INDEX = 255


def size_pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    """``s`` -> ``(s, s)``; ``(h, w)`` as ints; anything else a one-sentence ValueError."""
    if isinstance(size, int):
        pair = (size, size)
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        pair = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"{what} must be an int or (height, width), got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return pair


class RandomScaleCrop(v2.Transform):
    """Random rescale by a factor in ``scale_range``, then a random ``size`` crop, in one resize.

    Equivalent to resizing the whole image by ``s`` and cropping, but only the source region
    that lands in the crop is resized: at s = 2 on a 1024x2048 frame that is a 385x385 region
    instead of a 2048x4096 image. Where the scaled image is smaller than the crop it is placed at
    a random offset and the rest is padded: images with ``image_fill`` (per channel), masks with
    ``mask_fill``. Images are resized bilinearly with antialiasing, masks with nearest-exact
    (pixel centres, so a mask stays aligned with the bilinear image).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale_range: Sequence[float] = (0.5, 2.0),
        image_fill: Sequence[int] = (0, 0, 0),
        mask_fill: int = SEGMENTATION_IGNORE_INDEX,
    ) -> None:
        super().__init__()
        self.size = size_pair(size, "crop_size")
        low, high = (float(s) for s in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be 0 < low <= high, got {tuple(scale_range)}")
        self.scale_range = (low, high)
        self.image_fill = [int(v) for v in image_fill]
        self.mask_fill = int(mask_fill)

    @staticmethod
    def _axis(length: int, crop: int, scale: float) -> tuple[int, int, int, int]:
        """One axis: (source start, source length, resized length, padding before)."""
        scaled = max(1, round(length * scale))
        if scaled >= crop:
            # The crop lies inside the scaled image: take the source span that maps onto it.
            source = min(length, max(1, round(crop / scale)))
            start = int(torch.randint(0, length - source + 1, ()).item())
            return start, source, crop, 0
        offset = int(torch.randint(0, crop - scaled + 1, ()).item())
        return 0, length, scaled, offset

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the scale, the source window and the placement inside the crop."""
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        scale = low + (high - low) * float(torch.rand(()).item())
        top, source_h, resized_h, pad_top = self._axis(height, self.size[0], scale)
        left, source_w, resized_w, pad_left = self._axis(width, self.size[1], scale)
        return {
            "window": (top, left, source_h, source_w),
            "resized": [resized_h, resized_w],
            "padding": [
                pad_left,
                pad_top,
                self.size[1] - resized_w - pad_left,
                self.size[0] - resized_h - pad_top,
            ],
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Crop the source window, resize it, pad to the crop size (images, masks; rest as is)."""
        is_mask = isinstance(inpt, tv_tensors.Mask)
        if not (is_mask or isinstance(inpt, tv_tensors.Image)):
            return inpt
        out = v2.functional.crop(inpt, *params["window"])
        if is_mask:
            out = v2.functional.resize(
                out, params["resized"], interpolation=v2.InterpolationMode.NEAREST_EXACT
            )
        else:
            out = v2.functional.resize(out, params["resized"], antialias=True)
        if any(params["padding"]):
            fill: int | list[int] = self.mask_fill if is_mask else self.image_fill
            out = v2.functional.pad(out, params["padding"], fill=fill)
        return out

    def extra_repr(self) -> str:
        return f"size={self.size}, scale_range={self.scale_range}"


class ResizeImageAndMask(v2.Transform):
    """Resize images bilinearly (antialiased) and masks with nearest-exact to one fixed size."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = list(size)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            mode = v2.InterpolationMode.NEAREST_EXACT
            return v2.functional.resize(inpt, self.size, interpolation=mode)
        if isinstance(inpt, tv_tensors.Image):
            return v2.functional.resize(inpt, self.size, antialias=True)
        return inpt
