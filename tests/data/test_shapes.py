"""The generated shapes dataset: deterministic bytes, atomic writes, manifest checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnv3.data import DatasetError, ImageFolderDataset, generate_shapes, shapes_classes

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

SMALL = {"num_classes": 3, "train_per_class": 3, "val_per_class": 2, "test_per_class": 0}


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    a = _tree(generate_shapes(tmp_path / "a", seed=3, image_size=24, **SMALL))
    b = _tree(generate_shapes(tmp_path / "b", seed=3, image_size=24, **SMALL))
    c = _tree(generate_shapes(tmp_path / "c", seed=4, image_size=24, **SMALL))
    assert a == b
    assert len(a) == 3 * (3 + 2) + 1  # images + manifest.json; no test split for 0 per class
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))
    assert not list(tmp_path.glob(".*tmp*"))  # no staging folder left behind


def test_generated_tree_reads_as_an_image_folder(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "shapes", image_size=24, **SMALL)
    train = ImageFolderDataset(root, "train")
    assert train.classes == shapes_classes(3) == ["circle", "square", "triangle"]
    sample = train[0]
    assert sample is not None and sample["image"].shape == (3, 24, 24)


def test_existing_root_same_manifest_is_kept_other_manifest_is_an_error(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "shapes", image_size=24, **SMALL)
    first = root / "train" / "circle" / "circle_00000.png"
    stamp = first.stat().st_mtime_ns
    generate_shapes(root, image_size=24, **SMALL)
    assert first.stat().st_mtime_ns == stamp

    with pytest.raises(DatasetError, match=r"different parameters \(seed differ"):
        generate_shapes(root, seed=1, image_size=24, **SMALL)


def test_foreign_folder_is_not_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.txt").write_text("precious")
    with pytest.raises(DatasetError, match=r"without a manifest.json"):
        generate_shapes(root, **SMALL)
    assert (root / "thesis.txt").read_text() == "precious"


def test_textures_are_deterministic_and_labelled_by_pattern(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    from mnv3.data import generate_shapes
    from mnv3.data.shapes import TEXTURE_CLASSES

    kwargs = dict(
        seed=3,
        num_classes=6,
        train_per_class=2,
        val_per_class=1,
        test_per_class=0,
        image_size=32,
        kind="textures",
    )
    a, b = generate_shapes(tmp_path / "a", **kwargs), generate_shapes(tmp_path / "b", **kwargs)
    assert sorted(p.name for p in (a / "train").iterdir()) == sorted(TEXTURE_CLASSES)
    for f in sorted((a / "train").rglob("*.png")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()
    # Horizontal stripes vary down the columns, not along the rows; vertical stripes the reverse.
    h = np.asarray(Image.open(next((a / "train" / "hstripes").glob("*.png"))), dtype=float)
    v = np.asarray(Image.open(next((a / "train" / "vstripes").glob("*.png"))), dtype=float)
    assert h.std(axis=0).mean() > 2 * h.std(axis=1).mean()
    assert v.std(axis=1).mean() > 2 * v.std(axis=0).mean()
