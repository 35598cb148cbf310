"""Build any model of the zoo by name from plain keyword arguments (what configs hold)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mnv3.models.detection.ssdlite import SSDLite, ssdlite320
from mnv3.models.mobilenet import MobileNet
from mnv3.models.mobilenetv2 import mobilenet_v2
from mnv3.models.mobilenetv3 import mobilenet_v3_large, mobilenet_v3_small
from mnv3.models.segmentation import Segmenter, lraspp, raspp

MODELS: dict[str, Callable[..., MobileNet]] = {
    "mobilenet_v3_large": mobilenet_v3_large,
    "mobilenet_v3_small": mobilenet_v3_small,
    "mobilenet_v2": mobilenet_v2,
}


def build_model(name: str, **kwargs: Any) -> MobileNet:
    """``build_model("mobilenet_v3_small", num_classes=10, width_mult=0.75)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


# Segmenters (paper §6.4) by head name; the backbone is their ``backbone=`` argument.
SEGMENTERS: dict[str, Callable[..., Segmenter]] = {
    "lraspp": lraspp,
    "raspp": raspp,
}


def build_segmenter(name: str, **kwargs: Any) -> Segmenter:
    """``build_segmenter("lraspp", backbone="mobilenet_v3_small", num_classes=19)``."""
    if name not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {name!r}; expected one of {', '.join(SEGMENTERS)}")
    return SEGMENTERS[name](**kwargs)


# Detectors (paper §6.3) by head name; the backbone is their ``backbone=`` argument.
DETECTORS: dict[str, Callable[..., SSDLite]] = {
    "ssdlite320": ssdlite320,
}


def build_detector(name: str, **kwargs: Any) -> SSDLite:
    """``build_detector("ssdlite320", backbone="mobilenet_v3_small", num_classes=7)``."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; expected one of {', '.join(DETECTORS)}")
    return DETECTORS[name](**kwargs)
