"""Writing a generated dataset once: the manifest check and the atomic build shared by generators.

Every generator (:mod:`mnv3.data.shapes`, :mod:`mnv3.data.shapes_coco`,
:mod:`mnv3.data.shapes_cityscapes`) describes its data by a manifest, the parameters that fully
determine the files, written as ``root/manifest.json``. A root that already holds the same
manifest is reused as it is; one that holds anything else is an error, never overwritten.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnv3.data.errors import DatasetError

MANIFEST = "manifest.json"


def already_generated(root: Path, manifest: dict[str, Any], layout: str) -> bool:
    """True if ``root`` holds exactly this data; False if it is absent or empty.

    Args:
        root: the dataset folder.
        manifest: the parameters the data must have been generated with.
        layout: what ``root`` should hold, in words, for the error messages.

    Raises:
        DatasetError: ``root`` is a file, holds other data, or data made with other parameters.
    """
    if not root.exists():
        return False
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is a file; expected {layout}")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        if not any(root.iterdir()):
            return False
        raise DatasetError(f"dataset root {root} exists without a {MANIFEST}; expected {layout}")
    try:
        existing = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(
            f"manifest {manifest_path} cannot be read ({error}); expected {layout}"
        ) from None
    if existing != manifest:
        changed = sorted(
            key
            for key in set(existing) | set(manifest)
            if not isinstance(existing, dict) or existing.get(key) != manifest.get(key)
        )
        raise DatasetError(
            f"dataset root {root} holds data generated with different parameters "
            f"({', '.join(changed)} differ from {MANIFEST}); delete it or choose another root"
        )
    return True


def write_once(
    root: Path,
    manifest: dict[str, Any],
    write_tree: Callable[[Path, dict[str, Any]], None],
    layout: str,
) -> Path:
    """Have ``write_tree`` write the data of ``manifest`` to ``root``, unless it is already there.

    The tree is built in a temporary folder beside ``root`` (``write_tree(staging, manifest)``,
    then the manifest is added) and renamed into place, so an interrupted run never leaves half a
    dataset, and two processes racing end with one copy.

    Returns:
        ``root``.

    Raises:
        DatasetError: as :func:`already_generated`.
    """
    if already_generated(root, manifest, layout):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write_tree(staging, manifest)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        try:
            # On POSIX a rename replaces an empty folder; a non-empty one means another process
            # finished first, and its data is fine when its manifest matches ours.
            staging.rename(root)
        except OSError:
            if not already_generated(root, manifest, layout):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root
