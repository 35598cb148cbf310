"""ImageNet's held-out split for the block search (MnasNet §5: 50,000 training images ranked on,
the official validation set left for the winner's unbiased top-1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnv3.data import DataModule
from mnv3.data.errors import DatasetError
from mnv3.data.imagenet import holdout_indices

WNIDS = ("n01440764", "n01443537", "n01484850")


def _write_imagenet(root: Path, train_per_class: int = 6, val_per_class: int = 2) -> Path:
    """A tiny ImageNet in its folder layout: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                colour = (40 * c, 20 * i, 200)
                Image.new("RGB", (8, 8), colour).save(folder / f"{wnid}_{split}_{i}.JPEG")
    return root


def _names(dataset) -> list[str]:
    return sorted(Path(dataset.root / p.decode()).name for p in dataset._paths)


def _module(root: Path, **options) -> DataModule:
    return DataModule(
        dataset="imagenet", root=str(root), batch_size=2, num_workers=0, image_size=8,
        resize_size=8, **options,
    )  # fmt: skip


def test_holdout_is_per_class_seeded_and_disjoint_from_training(tmp_path: Path) -> None:
    root = _write_imagenet(tmp_path / "imagenet")
    module = _module(root, holdout_per_class=2, test_split="val")
    train, val, test = (module.get_dataset(k) for k in ("train", "val", "test"))
    assert len(train) == 12 and len(val) == 6 and len(test) == 6
    assert set(_names(train)).isdisjoint(_names(val))
    assert all("_train_" in n for n in _names(train) + _names(val))  # both from train/
    assert all("_val_" in n for n in _names(test))  # the official val folder is the test split
    assert np.bincount(val._labels).tolist() == [2, 2, 2]
    again = _module(root, holdout_per_class=2, test_split="val").get_dataset("val")
    assert _names(again) == _names(val)
    other = _module(root, holdout_per_class=2, split_seed=1).get_dataset("val")
    assert _names(other) != _names(val)


def test_without_holdout_val_is_the_official_folder(tmp_path: Path) -> None:
    root = _write_imagenet(tmp_path / "imagenet")
    module = _module(root)
    assert len(module.get_dataset("train")) == 18
    assert all("_val_" in n for n in _names(module.get_dataset("val")))


def test_holding_out_a_whole_class_is_one_sentence() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    assert holdout_indices(labels, 1, seed=0).size == 2
    with pytest.raises(DatasetError, match=r"holdout_per_class=2 but class 1 has only 2"):
        holdout_indices(labels, 2, seed=0)
