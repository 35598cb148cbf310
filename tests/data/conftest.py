"""Helpers for the data tests: tiny real image files written into tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WriteImage = Callable[..., Path]


def write_solid(
    path: Path,
    colour: tuple[int, ...] | int = (200, 30, 90),
    mode: str = "RGB",
    size: tuple[int, int] = (20, 16),
    **save_kwargs: object,
) -> Path:
    """Write a constant-colour image (converted to ``mode``) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode.startswith("I;16"):
        value = colour if isinstance(colour, int) else colour[0]
        image = Image.fromarray(np.full(size[::-1], value, dtype=np.uint16))
    else:
        rgb = colour if not isinstance(colour, int) else (colour,) * 3
        base_mode = "RGBA" if len(rgb) == 4 else "RGB"
        image = Image.new(base_mode, size, tuple(rgb))
        if mode != base_mode:
            image = image.convert(mode)
    image.save(path, **save_kwargs)
    return path


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
