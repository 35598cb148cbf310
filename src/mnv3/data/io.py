"""Decoding image files into uint8 RGB tensors.

The fast path is torchvision's libjpeg-turbo / libpng decoder straight into a CHW tensor; PIL is the
fallback for formats it refuses (BMP, TIFF, PPM, exotic JPEG variants). What torchvision 0.29 does,
measured, and why each branch below exists:

- grayscale and CMYK JPEGs, palette / RGBA / gray-alpha PNGs, GIF and WebP decode correctly to RGB
  with ``ImageReadMode.RGB``;
- 16-bit PNGs come back as ``uint16`` tensors (values up to 65535), so they are rescaled to uint8;
  PIL is no help there: ``convert("RGB")`` of an ``I;16`` image clips everything above 255 to white;
- a truncated JPEG (even one missing only its 2-byte end marker) raises "Image is incomplete or
  truncated" instead of returning a grey-filled image, and a truncated PNG raises "Out of bound read";
- animated GIFs come back as a 4-D stack of frames; the first frame is used, as PIL would;
- EXIF orientation is not applied, matching PIL's ``Image.open`` and hence torchvision's reference
  ImageNet weights.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from mnv3.data.errors import UnreadableImageError, UnreadableImageWarning

# torchvision 0.29 warns on every decode that its codecs move to TorchCodec; one line per image
# would bury real warnings. The decoders still work and are the fastest installed option.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)

# torchvision errors that mean the file itself is damaged: PIL is not tried after these, so a
# global ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` set elsewhere cannot let a half image through.
_DAMAGED = re.compile(r"truncated|incomplete|non empty", re.IGNORECASE)

# PIL modes holding more than 8 bits per sample, rescaled by the top byte like torchvision does.
_WIDE_GRAY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def load_rgb(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an image file as a ``uint8`` tensor of shape ``(3, H, W)`` in RGB order.

    Raises:
        UnreadableImageError: the file is empty, truncated, corrupt or not an image.
    """
    path = os.fspath(path)
    try:
        image = decode_image(path, mode=ImageReadMode.RGB)
    except RuntimeError as error:
        reason = _last_line(str(error))
        if _DAMAGED.search(reason):
            raise UnreadableImageError(path, reason) from None
        return _load_rgb_pil(path, torchvision_reason=reason)
    if image.ndim == 4:  # animated GIF / WebP: a stack of frames
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


Loaded = TypeVar("Loaded")


def skip_unreadable(
    load: Callable[[str | os.PathLike[str]], Loaded], path: str | os.PathLike[str]
) -> Loaded | None:
    """``load(path)``, or None after one :class:`UnreadableImageWarning` naming the file.

    What a dataset's ``__getitem__`` does with a damaged file: it yields None, and the collate
    function drops the sample and counts it in ``"skipped"``; training goes on.
    """
    try:
        return load(path)
    except UnreadableImageError as error:
        # stacklevel 3: the warning points at whoever asked the dataset for the sample.
        warnings.warn(f"skipping {error}", UnreadableImageWarning, stacklevel=3)
        return None


def _load_rgb_pil(path: str, torchvision_reason: str) -> torch.Tensor:
    """Decode with PIL the files torchvision refused; PIL raises on truncated data by default."""
    try:
        with Image.open(path) as pil:
            pil.load()
            if pil.mode in _WIDE_GRAY_MODES:
                wide = np.asarray(pil, dtype=np.int64)
                gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
                array = np.repeat(gray[:, :, None], 3, axis=2)
            else:
                array = np.array(pil.convert("RGB"))  # a writable copy, as torch requires
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        # SyntaxError is what some PIL plugins raise on malformed headers.
        reason = f"{torchvision_reason}; PIL: {error}"
        raise UnreadableImageError(path, reason) from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _last_line(message: str) -> str:
    """torchvision prefixes C++ errors with ``function, file.cpp:line, ``; keep the human part."""
    lines = message.strip().splitlines()
    if not lines:
        return "decode failed"
    return re.sub(r"^[\w()]+, \S+:\d+, ", "", lines[-1])
