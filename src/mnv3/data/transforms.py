"""Classification transform presets on uint8 image tensors (torchvision.transforms.v2).

Geometry (resize, crop, flip, auto-augment) runs on uint8, where it is cheaper than on float and
where AutoAugment's colour ops are defined; the conversion to float and the normalisation come last.
Each preset keeps its sizes and mean/std as attributes so a checkpoint or an export can record
exactly what the network was fed.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def _triple(values: Sequence[float], what: str) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ValueError(f"{what} needs one value per RGB channel, got {list(values)}")
    return (float(values[0]), float(values[1]), float(values[2]))


class ClassificationTrainPreset:
    """Training augmentation: Inception-style random resized crop, flip, optional auto-augment.

    Input: a uint8 ``(3, H, W)`` tensor. Output: a float32 ``(3, crop_size, crop_size)`` tensor,
    normalised with ``mean`` / ``std`` (then randomly erased when ``random_erase_prob > 0``).
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
    ) -> None:
        self.crop_size = int(crop_size)
        self.mean = _triple(mean, "mean")
        self.std = _triple(std, "std")
        self.interpolation = interpolation
        self.hflip_prob = float(hflip_prob)
        self.auto_augment = auto_augment
        self.random_erase_prob = float(random_erase_prob)
        self.scale = (float(scale[0]), float(scale[1]))

        mode = interpolation_mode(interpolation)
        steps: list[v2.Transform] = [
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
    published ImageNet numbers.
    """

    def __init__(
        self,
        crop_size: int = 224,
        resize_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
    ) -> None:
        self.crop_size = int(crop_size)
        self.resize_size = (
            round(self.crop_size / EVAL_CROP_RATIO) if resize_size is None else int(resize_size)
        )
        self.mean = _triple(mean, "mean")
        self.std = _triple(std, "std")
        self.interpolation = interpolation
        self.transform = v2.Compose(
            [
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
