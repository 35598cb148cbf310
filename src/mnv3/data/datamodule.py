"""One LightningDataModule for every task, and the registry of dataset families it can read.

A dataset family (:class:`~mnv3.data.family.DatasetFamily`) says what it provides, which classes
it has, how to prepare and build a split and which options of its own it takes; each dataset
module declares its family beside the dataset it adapts. The task decides the presets
(augmentation and evaluation transforms, :mod:`mnv3.data.presets`) and the collate function
(:data:`TASK_DATA`). Adding a dataset is one more :data:`DATASETS` entry (or
:func:`register_dataset`); adding a task is one more :data:`TASK_DATA` entry.

The module's constructor takes plain values only, so Hydra can instantiate it from ``_target_`` and
``save_hyperparameters`` stores nothing that needs OmegaConf to unpickle.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from mnv3.cpus import cpu_plan
from mnv3.data.chest_xray import CHESTXRAY14, CHEXPERT, PNEUMONIA
from mnv3.data.cityscapes import CITYSCAPES
from mnv3.data.coco import COCO
from mnv3.data.collate import collate_classification, collate_detection, collate_segmentation
from mnv3.data.errors import DatasetError
from mnv3.data.family import DatasetFamily, DatasetSpec, LabelType, SplitKind, SplitTransform
from mnv3.data.folder import IMAGEFOLDER
from mnv3.data.imagenet import IMAGENET
from mnv3.data.presets import classification_presets, detection_presets, segmentation_presets
from mnv3.data.sampling import eval_sampler
from mnv3.data.shapes import SHAPES, TEXTURES
from mnv3.data.shapes_cityscapes import STREETS
from mnv3.data.shapes_coco import SHAPES_COCO
from mnv3.data.xray_csv import XRAY_CSV
from mnv3.data.xray_generated import XRAY_GENERATED


@dataclass(frozen=True)
class TaskData:
    """What a task's samples need from the data module: presets and batching.

    Attributes:
        presets: ``(**preset options) -> (train transform, eval transform)``; its keyword
            arguments are the task's data options (``data.image_size``, ``data.hflip_prob``...).
        collate: batches a list of samples (``None`` for an unreadable image) into one dict with
            a ``"skipped"`` count.
    """

    presets: Callable[..., tuple[SplitTransform, SplitTransform]]
    collate: Callable[[Sequence[Any]], dict[str, Any]]


TASK_DATA: dict[str, TaskData] = {
    "classification": TaskData(classification_presets, collate_classification),
    "detection": TaskData(detection_presets, collate_detection),
    "segmentation": TaskData(segmentation_presets, collate_segmentation),
}

DATASETS: dict[str, DatasetFamily] = {
    "imagefolder": IMAGEFOLDER,
    "imagenet": IMAGENET,
    "shapes": SHAPES,
    "textures": TEXTURES,
    "coco": COCO,
    "shapes_coco": SHAPES_COCO,
    "cityscapes": CITYSCAPES,
    "shapes_cityscapes": STREETS,
    "chest_xray_pneumonia": PNEUMONIA,
    "chestxray14": CHESTXRAY14,
    "chexpert": CHEXPERT,
    "xray_csv": XRAY_CSV,
    "xray_generated": XRAY_GENERATED,
}


def register_dataset(name: str, family: DatasetFamily) -> None:
    """Make ``dataset=name`` available to :class:`DataModule`."""
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")
    DATASETS[name] = family


def _plain(value: Any) -> Any:
    """Mappings to dicts and sequences to lists, recursively: OmegaConf containers become plain."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


def _split_options(
    dataset: str, family: DatasetFamily, presets: Callable[..., Any], options: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``data.*`` options into the family's own and the task presets' ones.

    Raises:
        DatasetError: an option neither takes, named with what both accept.
    """
    preset_names = [
        name
        for name, p in inspect.signature(presets).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    family_options = {**family.options}
    preset_options: dict[str, Any] = {}
    for name, value in options.items():
        if name in family.options:
            family_options[name] = value
        elif name in preset_names:
            preset_options[name] = value
        else:
            known = sorted({*family.options, *preset_names})
            raise DatasetError(
                f"data.{name}={value!r} is not an option of dataset {dataset!r} "
                f"({family.task}); expected one of {', '.join(known)}"
            )
    return family_options, preset_options


class DataModule(pl.LightningDataModule):
    """Data for any task: a registered dataset family, its task's presets, and the loaders.

    Classification batches are ``{"image": float (N, C, S, S), "label": ..., "skipped": int}``,
    where ``label`` is int64 ``(N,)`` for a ``"multiclass"`` dataset and float32 ``(N, K)`` for a
    ``"multilabel"`` one (see :attr:`label_type`; NaN marks an unknown label to leave out of the
    loss); other tasks' batches are described by their collate function (:data:`TASK_DATA`).
    ``skipped`` counts unreadable images dropped from the batch.

    Args:
        root: dataset root folder (for the generated datasets: where the data is written).
        dataset: a :data:`DATASETS` name (``"imagefolder"``, ``"imagenet"``, ``"shapes"``,
            ``"textures"``, ``"chest_xray_pneumonia"``, ``"chestxray14"``, ``"chexpert"``, ...).
        batch_size: images per batch, for every split.
        num_workers: DataLoader worker processes (0: load in the main process); ``"auto"``:
            sized to the CPUs this process may use (:func:`mnv3.cpus.cpu_plan`).
        pin_memory: pin batches in page-locked memory; None: when CUDA is available.
        persistent_workers: keep workers alive between epochs (only used with workers).
        drop_last: drop the last incomplete training batch.
        val_split: folder of the validation split.
        test_split: folder of the test split; None: there is no test split.
        generate: generator keyword arguments of a generated dataset (its own ``seed``: the data
            does not change with ``seed`` below).
        seed: seed of the training shuffle (and of the workers' augmentation streams).
        **options: the family's own options (:attr:`DatasetFamily.options`: e.g. ``val_fraction``,
            ``split_seed``, ``uncertain``, ``labels``, ``frontal_only`` for the chest X-rays,
            ``val_label_file`` for ImageNet) and the task presets' options (classification:
            ``image_size``, ``resize_size``, ``interpolation``, ``mean``, ``std``,
            ``hflip_prob``, ``auto_augment``, ``random_erase_prob``, ``min_scale``, ``channels``;
            see :func:`classification_presets`). Anything else is an error naming the option.
    """

    def __init__(
        self,
        root: str,
        dataset: str = "imagefolder",
        batch_size: int = 64,
        num_workers: int | str = "auto",
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        drop_last: bool = True,
        val_split: str = "val",
        test_split: str | None = "test",
        generate: Mapping[str, Any] | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise DatasetError(
                f"unknown dataset {dataset!r} for root {root}; expected one of "
                f"{', '.join(sorted(DATASETS))}"
            )
        # Plain values before save_hyperparameters reads them from this frame: a checkpoint's
        # hparams must load with torch.load(weights_only=True), without OmegaConf.
        root = os.fspath(root)
        generate = _plain(generate) if generate is not None else None
        options = _plain(options)
        self.save_hyperparameters()

        self.family = DATASETS[dataset]
        self.task_data = TASK_DATA[self.family.task]
        family_options, preset_options = _split_options(
            dataset, self.family, self.task_data.presets, options
        )
        self.spec = DatasetSpec(
            root=Path(root).expanduser(),
            val_split=val_split,
            test_split=test_split,
            generate=generate or {},
            options=family_options,
        )
        self.batch_size = int(batch_size)
        self.num_workers = cpu_plan(num_workers=num_workers).num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.train_transform, self.eval_transform = self.task_data.presets(**preset_options)
        self._classes: tuple[list[str], list[str]] | None = None
        self._datasets: dict[SplitKind, Dataset] = {}

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the images the evaluation preset feeds the network (the model summary's)."""
        size = None
        # Full-resolution evaluation (segmentation) has no fixed size: the training crop then.
        for transform in (self.eval_transform, self.train_transform):
            for name in ("input_size", "crop_size", "size"):
                size = getattr(transform, name, None) if size is None else size
        size = 224 if size is None else size
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def palette(self) -> list[tuple[int, int, int]] | None:
        """The dataset's colour per class, if it has one (Cityscapes' official colours)."""
        if self.family.palette is None:
            return None
        return self.family.palette(self.class_names)

    @property
    def task(self) -> str:
        """What the samples carry: ``"classification"``, ``"detection"``, ``"segmentation"``."""
        return self.family.task

    # --- what the model needs to know before any image is read ----------------------------------

    def _class_lists(self) -> tuple[list[str], list[str]]:
        if self._classes is None:
            self._classes = self.family.classes(self.spec)
        return self._classes

    @property
    def classes(self) -> list[str]:
        """Class identifiers in label order (folder names, ImageNet wnids)."""
        return list(self._class_lists()[0])

    @property
    def class_names(self) -> list[str]:
        """Human-readable class names in label order; available before ``setup``."""
        return list(self._class_lists()[1])

    @property
    def num_classes(self) -> int:
        """Number of classes; available before ``setup`` (no image is listed)."""
        return len(self._class_lists()[0])

    @property
    def label_type(self) -> LabelType:
        """``"multiclass"`` (int64 class indices) or ``"multilabel"`` (float32 (K,) vectors)."""
        label_type = self.family.label_type
        return label_type(self.spec) if callable(label_type) else label_type

    @property
    def channels(self) -> int:
        """Channels of the batches' images: 3 (RGB) or 1 (gray)."""
        return int(getattr(self.train_transform, "channels", 3))

    @property
    def mean(self) -> tuple[float, ...]:
        """Normalisation mean of both presets (one value per image channel, or one for all)."""
        return self.train_transform.mean

    @property
    def std(self) -> tuple[float, ...]:
        """Normalisation standard deviation of both presets (as :attr:`mean`)."""
        return self.train_transform.std

    @property
    def has_test(self) -> bool:
        """Whether a test split is configured and present."""
        test = self.spec.test_split
        return test is not None and self.family.has_split(self.spec, test)

    # --- Lightning hooks ----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Generate or download the data if the family needs it (once per node)."""
        if self.family.prepare is not None:
            self.family.prepare(self.spec)

    def setup(self, stage: str | None = None) -> None:
        """List the images of the splits a stage needs (listing is cached)."""
        kinds: dict[str | None, tuple[SplitKind, ...]] = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",) if self.has_test else (),
            "predict": ("val",),
            None: ("train", "val", "test") if self.has_test else ("train", "val"),
        }
        for kind in kinds.get(stage, ()):
            self.get_dataset(kind)

    def get_dataset(self, kind: SplitKind) -> Any:
        """The dataset of one split, built on first use with the matching preset."""
        if kind not in self._datasets:
            if kind == "test" and not self.has_test:
                if self.spec.test_split is None:  # COCO, Cityscapes: test labels are withheld
                    raise DatasetError(
                        f"dataset {self.hparams['dataset']} at {self.spec.root} has no test split "
                        "(data.test_split=null); evaluate the validation split with split=val"
                    )
                raise DatasetError(
                    f"dataset root {self.spec.root} has no test split "
                    f"{self.spec.test_split!r}; expected {self.family.layout} plus a test folder"
                )
            transform = self.train_transform if kind == "train" else self.eval_transform
            self._datasets[kind] = self.family.build(self.spec, kind, transform)
        return self._datasets[kind]

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the shuffle is seeded by ``seed`` and the epoch."""
        dataset = self.get_dataset("train")
        drop_last = self.drop_last
        if drop_last and len(dataset) < self.batch_size:
            warnings.warn(
                f"training split has {len(dataset)} images, fewer than batch_size "
                f"{self.batch_size}; keeping the incomplete batch instead of dropping every image",
                stacklevel=2,
            )
            drop_last = False
        # A resumed run reshuffles differently from epoch 0 rather than replaying it.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return self._loader(dataset, shuffle=True, drop_last=drop_last, generator=generator)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in file order; under data parallelism, this rank's unpadded shard."""
        return self._eval_loader(self.get_dataset("val"))

    def test_dataloader(self) -> DataLoader:
        """Test batches in file order (sharded as validation's); DatasetError when there is no
        test split."""
        return self._eval_loader(self.get_dataset("test"))

    def train_eval_dataloader(self, max_images: int | None = None, seed: int = 0) -> DataLoader:
        """Training images through the *evaluation* transform (no augmentation), unsharded.

        What feature statistics are fitted on (the Mahalanobis OOD detector): the images the
        network learned from, seen as evaluation sees them. ``max_images`` caps the pass with a
        seeded random subset (file order would be sorted by class). Every rank reads the same
        images, so every rank fits the same statistics.
        """
        dataset = self.family.build(self.spec, "train", self.eval_transform)
        if max_images is not None and len(dataset) > max_images:
            generator = torch.Generator().manual_seed(seed)
            picked = torch.randperm(len(dataset), generator=generator)[:max_images].sort().values
            dataset = Subset(dataset, picked.tolist())
        return self._loader(dataset)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        """An evaluation split's loader: each image seen once over all ranks
        (:func:`~mnv3.data.sampling.eval_sampler`), so DDP gives the one-process metrics."""
        trainer = self.trainer
        distributed = trainer.distributed_sampler_kwargs if trainer is not None else None
        return self._loader(dataset, sampler=eval_sampler(dataset, distributed))

    def _loader(
        self,
        dataset: Dataset,
        shuffle: bool = False,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        sampler: Sampler | None = None,
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            collate_fn=self.task_data.collate,
        )
