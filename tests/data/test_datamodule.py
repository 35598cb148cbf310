"""DataModule: classes before setup, loaders, errors, the dataset registry."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from mnv3.data import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataModule,
    DatasetError,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

COLOURS = {"cat": (200, 30, 90), "dog": (10, 250, 128)}


@pytest.fixture
def folder_root(tmp_path: Path, write_image) -> Path:
    """An ImageFolder with two constant-colour classes: 5 training, 2 validation images each."""
    root = tmp_path / "pets"
    for name, colour in COLOURS.items():
        for i in range(5):
            write_image(root / "train" / name / f"{i}.png", colour, size=(40, 30))
        for i in range(2):
            write_image(root / "val" / name / f"{i}.png", colour, size=(40, 30))
    return root


def _module(root: Path, **kwargs) -> DataModule:
    options = {"batch_size": 4, "num_workers": 0, "image_size": 24} | kwargs
    return DataModule(str(root), **options)


def test_classes_before_setup(folder_root: Path, tmp_path: Path) -> None:
    dm = _module(folder_root)
    assert dm.task == "classification"
    assert dm.num_classes == 2 and dm.class_names == ["cat", "dog"]
    assert dm.mean == IMAGENET_MEAN and dm.std == IMAGENET_STD
    assert not dm.has_test

    shapes_root = tmp_path / "shapes"
    shapes = _module(shapes_root, dataset="shapes", generate={"num_classes": 4})
    assert shapes.num_classes == 4
    assert shapes.class_names == ["circle", "cross", "square", "triangle"]
    assert shapes.has_test
    assert not shapes_root.exists()  # known from the parameters, nothing generated


def test_train_batch_shapes_dtypes_and_normalisation(folder_root: Path) -> None:
    dm = _module(folder_root, mean=[0.5, 0.5, 0.5], std=(0.25, 0.5, 1.0))
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 10 images, batch 4, drop_last
    batch = batches[0]
    assert batch["image"].shape == (4, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["skipped"] == 0
    mean, std = torch.tensor(dm.mean), torch.tensor(dm.std)
    for image, label in zip(batch["image"], batch["label"], strict=True):
        colour = torch.tensor(COLOURS[dm.class_names[label]], dtype=torch.float32)
        expected = (colour / 255 - mean) / std
        assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=1e-5)
        assert torch.allclose(image.std(dim=(1, 2)), torch.zeros(3), atol=1e-5)

    val = list(dm.val_dataloader())
    assert [len(b["label"]) for b in val] == [4]
    assert val[0]["label"].tolist() == [0, 0, 1, 1]


def test_shuffle_is_seeded(folder_root: Path) -> None:
    def order(seed: int) -> list[int]:
        dm = _module(folder_root, batch_size=10, seed=seed, hflip_prob=0.0)
        return next(iter(dm.train_dataloader()))["label"].tolist()

    assert order(0) == order(0)
    assert sorted(order(0)) == [0] * 5 + [1] * 5


def test_missing_root_and_missing_split(tmp_path: Path, folder_root: Path) -> None:
    missing = tmp_path / "data" / "nowhere"
    with pytest.raises(DatasetError) as info:
        _ = _module(missing).num_classes
    assert str(missing) in str(info.value) and "train/<class>/" in str(info.value)

    dm = _module(folder_root, val_split="validation")
    with pytest.raises(DatasetError, match=r"pets/validation does not exist; expected"):
        dm.val_dataloader()
    with pytest.raises(DatasetError, match="no test split"):
        dm.test_dataloader()
    with pytest.raises(DatasetError, match="unknown dataset 'no_such_dataset'"):
        _module(folder_root, dataset="no_such_dataset")


def test_imagenet_flat_val_through_the_module(tmp_path: Path, write_image) -> None:
    root = tmp_path / "imagenet"
    for wnid in ("n01440764", "n01443537"):
        write_image(root / "train" / wnid / "a.JPEG", (0, 0, 0), format="JPEG")
    write_image(root / "val" / "ILSVRC2012_val_00000001.JPEG", (0, 0, 0), format="JPEG")
    (root / "labels.txt").write_text("ILSVRC2012_val_00000001.JPEG 1\r\n")
    index = {"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}
    (root / "imagenet_class_index.json").write_text(json.dumps(index))
    dm = _module(root, dataset="imagenet", val_label_file=str(root / "labels.txt"))
    assert dm.class_names == ["tench", "goldfish"]
    assert next(iter(dm.val_dataloader()))["label"].tolist() == [1]
    assert not dm.has_test


def test_shapes_with_two_workers(tmp_path: Path) -> None:
    generate = {"num_classes": 3, "train_per_class": 6, "val_per_class": 2, "test_per_class": 1}
    dm = _module(
        tmp_path / "shapes", dataset="shapes", generate=generate, batch_size=5, num_workers=2
    )
    dm.prepare_data()
    dm.setup("fit")
    labels = torch.cat([b["label"] for b in dm.train_dataloader()])
    assert len(labels) == 15  # 18 images, drop_last
    assert dm.has_test
    dm.setup("test")
    assert sum(len(b["label"]) for b in dm.test_dataloader()) == 3


def test_hparams_are_plain_values(folder_root: Path) -> None:
    class FakeListConfig(list):  # stands in for an OmegaConf container
        pass

    dm = _module(
        folder_root, mean=FakeListConfig([0.5, 0.5, 0.5]), generate={"a": FakeListConfig([1])}
    )
    assert type(dm.hparams["mean"]) is list
    assert type(dm.hparams["generate"]["a"]) is list
    restored = pickle.loads(pickle.dumps(dict(dm.hparams)))
    assert restored["root"] == str(folder_root)


def test_registry_names() -> None:
    assert {"imagefolder", "imagenet", "shapes"} <= set(DATASETS)
