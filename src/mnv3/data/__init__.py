"""Datasets, transforms and LightningDataModules. Knows nothing of models; never imports Hydra."""

from mnv3.data.collate import collate_classification
from mnv3.data.datamodule import (
    DATASETS,
    ClassificationDataModule,
    DatasetFamily,
    DatasetSpec,
    register_dataset,
)
from mnv3.data.errors import DatasetError, UnreadableImageError, UnreadableImageWarning
from mnv3.data.folder import IMAGE_EXTENSIONS, ImageFolderDataset, LabeledImageDataset
from mnv3.data.imagenet import IMAGENET_LAYOUT, imagenet_classes, imagenet_split, read_class_index
from mnv3.data.io import load_rgb
from mnv3.data.shapes import SHAPE_CLASSES, generate_shapes, shapes_classes
from mnv3.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationEvalPreset,
    ClassificationTrainPreset,
)

__all__ = [
    "DATASETS",
    "IMAGENET_LAYOUT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "SHAPE_CLASSES",
    "ClassificationDataModule",
    "ClassificationEvalPreset",
    "ClassificationTrainPreset",
    "DatasetError",
    "DatasetFamily",
    "DatasetSpec",
    "ImageFolderDataset",
    "LabeledImageDataset",
    "UnreadableImageError",
    "UnreadableImageWarning",
    "collate_classification",
    "generate_shapes",
    "imagenet_classes",
    "imagenet_split",
    "load_rgb",
    "read_class_index",
    "register_dataset",
    "shapes_classes",
]
