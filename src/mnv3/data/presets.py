"""The transform presets of each task, and the factories the data module builds them with.

A preset is the whole preprocessing of one split: training augmentation or evaluation resizing,
then the conversion to float and the normalisation, composed from torchvision.transforms.v2 and
the steps of :mod:`mnv3.data.transforms`. Geometry (resize, crop, flip, auto-augment) runs on
uint8, where it is cheaper than on float and where AutoAugment's colour ops are defined; the
conversion to float and the normalisation come last. Each preset keeps its sizes and mean/std as
attributes so a checkpoint or an export can record exactly what the network was fed.

Gray inputs (``channels=1``): the decoded uint8 RGB image is first reduced to one luma channel
(:class:`~mnv3.data.transforms.RGBToLuma`), so every later step runs on a third of the data, and
it is normalised with one mean/std (the average of three given values).

The factories (:func:`classification_presets`, :func:`detection_presets`,
:func:`segmentation_presets`) give a task's ``(train, eval)`` pair; their keyword arguments are
the task's ``data.*`` options (:data:`mnv3.data.datamodule.TASK_DATA`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, Literal, TypeVar

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from mnv3.data.errors import DatasetError
from mnv3.data.transforms import (
    DetectionSample,
    RandomIoUCropWithBoxes,
    RandomScaleCrop,
    ResizeImageAndMask,
    RGBToLuma,
    channel_stats,
    detection_labels,
    interpolation_mode,
    size_pair,
)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# SSDLite's inputs are scaled to [-1, 1] (mean = std = 0.5), as it was trained (FACTS).
SSD_MEAN_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

# Inception-style evaluation: resize the short side so the centre crop keeps 87.5 % of it.
EVAL_CROP_RATIO = 0.875

AutoAugmentName = Literal["autoaugment", "trivialaugment", "xray"]
SegmentationSample = dict[str, Any]


def _input_steps(channels: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The steps that shape the decoded RGB image into ``channels`` channels, before geometry."""
    return [RGBToLuma()] if channels == 1 else []


_Input = TypeVar("_Input")


class _ComposedPreset(Generic[_Input]):
    """A preset is the ``v2.Compose`` its ``__init__`` builds as ``transform``, applied on call.

    Input: a uint8 CHW image (classification) or a sample dict (detection, segmentation);
    output: the same, augmented or resized and normalised to float32 as the subclass says.
    """

    transform: v2.Compose

    def __call__(self, sample: _Input) -> _Input:
        """Apply the preset to one image or sample."""
        return self.transform(sample)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"

    def resize_recipe(self, input_size: tuple[int, int]) -> dict[str, Any]:
        """How a deployment resizes an image before the network (written beside exports):
        straight to ``input_size`` here; presets that crop say so themselves."""
        return {"to": list(input_size), "interpolation": "bilinear", "crop": None}


class ClassificationTrainPreset(_ComposedPreset[torch.Tensor]):
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


class ClassificationEvalPreset(_ComposedPreset[torch.Tensor]):
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

    def resize_recipe(self, input_size: tuple[int, int]) -> dict[str, Any]:
        """Shorter side to ``resize_size``, then a ``crop_size`` centre crop."""
        return {
            "shorter_side": self.resize_size,
            "center_crop": self.crop_size,
            "interpolation": self.interpolation,
        }


# --- Detection presets: whole sample dicts of tv_tensors (image, boxes, labels, eval_target) ---


class DetectionTrainPreset(_ComposedPreset[DetectionSample]):
    """SSD training augmentation on a detection sample, then a fixed ``size`` x ``size`` resize.

    The defaults are torchvision's ``--data-augmentation ssdlite`` (random IoU crop and horizontal
    flip only); ``zoom_out`` and ``photometric`` add the rest of the SSD paper's augmentation.
    Boxes move with the pixels (``tv_tensors``); boxes left smaller than one pixel are removed
    together with their labels. ``eval_target``, ``image_id`` and ``orig_size`` pass through.

    Input: a sample with a uint8 ``image``, ``boxes`` and ``labels``. Output: the same dict with
    a float32 ``(3, size, size)`` image normalised with ``mean`` / ``std``.
    """

    def __init__(
        self,
        size: int = 320,
        mean: Sequence[float] = SSD_MEAN_STD,
        std: Sequence[float] = SSD_MEAN_STD,
        hflip_prob: float = 0.5,
        iou_crop: bool = True,
        zoom_out: bool = False,
        photometric: bool = False,
    ) -> None:
        self.size = int(size)
        self.mean = channel_stats(mean, "mean", 3)
        self.std = channel_stats(std, "std", 3)
        self.hflip_prob = float(hflip_prob)
        self.iou_crop = bool(iou_crop)
        self.zoom_out = bool(zoom_out)
        self.photometric = bool(photometric)

        steps: list[Callable[..., Any]] = []
        if self.photometric:
            steps.append(v2.RandomPhotometricDistort(p=1.0))
        if self.zoom_out:
            # The canvas is filled with the mean colour, which normalises to zero (SSD §3.6).
            fill = tuple(round(255 * m) for m in self.mean)
            steps.append(v2.RandomZoomOut(fill={tv_tensors.Image: fill, "others": 0}))
        if self.iou_crop:
            steps.append(RandomIoUCropWithBoxes())
        if self.hflip_prob > 0:
            steps.append(v2.RandomHorizontalFlip(self.hflip_prob))
        steps += [
            v2.Resize((self.size, self.size), antialias=True),
            v2.SanitizeBoundingBoxes(labels_getter=detection_labels),
            # A dtype (not a dict) converts images only: boxes stay float, labels int64.
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(self.mean, self.std),
        ]
        self.transform = v2.Compose(steps)


class DetectionEvalPreset(_ComposedPreset[DetectionSample]):
    """Evaluation preprocessing of a detection sample: resize to ``size`` x ``size``, normalise.

    ``boxes`` are resized with the image; ``eval_target`` stays in original pixels, and
    ``orig_size`` tells where predictions must be scaled back to.
    """

    def __init__(
        self,
        size: int = 320,
        mean: Sequence[float] = SSD_MEAN_STD,
        std: Sequence[float] = SSD_MEAN_STD,
    ) -> None:
        self.size = int(size)
        self.mean = channel_stats(mean, "mean", 3)
        self.std = channel_stats(std, "std", 3)
        self.transform = v2.Compose(
            [
                v2.Resize((self.size, self.size), antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )


# --- Segmentation presets: sample dicts of tv_tensors (image, mask, name, orig_size) -----------


class SegmentationTrainPreset(_ComposedPreset[SegmentationSample]):
    """Training augmentation of a segmentation sample: random scale, crop, flip, photometric.

    DeepLab's recipe (and the paper's LR-ASPP training, §6.4): rescale by a random factor in
    ``scale_range``, take a random ``crop_size`` crop (padding where the scaled image is smaller:
    the mask with 255 so the loss ignores it, the image with the mean colour so it normalises to
    0), flip horizontally, and jitter brightness, contrast and saturation. Masks move with the
    pixels (``tv_tensors.Mask``, nearest-exact resizing) and stay uint8; ``name`` and
    ``orig_size`` pass through.

    Mean / std default to ImageNet's, the statistics of the torchvision backbone weights a run
    may start from; TensorFlow's DeepLab scales to [-1, 1] (``mean = std = 0.5``), which a config
    can set. From scratch either works.

    Input: ``{"image": uint8 Image, "mask": Mask, ...}``. Output: the same dict with a float32
    ``(3, crop_h, crop_w)`` normalised image and a ``(crop_h, crop_w)`` mask.
    """

    def __init__(
        self,
        crop_size: int | Sequence[int] = 769,
        scale_range: Sequence[float] = (0.5, 2.0),
        hflip_prob: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.crop_size = size_pair(crop_size, "crop_size")
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.hflip_prob = float(hflip_prob)
        self.photometric = bool(photometric)
        self.mean = channel_stats(mean, "mean", 3)
        self.std = channel_stats(std, "std", 3)
        fill = [round(255 * m) for m in self.mean]
        steps: list[Callable[..., Any]] = [RandomScaleCrop(self.crop_size, self.scale_range, fill)]
        if self.hflip_prob > 0:
            steps.append(v2.RandomHorizontalFlip(self.hflip_prob))
        if self.photometric:
            # On the crop, the smallest image of the pipeline; no hue shift: colour is a cue
            # (sky, vegetation) and hue rotation is the costliest jitter on uint8.
            steps.append(v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        self.transform = v2.Compose(steps)


class SegmentationEvalPreset(_ComposedPreset[SegmentationSample]):
    """Evaluation preprocessing of a segmentation sample: the whole image, normalised.

    Cityscapes is evaluated on the full 1024x2048 frame, so nothing is resized by default.
    ``resize=(h, w)`` (an int: a square) resizes image and mask alike, for quick looks; the
    metric is then at that size, not the official one.
    ``input_size`` is the frame size the network sees, for model summaries: ``resize`` when set,
    else ``frame_size``.
    """

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resize: int | Sequence[int] | None = None,
        frame_size: int | Sequence[int] = (1024, 2048),
    ) -> None:
        self.mean = channel_stats(mean, "mean", 3)
        self.std = channel_stats(std, "std", 3)
        self.resize = None if resize is None else size_pair(resize, "eval resize")
        self.input_size = self.resize or size_pair(frame_size, "frame_size")
        steps: list[Callable[..., Any]] = []
        if self.resize is not None:
            steps.append(ResizeImageAndMask(self.resize))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        self.transform = v2.Compose(steps)


# --- The factories: a task's (train, eval) pair from its data options ---------------------------


def classification_presets(
    image_size: int = 224,
    resize_size: int | None = None,
    interpolation: str = "bilinear",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    hflip_prob: float = 0.5,
    auto_augment: str | None = None,
    random_erase_prob: float = 0.0,
    min_scale: float = 0.08,
    channels: int = 3,
) -> tuple[ClassificationTrainPreset, ClassificationEvalPreset]:
    """Inception-style training crop and resize + centre-crop evaluation (see transforms.py)."""
    if channels not in (1, 3):
        raise DatasetError(f"data.channels must be 1 (gray) or 3 (RGB), got {channels!r}")
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)
    train = ClassificationTrainPreset(
        crop_size=image_size,
        mean=mean,
        std=std,
        interpolation=interpolation,
        hflip_prob=hflip_prob,
        auto_augment=auto_augment,  # type: ignore[arg-type]  # validated by the preset
        random_erase_prob=random_erase_prob,
        scale=(min_scale, 1.0),
        channels=channels,
    )
    evaluation = ClassificationEvalPreset(
        crop_size=image_size,
        resize_size=resize_size,
        mean=mean,
        std=std,
        interpolation=interpolation,
        channels=channels,
    )
    return train, evaluation


def detection_presets(
    image_size: int = 320,
    mean: Sequence[float] = SSD_MEAN_STD,
    std: Sequence[float] = SSD_MEAN_STD,
    hflip_prob: float = 0.5,
    iou_crop: bool = True,
    zoom_out: bool = False,
    photometric: bool = False,
) -> tuple[DetectionTrainPreset, DetectionEvalPreset]:
    """SSD augmentation (torchvision's ``ssdlite``: IoU crop + flip) and a fixed square resize;
    inputs scaled to [-1, 1] by default, as SSDLite was trained (FACTS: mean/std 0.5)."""
    train = DetectionTrainPreset(
        size=image_size,
        mean=mean,
        std=std,
        hflip_prob=hflip_prob,
        iou_crop=iou_crop,
        zoom_out=zoom_out,
        photometric=photometric,
    )
    return train, DetectionEvalPreset(size=image_size, mean=mean, std=std)


def segmentation_presets(
    crop_size: int | Sequence[int] = 769,
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip_prob: float = 0.5,
    photometric: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    eval_resize: int | Sequence[int] | None = None,
    frame_size: int | Sequence[int] = (1024, 2048),
) -> tuple[SegmentationTrainPreset, SegmentationEvalPreset]:
    """DeepLab-style training (random scale 0.5-2.0, crop, flip, photometric) and evaluation on
    the whole frame (``eval_resize`` for quick looks only); ``frame_size`` is the frames' size,
    for model summaries. Crop 769x769 as the paper trained LR-ASPP (§6.4, FACTS)."""
    train = SegmentationTrainPreset(
        crop_size=crop_size,
        scale_range=scale_range,
        hflip_prob=hflip_prob,
        photometric=photometric,
        mean=mean,
        std=std,
    )
    evaluation = SegmentationEvalPreset(
        mean=mean, std=std, resize=eval_resize, frame_size=frame_size
    )
    return train, evaluation
