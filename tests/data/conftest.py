"""Helpers for the data tests: tiny real image files written into tmp_path (the writers live in
``tests/data_writers.py``, shared with the experiment tests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_writers import write_solid

WriteImage = Callable[..., Path]


@pytest.fixture
def write_image() -> WriteImage:
    """``write_image(path, colour, mode="RGB", size=(w, h), **save_kwargs) -> path``."""
    return write_solid


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG of noise cut in half: its header is valid, its scan data is not complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def write_truncated() -> Callable[[Path], Path]:
    """``write_truncated(path) -> path``: a truncated JPEG."""
    return write_truncated_jpeg
