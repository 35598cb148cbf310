"""Semantic segmentation: LR-ASPP and R-ASPP on dilated MobileNetV3 backbones (paper §6.4, Table 7).

``heads``: the LR-ASPP / R-ASPP heads; ``segmenter``: the :class:`Segmenter` joining a backbone and
a head by named taps; ``checkpoints``: torchvision's key map, known weights and loading;
``builders``: ``lraspp(...)`` / ``raspp(...)`` from plain values.
"""

from mnv3.models.segmentation.builders import lraspp, raspp, segmentation_backbone
from mnv3.models.segmentation.checkpoints import (
    KNOWN_SEGMENTATION_WEIGHTS,
    from_torchvision_segmentation,
    load_segmentation_weights,
)
from mnv3.models.segmentation.heads import LRASPPHead, RASPPHead
from mnv3.models.segmentation.segmenter import Segmenter

__all__ = [
    "KNOWN_SEGMENTATION_WEIGHTS",
    "LRASPPHead",
    "RASPPHead",
    "Segmenter",
    "from_torchvision_segmentation",
    "load_segmentation_weights",
    "lraspp",
    "raspp",
    "segmentation_backbone",
]
