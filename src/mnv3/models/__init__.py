"""Pure-torch MobileNetV3 / MobileNetV2 models: no Hydra, Lightning or wandb import here."""

from mnv3.models.backbone import (
    BACKBONES,
    backbone_arch,
    build_backbone,
    mobilenet_v2,
    mobilenet_v3_large,
    mobilenet_v3_small,
)
from mnv3.models.detection import SSDLite, load_ssdlite_weights, ssdlite320
from mnv3.models.mobilenet import ArchSpec, BlockSpec, FeatureInfo, MobileNet
from mnv3.models.mobilenetv2 import mobilenet_v2_arch
from mnv3.models.mobilenetv3 import V3Table, mobilenet_v3_arch
from mnv3.models.optimize import fuse_conv_bn, optimize_for_inference
from mnv3.models.profile import count_madds, count_params
from mnv3.models.registry import MODELS, build_model
from mnv3.models.segmentation import Segmenter, load_segmentation_weights, lraspp, raspp

__all__ = [
    "BACKBONES",
    "MODELS",
    "ArchSpec",
    "BlockSpec",
    "FeatureInfo",
    "MobileNet",
    "SSDLite",
    "Segmenter",
    "V3Table",
    "backbone_arch",
    "build_backbone",
    "build_model",
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
