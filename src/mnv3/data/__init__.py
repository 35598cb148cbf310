"""Datasets, transforms and LightningDataModules. Knows nothing of models; never imports Hydra."""

from mnv3.data.chest_xray import ChestXray14Dataset, CheXpertDataset, PneumoniaDataset
from mnv3.data.chest_xray_labels import (
    CHESTXRAY14_FINDINGS,
    CHEXPERT_COMPETITION_LABELS,
    CHEXPERT_OBSERVATIONS,
    PNEUMONIA_CLASSES,
    UNCERTAIN_POLICIES,
)
from mnv3.data.cityscapes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABELS,
    CITYSCAPES_PALETTE,
    CityscapesSegmentation,
    label_ids_to_train_ids,
    segmentation_palette,
    train_ids_to_label_ids,
)
from mnv3.data.collate import collate_classification, collate_segmentation
from mnv3.data.datamodule import DATASETS, TASK_DATA, DataModule, TaskData, register_dataset
from mnv3.data.errors import (
    DatasetError,
    MissingImageWarning,
    UnreadableImageError,
    UnreadableImageWarning,
)
from mnv3.data.family import DatasetFamily, DatasetSpec
from mnv3.data.folder import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    LabeledImageDataset,
    MultiLabelImageDataset,
    known_labels,
)
from mnv3.data.imagenet import IMAGENET_LAYOUT, imagenet_classes, imagenet_split, read_class_index
from mnv3.data.io import load_rgb
from mnv3.data.presets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationEvalPreset,
    ClassificationTrainPreset,
    SegmentationEvalPreset,
    SegmentationTrainPreset,
    classification_presets,
    segmentation_presets,
)
from mnv3.data.shapes import SHAPE_CLASSES, TEXTURE_CLASSES, generate_shapes, shapes_classes
from mnv3.data.shapes_cityscapes import STREET_CLASSES, generate_shapes_cityscapes
from mnv3.data.transforms import RGBToLuma, channel_stats

__all__ = [
    "CHESTXRAY14_FINDINGS",
    "CHEXPERT_COMPETITION_LABELS",
    "CHEXPERT_OBSERVATIONS",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABELS",
    "CITYSCAPES_PALETTE",
    "DATASETS",
    "IMAGENET_LAYOUT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "PNEUMONIA_CLASSES",
    "SHAPE_CLASSES",
    "STREET_CLASSES",
    "TASK_DATA",
    "TEXTURE_CLASSES",
    "UNCERTAIN_POLICIES",
    "CheXpertDataset",
    "ChestXray14Dataset",
    "CityscapesSegmentation",
    "ClassificationEvalPreset",
    "ClassificationTrainPreset",
    "DataModule",
    "DatasetError",
    "DatasetFamily",
    "DatasetSpec",
    "ImageFolderDataset",
    "LabeledImageDataset",
    "MissingImageWarning",
    "MultiLabelImageDataset",
    "PneumoniaDataset",
    "RGBToLuma",
    "SegmentationEvalPreset",
    "SegmentationTrainPreset",
    "TaskData",
    "UnreadableImageError",
    "UnreadableImageWarning",
    "channel_stats",
    "classification_presets",
    "collate_classification",
    "collate_segmentation",
    "generate_shapes",
    "generate_shapes_cityscapes",
    "imagenet_classes",
    "imagenet_split",
    "known_labels",
    "label_ids_to_train_ids",
    "load_rgb",
    "read_class_index",
    "register_dataset",
    "segmentation_palette",
    "segmentation_presets",
    "shapes_classes",
    "train_ids_to_label_ids",
]
