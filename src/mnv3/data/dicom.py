"""DICOM files (``.dcm``) read directly into the uint8 RGB tensors every dataset returns.

Radiographs leave the hospital as DICOM; converting them to PNG first loses what the file says
about how to display it. This module applies it, in the order of the DICOM grayscale pipeline
(PS3.3 C.11 and PS3.4 N.2.1.1):

1. **Modality LUT**: ``Rescale Slope`` / ``Rescale Intercept`` (or a Modality LUT Sequence), via
   pydicom's ``apply_modality_lut``.
2. **VOI**: the first VOI LUT Sequence item (a table, output range from its LUT Descriptor),
   else the first ``Window Center`` / ``Window Width`` with its ``VOI LUT Function`` (LINEAR,
   LINEAR_EXACT, SIGMOID: PS3.3 C.11.2.1.2-3, computed here straight to 0-255), else the range
   of the stored bits (``0 .. 2**BitsStored - 1`` for unsigned data without rescale) or, after a
   rescale, the image's own minimum and maximum.
3. **MONOCHROME1** (bright = low values, as many CR / DX exports) inverted, so bone is bright
   in every image the network sees.

Compressed transfer syntaxes decode through pydicom's own RLE decoder and the pylibjpeg plugins
(JPEG, JPEG-LS, JPEG 2000) of the ``medical`` extra. A file pydicom cannot read, a DICOM with no
pixel data (a structured report, a presentation state) or a transfer syntax with no decoder is an
:class:`~mnv3.data.errors.UnreadableImageError`: the dataset skips it and counts it like any
broken image. Without pydicom installed, the first DICOM file stops the run with one sentence.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from mnv3.data.errors import DatasetError, UnreadableImageError
from mnv3.data.io import scale_to_uint8


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:
        raise DatasetError(
            "reading DICOM (.dcm) files needs pydicom: pip install 'mnv3[medical]' "
            "(make install includes it)"
        ) from None
    return pydicom


def load_dicom(path: str | os.PathLike[str]) -> torch.Tensor:
    """A DICOM image as a ``uint8`` tensor ``(3, H, W)``: gray replicated to RGB, displayed as
    its file says (module docstring); the first frame of a multi-frame file.

    Raises:
        UnreadableImageError: not a readable DICOM image (no pixel data, damaged, no decoder).
        DatasetError: pydicom is not installed.
    """
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    path = os.fspath(path)
    try:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            kind = str(ds.get("Modality", "")) or str(ds.get("SOPClassUID", "unknown class"))
            raise UnreadableImageError(path, f"a DICOM without pixel data ({kind})")
        pixels = ds.pixel_array
    except UnreadableImageError:
        raise
    except (InvalidDicomError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnreadableImageError(path, f"DICOM: {reason}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples == 3:  # colour (pydicom returns RGB): to 8 bits by its stored bits
        rgb = scale_to_uint8(pixels.astype(np.float64), 0.0, float(2 ** int(ds.BitsStored) - 1))
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    gray = display_gray(pixels, ds)
    return torch.from_numpy(np.repeat(gray[None], 3, axis=0))


def display_gray(stored: np.ndarray, ds: Any) -> np.ndarray:
    """Stored grayscale values -> uint8 display values: modality LUT, VOI, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    rescaled = "RescaleSlope" in ds or "ModalityLUTSequence" in ds
    values = apply_modality_lut(stored, ds) if rescaled else stored
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        table, table_bits = voi_lut(values, ds)
        out = scale_to_uint8(table.astype(np.float64), 0.0, float(2**table_bits - 1))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        out = window(values.astype(np.float64), center, width, function)
    elif not rescaled and int(ds.get("PixelRepresentation", 0)) == 0:
        out = scale_to_uint8(values.astype(np.float64), 0.0, float(2 ** int(ds.BitsStored) - 1))
    else:
        out = scale_to_uint8(values.astype(np.float64), float(values.min()), float(values.max()))
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        out = 255 - out
    return out


def voi_lut(values: np.ndarray, ds: Any) -> tuple[np.ndarray, int]:
    """The first VOI LUT Sequence item applied to ``values`` (PS3.3 C.11.2.1.1): values below
    the first mapped one take entry 0, above the last the last entry. Returns the looked-up
    values and the LUT's bits per entry.

    Not pydicom's ``apply_voi``: pydicom 3.0.2 builds its index array in the LUT's own dtype,
    so an 8-bit LUT over 12-bit values wraps every index above 255 (value 4032 read entry 192;
    measured on a file written by ``tests/data/test_dicom.py``).
    """
    item = ds.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2**16  # PS3.3 C.11.1.1: 0 means 65536
    element = item["LUTData"]
    if element.VR == "OW" and isinstance(element.value, bytes):
        little = ds.file_meta.TransferSyntaxUID.is_little_endian if "file_meta" in ds else True
        table = np.frombuffer(element.value, dtype="<u2" if little else ">u2")[:entries]
    else:
        table = np.asarray(element.value, dtype=np.int64)
    index = np.clip(np.asarray(values, dtype=np.int64) - first, 0, len(table) - 1)
    return table[index], bits


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """A VOI window to uint8 0-255 (PS3.3 C.11.2.1.2 LINEAR and LINEAR_EXACT, C.11.2.1.3
    SIGMOID), with the output range ``y_min = 0``, ``y_max = 255``."""
    if function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-6)))
    elif function == "LINEAR_EXACT":
        y = ((values - center) / max(width, 1e-6) + 0.5) * 255.0
    else:  # LINEAR (the default): the window centre sits half a value below ``center``
        span = max(width - 1.0, 1e-6)
        y = ((values - (center - 0.5)) / span + 0.5) * 255.0
    return np.rint(np.clip(y, 0.0, 255.0)).astype(np.uint8)


def _first(value: Any) -> float:
    """The first of a multi-valued DICOM element (Window Center may list several views)."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)
