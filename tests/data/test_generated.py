"""write_once, shared by every generator: a racing process that finished first is accepted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mnv3.data import DatasetError
from mnv3.data.generated import MANIFEST, write_once

LAYOUT = "a test tree"


def _competing_writer(root: Path, their_manifest: dict[str, Any]):
    """A write_tree that lets 'another process' finish ``root`` while ours is still staging."""

    def write_tree(out: Path, manifest: dict[str, Any]) -> None:
        (out / "ours.txt").write_text("ours")
        root.mkdir()
        (root / "theirs.txt").write_text("theirs")
        (root / MANIFEST).write_text(json.dumps(their_manifest))

    return write_tree


def test_a_racing_copy_with_the_same_manifest_is_kept_and_staging_removed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    manifest = {"seed": 1}
    assert write_once(root, manifest, _competing_writer(root, manifest), LAYOUT) == root
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST, "theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging folder left
    # Already there: write_tree is not called again.
    assert write_once(root, manifest, _competing_writer(root, manifest), LAYOUT) == root


def test_a_racing_copy_with_other_parameters_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match=r"different parameters \(seed differ"):
        write_once(root, {"seed": 1}, _competing_writer(root, {"seed": 2}), LAYOUT)
    assert (root / "theirs.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
