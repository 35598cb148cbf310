"""Datasets, transforms and LightningDataModules. Knows nothing of models; never imports Hydra."""

from mnv3.data.chest_xray import (
    CHESTXRAY14_FINDINGS,
    CHEXPERT_COMPETITION_LABELS,
    CHEXPERT_OBSERVATIONS,
    PNEUMONIA_CLASSES,
    UNCERTAIN_POLICIES,
    ChestXray14Dataset,
    CheXpertDataset,
    PneumoniaDataset,
)
from mnv3.data.collate import collate_classification
from mnv3.data.datamodule import (
    DATASETS,
    ClassificationDataModule,
    DatasetFamily,
    DatasetSpec,
    register_dataset,
)
from mnv3.data.errors import (
    DatasetError,
    MissingImageWarning,
    UnreadableImageError,
    UnreadableImageWarning,
)
from mnv3.data.folder import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    LabeledImageDataset,
    MultiLabelImageDataset,
    known_labels,
)
from mnv3.data.imagenet import IMAGENET_LAYOUT, imagenet_classes, imagenet_split, read_class_index
from mnv3.data.io import load_rgb
from mnv3.data.shapes import SHAPE_CLASSES, TEXTURE_CLASSES, generate_shapes, shapes_classes
from mnv3.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationEvalPreset,
    ClassificationTrainPreset,
    RGBToLuma,
    channel_stats,
)

__all__ = [
    "CHESTXRAY14_FINDINGS",
    "CHEXPERT_COMPETITION_LABELS",
    "CHEXPERT_OBSERVATIONS",
    "DATASETS",
    "IMAGENET_LAYOUT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "PNEUMONIA_CLASSES",
    "SHAPE_CLASSES",
    "TEXTURE_CLASSES",
    "UNCERTAIN_POLICIES",
    "CheXpertDataset",
    "ChestXray14Dataset",
    "ClassificationDataModule",
    "ClassificationEvalPreset",
    "ClassificationTrainPreset",
    "DatasetError",
    "DatasetFamily",
    "DatasetSpec",
    "ImageFolderDataset",
    "LabeledImageDataset",
    "MissingImageWarning",
    "MultiLabelImageDataset",
    "PneumoniaDataset",
    "RGBToLuma",
    "UnreadableImageError",
    "UnreadableImageWarning",
    "channel_stats",
    "collate_classification",
    "generate_shapes",
    "imagenet_classes",
    "imagenet_split",
    "known_labels",
    "load_rgb",
    "read_class_index",
    "register_dataset",
    "shapes_classes",
]
