"""Classification transform presets on uint8 image tensors (torchvision.transforms.v2).

Geometry (resize, crop, flip, auto-augment) runs on uint8, where it is cheaper than on float and
where AutoAugment's colour ops are defined; the conversion to float and the normalisation come last.
Each preset keeps its sizes and mean/std as attributes so a checkpoint or an export can record
exactly what the network was fed.

Gray inputs (``channels=1``): the decoded uint8 RGB image is first reduced to one luma channel
(:class:`RGBToLuma`), so every later step runs on a third of the data, and it is normalised with
one mean/std (the average of three given values).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torchvision.transforms import v2

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Inception-style evaluation: resize the short side so the centre crop keeps 87.5 % of it.
EVAL_CROP_RATIO = 0.875

AutoAugmentName = Literal["autoaugment", "trivialaugment", "xray"]

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


class RGBToLuma:
    """uint8 RGB ``(..., 3, H, W)`` -> uint8 luma ``(..., 1, H, W)``, rounded to nearest.

    ITU-R 601 weights 0.299 / 0.587 / 0.114, computed in integers: the weights sum to exactly 1,
    so a gray image replicated to RGB (what :func:`~mnv3.data.io.load_rgb` returns for gray
    files) comes back as its gray value, bit for bit. torchvision's ``Grayscale`` uses 0.2989 and
    truncates, which turns gray value v into v - 1.
    """

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Reduce one uint8 RGB image (or a batch of them) to one luma channel."""
        if image.dtype != torch.uint8 or image.ndim < 3 or image.shape[-3] != 3:
            raise ValueError(
                f"RGBToLuma expects a uint8 (..., 3, H, W) tensor, got {image.dtype} "
                f"{tuple(image.shape)}"
            )
        weights = torch.tensor(LUMA_WEIGHTS_1000, dtype=torch.int32).view(3, 1, 1)
        weighted = (image.to(torch.int32) * weights).sum(dim=-3, keepdim=True)
        return ((weighted + 500) // 1000).to(torch.uint8)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weights=(0.299, 0.587, 0.114))"


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


def _input_steps(channels: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The steps that shape the decoded RGB image into ``channels`` channels, before geometry."""
    return [RGBToLuma()] if channels == 1 else []


class ClassificationTrainPreset:
    """Training augmentation: Inception-style random resized crop, flip, optional auto-augment.

    Input: a uint8 ``(3, H, W)`` tensor. Output: a float32 ``(channels, crop_size, crop_size)``
    tensor, normalised with ``mean`` / ``std`` (then randomly erased when
    ``random_erase_prob > 0``). ``channels=1`` reduces the input to luma first
    (:class:`RGBToLuma`); ``mean`` / ``std``: 1 or 3 values (see :func:`channel_stats`).
    """

    def __init__(
        self,
        crop_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        hflip_prob: float = 0.5,
        auto_augment: AutoAugmentName | None = None,
        random_erase_prob: float = 0.0,
        scale: tuple[float, float] = (0.08, 1.0),
        channels: int = 3,
    ) -> None:
        self.crop_size = int(crop_size)
        self.channels = int(channels)
        self.mean = channel_stats(mean, "mean", self.channels)
        self.std = channel_stats(std, "std", self.channels)
        self.interpolation = interpolation
        self.hflip_prob = float(hflip_prob)
        self.auto_augment = auto_augment
        self.random_erase_prob = float(random_erase_prob)
        self.scale = (float(scale[0]), float(scale[1]))

        mode = interpolation_mode(interpolation)
        steps: list[Callable[[torch.Tensor], torch.Tensor]] = _input_steps(self.channels)
        steps += [
            v2.RandomResizedCrop(
                self.crop_size, scale=self.scale, interpolation=mode, antialias=True
            )
        ]
        if self.hflip_prob > 0:
            steps.append(v2.RandomHorizontalFlip(self.hflip_prob))
        if auto_augment == "autoaugment":
            steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=mode))
        elif auto_augment == "trivialaugment":
            steps.append(v2.TrivialAugmentWide(interpolation=mode))
        elif auto_augment == "xray":
            # Radiographs: small rotations, scale and shift, exposure changes; never a vertical
            # flip (anatomy has an up), and horizontal flips only if hflip_prob says so.
            steps.append(
                v2.RandomAffine(
                    degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1), interpolation=mode
                )
            )
            steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2))
        elif auto_augment is not None:
            raise ValueError(
                f"unknown auto_augment {auto_augment!r}; expected None, 'autoaugment', "
                "'trivialaugment' or 'xray'"
            )
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        if self.random_erase_prob > 0:
            steps.append(v2.RandomErasing(self.random_erase_prob))
        self.transform = v2.Compose(steps)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Augment one uint8 CHW image into a normalised float32 crop."""
        return self.transform(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


class ClassificationEvalPreset:
    """Evaluation preprocessing: resize the short side, centre crop, normalise.

    ``resize_size=None`` means ``round(crop_size / 0.875)`` (256 for a 224 crop), the ratio of the
    published ImageNet numbers. ``channels`` and ``mean`` / ``std`` as in the training preset.
    """

    def __init__(
        self,
        crop_size: int = 224,
        resize_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        channels: int = 3,
    ) -> None:
        self.crop_size = int(crop_size)
        self.resize_size = (
            round(self.crop_size / EVAL_CROP_RATIO) if resize_size is None else int(resize_size)
        )
        self.channels = int(channels)
        self.mean = channel_stats(mean, "mean", self.channels)
        self.std = channel_stats(std, "std", self.channels)
        self.interpolation = interpolation
        self.transform = v2.Compose(
            [
                *_input_steps(self.channels),
                v2.Resize(
                    self.resize_size,
                    interpolation=interpolation_mode(interpolation),
                    antialias=True,
                ),
                v2.CenterCrop(self.crop_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Preprocess one uint8 CHW image into a normalised float32 centre crop."""
        return self.transform(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"
