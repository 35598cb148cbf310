"""Object detection: SSDLite on MobileNet backbones (MobileNetV3 paper §6.3, Table 6).

``ssdlite``: the model classes; ``checkpoints``: torchvision's key map and loading;
``builders``: ``ssdlite320(...)`` from plain values; ``anchors``, ``box_coder``, ``loss``.
"""

from mnv3.models.detection.anchors import DefaultBoxes
from mnv3.models.detection.box_coder import BoxCoder, match_anchors
from mnv3.models.detection.builders import ssdlite320
from mnv3.models.detection.checkpoints import load_ssdlite_weights
from mnv3.models.detection.loss import detection_loss
from mnv3.models.detection.ssdlite import (
    SSDLite,
    SSDLiteHead,
    resize_and_normalize,
    scale_boxes,
)

__all__ = [
    "BoxCoder",
    "DefaultBoxes",
    "SSDLite",
    "SSDLiteHead",
    "detection_loss",
    "load_ssdlite_weights",
    "match_anchors",
    "resize_and_normalize",
    "scale_boxes",
    "ssdlite320",
]
