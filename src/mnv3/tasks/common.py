"""Small pieces every task shares: plain-hparams check, image logging, the non-finite-loss stop."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PLAIN_SCALARS = (str, int, float, bool, type(None))


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


def check_plain(value: Any, where: str = "hparams") -> None:
    """Raise TypeError unless ``value`` is built only of dicts, lists, tuples and plain scalars.

    Lightning saves constructor arguments into every checkpoint; anything else (OmegaConf
    containers, modules, partials) would make ``torch.load(weights_only=True)`` refuse the file.
    """
    if isinstance(value, PLAIN_SCALARS):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            check_plain(v, f"{where}.{k}")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}; checkpoints keep only plain Python types "
        "(convert configs with OmegaConf.to_container(resolve=True))"
    )


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_png(array: Any, path: Path) -> None:
    """A uint8 ``(H, W)`` label map (8-bit gray) or ``(H, W, 3)`` picture (a tensor or a numpy
    array) as a PNG, written atomically (a killed run leaves no half-written file)."""
    from PIL import Image

    from mnv3.deploy.common import atomic_output  # the one home of atomic writes; lazy: start-up

    pixels = array.numpy() if hasattr(array, "numpy") else array
    with atomic_output(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def log_images(
    loggers: Iterable[Any], key: str, paths: Sequence[Path], step: int | None = None
) -> None:
    """Send image files to every logger that takes images (W&B, TensorBoard); others skip them."""
    for logger in loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            logger.log_image(key=key, images=[str(p) for p in paths], step=step)
        elif name == "TensorBoardLogger":
            import numpy as np
            from PIL import Image

            for i, p in enumerate(paths):
                array = np.asarray(Image.open(p).convert("RGB"))
                logger.experiment.add_image(
                    f"{key}/{i}", array, global_step=step, dataformats="HWC"
                )
