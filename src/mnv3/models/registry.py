"""Build any model of the zoo by name from plain keyword arguments (what configs hold)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mnv3.models.mobilenet import MobileNet
from mnv3.models.mobilenetv2 import mobilenet_v2
from mnv3.models.mobilenetv3 import mobilenet_v3_large, mobilenet_v3_small

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
