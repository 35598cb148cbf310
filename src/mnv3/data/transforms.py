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
from typing import Any, Generic, Literal, TypeVar

import torch
from torchvision import tv_tensors
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
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
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
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
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

SegmentationSample = dict[str, Any]
# Mask value that takes no part in loss or metric (Cityscapes' ignore label, torchmetrics'
# ignore_index); also what padding outside the image is labelled with.
SEGMENTATION_IGNORE_INDEX = 255


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
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
        self.size = _pair(size, "crop_size")
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
        self.crop_size = _pair(crop_size, "crop_size")
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
        self.resize = None if resize is None else _pair(resize, "eval resize")
        self.input_size = self.resize or _pair(frame_size, "frame_size")
        steps: list[Callable[..., Any]] = []
        if self.resize is not None:
            steps.append(_ResizeImageAndMask(self.resize))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        self.transform = v2.Compose(steps)


class _ResizeImageAndMask(v2.Transform):
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
