"""DICOM read directly (mnv3.data.dicom): files written here with pydicom, known answers."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")  # the medical extra; make install includes it

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from mnv3.data import UnreadableImageError, load_rgb  # noqa: E402
from mnv3.data.folder import ImageFolderDataset, LabeledImageDataset  # noqa: E402

GRADIENT = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096  # every 12-bit value
WIDE = GRADIENT.astype(np.int64)


def write_dicom(
    path: Path,
    stored: np.ndarray,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    compress: str | None = None,
    **elements,
) -> Path:
    """A DX image as a detector exports it: 16-bit words holding ``bits_stored`` bits."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    frames = stored if stored.ndim == 3 else stored[None]
    ds.Rows, ds.Columns = frames.shape[1:]
    if stored.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = frames.astype(np.uint16).tobytes()
    if compress is not None:
        ds.compress(compress)
    ds.save_as(path, enforce_file_format=True)
    return path


def _gray(image: torch.Tensor) -> np.ndarray:
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    return image[0].numpy().astype(np.int64)


def test_bits_stored_decide_the_scale(tmp_path: Path) -> None:
    full = _gray(load_rgb(write_dicom(tmp_path / "a.dcm", GRADIENT)))
    assert np.array_equal(full, np.rint(WIDE * 255 / 4095))
    dim = _gray(load_rgb(write_dicom(tmp_path / "b.dcm", np.minimum(GRADIENT, 2000))))
    assert dim.max() == round(2000 * 255 / 4095)  # 125: a dim image stays dim, not stretched


def test_monochrome1_with_a_voi_lut_is_looked_up_then_inverted(tmp_path: Path) -> None:
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 8]  # 4096 entries from stored value 0, 8-bit output
    lut.add_new(0x00283006, "US", (np.arange(4096) // 16).tolist())  # LUT Data
    path = write_dicom(tmp_path / "m1.dcm", GRADIENT, photometric="MONOCHROME1")
    ds = pydicom.dcmread(path)
    ds.VOILUTSequence = [lut]
    ds.save_as(path)
    gray = _gray(load_rgb(path))
    assert np.array_equal(gray, 255 - WIDE // 16)  # low values bright, as MONOCHROME1 says


def test_rescale_then_linear_window_hits_the_standard_s_end_points(tmp_path: Path) -> None:
    # Modality values 2 * s - 100; window centre 2000, width 1000: PS3.3 C.11.2.1.2 maps values
    # <= 1500 to 0, > 2499 to 255 and the centre 2000 to (0.5 / 999 + 0.5) * 255 = 127.6.
    stored = np.array([[0, 800, 1050, 1350, 4000]], dtype=np.uint16)
    path = write_dicom(
        tmp_path / "w.dcm",
        stored,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=2000,
        WindowWidth=1000,
    )
    assert _gray(load_rgb(path)).tolist() == [[0, 0, 128, 255, 255]]


def test_sigmoid_voi_function_is_centred_on_the_window(tmp_path: Path) -> None:
    stored = np.array([[1000, 2000, 3000]], dtype=np.uint16)
    path = write_dicom(
        tmp_path / "s.dcm", stored, WindowCenter=2000, WindowWidth=1000, VOILUTFunction="SIGMOID"
    )
    low, mid, high = _gray(load_rgb(path))[0]
    assert mid == 128 and low == round(255 / (1 + np.exp(4))) and high == 255 - low


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_transfer_syntaxes_decode_to_the_same_image(tmp_path: Path, syntax: str) -> None:
    plain = load_rgb(write_dicom(tmp_path / "plain.dcm", GRADIENT))
    packed = load_rgb(write_dicom(tmp_path / "packed.dcm", GRADIENT, compress=syntax))
    assert torch.equal(plain, packed)


def test_a_multi_frame_file_gives_its_first_frame(tmp_path: Path) -> None:
    frames = np.stack([GRADIENT, 4095 - GRADIENT])
    gray = _gray(load_rgb(write_dicom(tmp_path / "mf.dcm", frames)))
    assert np.array_equal(gray, np.rint(WIDE * 255 / 4095))


def test_a_dicom_without_pixels_or_a_broken_one_is_skipped_and_counted(tmp_path: Path) -> None:
    report = write_dicom(tmp_path / "report.dcm", GRADIENT)
    ds = pydicom.dcmread(report)
    del ds.PixelData
    ds.Modality = "SR"
    ds.save_as(report)
    with pytest.raises(UnreadableImageError, match=r"a DICOM without pixel data \(SR\)"):
        load_rgb(report)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a dicom at all")
    with pytest.raises(UnreadableImageError, match="DICOM: "):
        load_rgb(broken)
    good = write_dicom(tmp_path / "good.dcm", GRADIENT)
    dataset = LabeledImageDataset(
        tmp_path, [p.name for p in (report, broken, good)], [0, 0, 0], ["x"]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dataset[i] for i in range(3)]
    assert items[0] is None and items[1] is None and items[2] is not None
    assert sum("skipping" in str(w.message) for w in caught) == 2


def test_an_image_folder_of_dicom_files_is_a_dataset(tmp_path: Path) -> None:
    for label in ("normal", "pneumonia"):
        (tmp_path / "train" / label).mkdir(parents=True)
        write_dicom(tmp_path / "train" / label / "x.dcm", GRADIENT)
    dataset = ImageFolderDataset(tmp_path, "train")
    assert len(dataset) == 2 and dataset.classes == ["normal", "pneumonia"]
    assert dataset[1]["image"].shape == (3, 64, 64) and dataset[1]["label"] == 1
