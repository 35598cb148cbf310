"""The model zoo by kind and name: one registry of every builder, fed with plain keyword arguments.

``MODELS[kind][name]`` is a builder; :func:`build_model` calls it with the plain values a config
holds. Kinds: ``classifier`` (a backbone with its classification head, by backbone name),
``detector`` (paper §6.3) and ``segmenter`` (§6.4), whose backbone is their ``backbone=``
argument, built by :func:`mnv3.models.backbone.build_backbone`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from mnv3.models.backbone import BACKBONES, build_backbone
from mnv3.models.detection.builders import ssdlite320
from mnv3.models.segmentation.builders import lraspp, raspp

MODELS: dict[str, dict[str, Callable[..., nn.Module]]] = {
    "classifier": {name: partial(build_backbone, name, num_classes=1000) for name in BACKBONES},
    "detector": {"ssdlite320": ssdlite320},
    "segmenter": {"lraspp": lraspp, "raspp": raspp},
}


def build_model(kind: str, name: str, **kwargs: Any) -> nn.Module:
    """``build_model("segmenter", "lraspp", backbone="mobilenet_v3_small", num_classes=19)``."""
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(MODELS)}")
    builders = MODELS[kind]
    if name not in builders:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {', '.join(builders)}")
    return builders[name](**kwargs)
