"""Decoding: every supported kind of file gives correct uint8 RGB; damaged files raise."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mnv3.data import UnreadableImageError, load_rgb

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

SOURCE = (200, 30, 90)


def _pixel(image: torch.Tensor) -> list[int]:
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    return image[:, image.shape[1] // 2, image.shape[2] // 2].tolist()


def _close(actual: list[int], expected: tuple[int, ...], tol: int) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


@pytest.mark.parametrize(
    ("name", "mode", "save", "expected", "tol"),
    [
        ("rgb.jpg", "RGB", {"quality": 95}, SOURCE, 4),
        ("gray.jpg", "L", {"quality": 95}, (88, 88, 88), 3),  # ITU-R 601 luma of SOURCE
        ("cmyk.jpg", "CMYK", {"quality": 95}, SOURCE, 4),
        ("palette.png", "P", {}, None, 0),
        ("rgb.bmp", "RGB", {}, SOURCE, 0),  # torchvision refuses BMP: PIL fallback
        ("rgb.tiff", "RGB", {}, SOURCE, 0),
    ],
)
def test_colour_files_decode_to_rgb(
    tmp_path: Path, write_image, name: str, mode: str, save: dict, expected, tol: int
) -> None:
    path = write_image(tmp_path / name, SOURCE, mode=mode, **save)
    image = load_rgb(path)
    assert image.shape == (3, 16, 20)
    if expected is None:  # palette: whatever PIL quantised SOURCE to
        from PIL import Image

        with Image.open(path) as pil:
            expected = pil.convert("RGB").getpixel((10, 8))
    assert _close(_pixel(image), expected, tol), (_pixel(image), expected)


def test_rgba_png_drops_alpha(tmp_path: Path, write_image) -> None:
    path = write_image(tmp_path / "rgba.png", (10, 200, 30, 128))
    assert _pixel(load_rgb(path)) == [10, 200, 30]


@pytest.mark.parametrize("name", ["gray16.png", "gray16.tiff"])  # torchvision path, PIL path
def test_16bit_gray_is_rescaled_not_clipped(tmp_path: Path, write_image, name: str) -> None:
    path = write_image(tmp_path / name, 40000, mode="I;16")
    image = load_rgb(path)
    assert image.dtype == torch.uint8
    # 40000 / 65535 * 255 = 155.6; PIL's own convert("RGB") would give 255.
    assert _close(_pixel(image), (156, 156, 156), 1), _pixel(image)


def test_truncated_jpeg_is_unreadable(tmp_path: Path, write_truncated) -> None:
    path = write_truncated(tmp_path / "cut.jpg")
    with pytest.raises(UnreadableImageError, match=r"cut\.jpg"):
        load_rgb(path)


def test_jpeg_missing_only_its_end_marker_is_unreadable(tmp_path: Path, write_image) -> None:
    path = write_image(tmp_path / "eoi.jpg", SOURCE, size=(64, 48))
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UnreadableImageError):
        load_rgb(path)


def test_truncated_png_is_unreadable(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
        path
    )
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(UnreadableImageError):
        load_rgb(path)


@pytest.mark.parametrize("content", [b"", b"this is not an image"])
def test_empty_or_non_image_file_is_unreadable(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(UnreadableImageError) as info:
        load_rgb(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


def test_unreadable_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(UnreadableImageError("/x.jpg", "truncated")))
    assert (error.path, error.reason) == ("/x.jpg", "truncated")


def _twelve_bit_png(path: Path, top: int = 4095, significant_bits: int | None = None) -> Path:
    """A 12-bit detector image as hospitals export it: values 0..``top`` in a 16-bit gray PNG,
    optionally with the ``sBIT`` chunk (significant bits) written before the image data."""
    import struct
    import zlib

    from PIL import Image

    values = np.linspace(0, top, 32 * 48).reshape(32, 48).round().astype(np.uint16)
    Image.fromarray(values).save(path)
    if significant_bits is not None:
        data = path.read_bytes()
        ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR length + type, its 13 bytes, CRC
        body = b"sBIT" + bytes([significant_bits])
        chunk = struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body))
        path.write_bytes(data[:ihdr_end] + chunk + data[ihdr_end:])
    return path


@pytest.mark.parametrize("name", ["xray.png", "xray.tiff"])  # torchvision path, PIL path
def test_a_12_bit_xray_in_a_16_bit_file_spans_0_to_255_by_its_range(
    tmp_path: Path, name: str
) -> None:
    from PIL import Image

    path = tmp_path / name
    if name.endswith(".png"):
        _twelve_bit_png(path)
    else:
        values = np.linspace(0, 4095, 32 * 48).reshape(32, 48).round().astype(np.uint16)
        Image.fromarray(values).save(path)
    assert load_rgb(path).max() == 15  # the top byte: what photographs keep (4095 >> 8)
    image = load_rgb(path, wide="range")
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 48)
    assert image.min() == 0 and image.max() == 255
    assert torch.equal(image[0], image[2])


def test_the_png_s_significant_bits_decide_the_scale_when_declared(tmp_path: Path) -> None:
    from mnv3.data.io import png_significant_bits

    path = _twelve_bit_png(tmp_path / "dim.png", top=2000, significant_bits=12)
    assert png_significant_bits(str(path)) == 12
    image = load_rgb(path, wide="range")
    assert image.max() == round(2000 * 255 / 4095)  # 125: scaled by 12 bits, not stretched
    plain = _twelve_bit_png(tmp_path / "plain.png", top=2000)
    assert png_significant_bits(str(plain)) is None
    # No sBIT: the fewest bits that hold 2000 are 11, so 2000 / 2047 of white, zero stays 0.
    image = load_rgb(plain, wide="range")
    assert image.min() == 0 and image.max() == round(2000 * 255 / 2047)


def test_chest_xray_datasets_read_16_bit_files_by_their_range(tmp_path: Path) -> None:
    from mnv3.data.chest_xray import ChestXray14Dataset, CheXpertDataset, PneumoniaDataset
    from mnv3.data.folder import LabeledImageDataset

    path = _twelve_bit_png(tmp_path / "a.png")
    photos = LabeledImageDataset(tmp_path, ["a.png"], [0], ["x"])
    assert photos[0]["image"].max() == 15

    class Xrays(LabeledImageDataset):
        wide_gray = PneumoniaDataset.wide_gray

    assert Xrays(tmp_path, [path.name], [0], ["x"])[0]["image"].max() == 255
    assert {ChestXray14Dataset.wide_gray, CheXpertDataset.wide_gray} == {"range"}


def test_every_x_ray_family_reads_16_bit_images_as_its_datasets_do() -> None:
    """``mnv3.explain`` reads one image with its run's family's ``wide_gray``: the X-ray families
    must say ``range`` (as their datasets), every other family the top byte."""
    from mnv3.data.datamodule import DATASETS

    xrays = {"chest_xray_pneumonia", "chestxray14", "chexpert", "xray_csv", "xray_generated"}
    assert {name for name, family in DATASETS.items() if family.wide_gray == "range"} == xrays
