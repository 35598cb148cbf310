"""Decoding image files into uint8 RGB tensors.

The fast path is torchvision's libjpeg-turbo / libpng decoder straight into a CHW tensor; PIL is the
fallback for formats it refuses (BMP, TIFF, PPM, exotic JPEG variants). What torchvision 0.29 does,
measured, and why each branch below exists:

- grayscale and CMYK JPEGs, palette / RGBA / gray-alpha PNGs, GIF and WebP decode correctly to RGB
  with ``ImageReadMode.RGB``;
- 16-bit PNGs come back as ``uint16`` tensors (values up to 65535), so they are rescaled to uint8;
  PIL is no help there: ``convert("RGB")`` of an ``I;16`` image clips everything above 255 to white.
  How (``wide=``): ``"top_byte"`` keeps the top 8 of 16 bits (torchvision's ``to_dtype(...,
  scale=True)``; photographs and ImageNet-style data, unchanged); ``"range"`` uses the bits the
  image really holds (medical exports: a 12-bit X-ray in a 16-bit PNG, values 0-4095, would
  otherwise become values 0-15, an almost black image): the PNG's ``sBIT`` chunk (significant
  bits) when it has one, else the fewest bits that hold the image's maximum (12 for a 0-4095
  image, 16 for one reaching 40000); either way ``value * 255 / (2**bits - 1)``, linear from 0,
  so one exported dataset scales alike and a true 16-bit image reads as with the top byte;
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


# DICOM files by extension (read by mnv3.data.dicom, the medical extra).
DICOM_EXTENSIONS = (".dcm", ".dicom")

# How an image with more than 8 bits per sample becomes uint8 (see the module docstring).
WIDE_SCALINGS = ("top_byte", "range")


def load_rgb(path: str | os.PathLike[str], wide: str = "top_byte") -> torch.Tensor:
    """Read an image file as a ``uint8`` tensor of shape ``(3, H, W)`` in RGB order.

    Args:
        path: the image file.
        wide: how a 16-bit image becomes 8-bit: ``"top_byte"`` or ``"range"`` (module docstring).

    Raises:
        UnreadableImageError: the file is empty, truncated, corrupt or not an image.
    """
    if wide not in WIDE_SCALINGS:
        raise ValueError(f"wide={wide!r}; expected one of {', '.join(WIDE_SCALINGS)}")
    path = os.fspath(path)
    if path.lower().endswith(DICOM_EXTENSIONS):  # shown as the file says, whatever ``wide``
        from mnv3.data.dicom import load_dicom  # (imports pydicom only for DICOM files)

        return load_dicom(path)
    try:
        image = decode_image(path, mode=ImageReadMode.RGB)
    except RuntimeError as error:
        reason = _last_line(str(error))
        if _DAMAGED.search(reason):
            raise UnreadableImageError(path, reason) from None
        return _load_rgb_pil(path, reason, wide)
    if image.ndim == 4:  # animated GIF / WebP: a stack of frames
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG
        if wide == "range":
            return torch.from_numpy(_to_uint8(image.to(torch.int32).numpy(), path))
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def png_significant_bits(path: str) -> int | None:
    """The bits per sample a PNG declares it really uses (its ``sBIT`` chunk), or None.

    A 12-bit detector image exported to a 16-bit PNG may say ``sBIT = 12``; PIL does not report
    the chunk, so the chunks before the image data are read here (PNG spec, section 11.3.3.4).
    """
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                header = f.read(8)
                if len(header) < 8:
                    return None
                length, kind = int.from_bytes(header[:4], "big"), header[4:]
                if kind in (b"IDAT", b"IEND"):
                    return None
                data = f.read(length)
                f.read(4)  # CRC
                if kind == b"sBIT" and data:
                    return max(data)
    except OSError:
        return None


def _to_uint8(wide: np.ndarray, path: str) -> np.ndarray:
    """``wide`` (non-negative integers, any shape) to uint8 by the bits it holds: the PNG's
    sBIT when declared, else the fewest bits (at least 8) that hold its maximum."""
    bits = png_significant_bits(path)
    if bits is None or not 8 <= bits <= 16:
        bits = max(8, int(wide.max()).bit_length())
    return scale_to_uint8(wide, 0.0, float((1 << bits) - 1))


def scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``low..high`` linearly to 0..255 uint8, clipped and rounded (a flat range gives 0): the
    one rescaling of wide images, 16-bit files here and DICOM display values in mnv3.data.dicom."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.asarray(values, dtype=np.float64) - low) * (255.0 / (high - low))
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


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


def _load_rgb_pil(path: str, torchvision_reason: str, wide: str = "top_byte") -> torch.Tensor:
    """Decode with PIL the files torchvision refused; PIL raises on truncated data by default."""
    try:
        with Image.open(path) as pil:
            pil.load()
            if pil.mode in _WIDE_GRAY_MODES:
                values = np.clip(np.asarray(pil, dtype=np.int64), 0, 65535)
                gray = _to_uint8(values, path) if wide == "range" else (values >> 8)
                array = np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
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
