"""Pure-torch MobileNetV3 / MobileNetV2 models: no Hydra, Lightning or wandb import here."""

from mnv3.models.detection import SSDLite, load_ssdlite_weights, ssdlite320
from mnv3.models.mobilenet import ArchSpec, BlockSpec, FeatureInfo, MobileNet
from mnv3.models.mobilenetv2 import mobilenet_v2, mobilenet_v2_arch
from mnv3.models.mobilenetv3 import mobilenet_v3_arch, mobilenet_v3_large, mobilenet_v3_small
from mnv3.models.optimize import fuse_conv_bn, optimize_for_inference
from mnv3.models.profile import count_madds, count_params
from mnv3.models.registry import (
    DETECTORS,
    MODELS,
    SEGMENTERS,
    build_detector,
    build_model,
    build_segmenter,
)
from mnv3.models.segmentation import Segmenter, load_segmentation_weights, lraspp, raspp

__all__ = [
    "DETECTORS",
    "MODELS",
    "SEGMENTERS",
    "ArchSpec",
    "BlockSpec",
    "FeatureInfo",
    "MobileNet",
    "SSDLite",
    "Segmenter",
    "build_detector",
    "build_model",
    "build_segmenter",
    "count_madds",
    "count_params",
    "fuse_conv_bn",
    "load_segmentation_weights",
    "load_ssdlite_weights",
    "lraspp",
    "mobilenet_v2",
    "mobilenet_v2_arch",
    "mobilenet_v3_arch",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "optimize_for_inference",
    "raspp",
    "ssdlite320",
]
