"""Loading SSDLite checkpoints: torchvision's and this project's, always ``weights_only=True``.

Reading (a path, a URL through the torch.hub cache, or a known name such as
``ssdlite320_mobilenet_v3_large.COCO_V1``) and unwrapping Lightning checkpoints is
:func:`mnv3.models.checkpoints.read_checkpoint`'s job. Formats, told apart by their keys:

- torchvision's ``SSD`` (``backbone.features.0/1...``, ``backbone.extra...``,
  ``head.classification_head.module_list...``), renamed by a key map derived from the model;
- this project's (``backbone.stem...``, ``extra...``, ``head.classification...``).

A checkpoint with another class count keeps everything except the class predictors' last 1x1
convs, which are re-initialised (the fine-tuning path). Any other mismatch is one
:class:`~mnv3.models.checkpoints.CheckpointError` naming the first missing, unexpected and
mis-shaped keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from mnv3.models.checkpoints import (
    KNOWN_WEIGHTS,
    CheckpointError,
    LoadReport,
    read_checkpoint,
    torchvision_module_map,
)
from mnv3.models.detection.ssdlite import INIT_STD, SSDLite


def torchvision_ssdlite_module_map(model: SSDLite) -> dict[str, str]:
    """Map torchvision's SSDLite module names to ours, derived from the model itself.

    torchvision splits its backbone's ``features`` at the C4 block into
    ``backbone.features.0`` (layers up to and including the C4 block's expansion, numbered as
    in the classifier, the expansion as ``0.<c4>``) and ``backbone.features.1`` (the rest of
    the C4 block as ``1.0`` keeping its inner numbering, then the later layers from ``1.1``).
    The classifier's names come from :func:`mnv3.models.checkpoints.torchvision_module_map`.
    """
    c4_block = int(model.backbone.tap("C4_expansion").location.split(".")[1])
    c4 = c4_block + 1  # torchvision's features[0] is the stem
    names: dict[str, str] = {}
    for tv_name, ours in torchvision_module_map(model.backbone).items():
        parts = tv_name.split(".")
        if parts[0] != "features":
            continue  # the classifier
        n, rest = int(parts[1]), parts[2:]
        if n < c4:
            new = ["0", str(n), *rest]
        elif n == c4 and rest[1] == "0":  # rest = [block|conv, layer index, ...]
            new = ["0", str(n), *rest[2:]]
        elif n == c4:
            new = ["1", "0", *rest[1:]]
        else:
            new = ["1", str(n - c4), *rest]
        names["backbone.features." + ".".join(new)] = f"backbone.{ours}"
    for k, block in enumerate(model.extra):
        for j, part in enumerate(block._modules):
            names[f"backbone.extra.{k}.{j}.0"] = f"extra.{k}.{part}.conv"
            names[f"backbone.extra.{k}.{j}.1"] = f"extra.{k}.{part}.bn"
    for tv_head, ours_head in (
        ("classification_head", "classification"),
        ("regression_head", "regression"),
    ):
        for k in range(len(getattr(model.head, ours_head))):
            prefix = f"head.{tv_head}.module_list.{k}"
            names[f"{prefix}.0.0"] = f"head.{ours_head}.{k}.depthwise.conv"
            names[f"{prefix}.0.1"] = f"head.{ours_head}.{k}.depthwise.bn"
            names[f"{prefix}.1"] = f"head.{ours_head}.{k}.project"
    return names


def is_torchvision_ssd_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    """True for torchvision's SSD key layout (``backbone.features.N...``)."""
    return any(k.startswith("backbone.features.") for k in state)


def from_torchvision_ssdlite(
    state: Mapping[str, torch.Tensor], model: SSDLite
) -> dict[str, torch.Tensor]:
    """Rename a torchvision SSDLite state dict to ours (unknown keys kept, for the report)."""
    modules = torchvision_ssdlite_module_map(model)
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        out[f"{modules[module]}.{param}" if module in modules else key] = value
    return out


def _class_predictors(model: SSDLite) -> list[str]:
    return [
        f"head.classification.{k}.project.{p}"
        for k in range(len(model.head.classification))
        for p in ("weight", "bias")
    ]


def load_ssdlite_weights(
    model: SSDLite, source: str | os.PathLike[str], progress: bool = True
) -> LoadReport:
    """Load a detector checkpoint into ``model`` in place; see the module docstring for rules."""
    source = str(source)
    known = KNOWN_WEIGHTS.get(source)
    if known is not None and known.arch != model.name:
        raise CheckpointError(f"weights {source} are for {known.arch}, not {model.name}")
    state = read_checkpoint(source, progress=progress)
    fmt = "mnv3"
    if is_torchvision_ssd_state_dict(state):
        state, fmt = from_torchvision_ssdlite(state, model), "torchvision"
    report = LoadReport(source=source, format=fmt)
    expected = model.state_dict()

    predictors = _class_predictors(model)
    if all(k in state for k in predictors) and any(
        state[k].shape != expected[k].shape for k in predictors
    ):
        report.ignored = predictors
        report.reinitialized = predictors
        state = {k: v for k, v in state.items() if k not in predictors}

    missing = [k for k in expected if k not in state and k not in report.reinitialized]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        parts = [f"{len(missing)} missing key(s)" + (f", first {missing[0]!r}" if missing else "")]
        parts.append(
            f"{len(unexpected)} unexpected" + (f", first {unexpected[0]!r}" if unexpected else "")
        )
        if mis_shaped:
            k = mis_shaped[0]
            parts.append(
                f"{len(mis_shaped)} of another shape, first {k!r}: "
                f"{tuple(state[k].shape)} in the checkpoint vs {tuple(expected[k].shape)} in the model"
            )
        raise CheckpointError(
            f"checkpoint {source} ({fmt} format) does not fit {model.name} "
            f"({model.num_classes} classes): " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=False)
    if report.reinitialized:
        for predictor in model.head.classification:
            torch.nn.init.normal_(predictor.project.weight, std=INIT_STD)
            torch.nn.init.zeros_(predictor.project.bias)
    return report
