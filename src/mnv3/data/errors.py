"""Errors of the data layer.

``DatasetError`` is a configuration error: the data is not where, or not how, it was said to be.
Its message is one sentence naming the path and the expected layout, so the train entry point can
print it and exit without a traceback. ``UnreadableImageError`` is a per-file problem: the dataset
skips that one image (with a warning) and training goes on.
"""

from __future__ import annotations

import os
from pathlib import Path


class DatasetError(ValueError):
    """A dataset location or layout is wrong; the message names the path and the expected layout."""


def require_root(root: Path, layout: str) -> None:
    """Raise the one-sentence :class:`DatasetError` for a dataset root that is not a folder."""
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist; expected {layout}")


class UnreadableImageError(OSError):
    """An image file cannot be decoded (empty, truncated, corrupt, or not an image at all)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self) -> tuple[type[UnreadableImageError], tuple[str, str]]:
        # OSError pickles its args, not ours; DataLoader workers send exceptions through pickle.
        return (type(self), (self.path, self.reason))


class UnreadableImageWarning(UserWarning):
    """Warned once per unreadable image that a dataset skips, so users can filter or raise it."""


class MissingImageWarning(UserWarning):
    """Warned once per split whose label table names images that are not on disk (rows skipped)."""
