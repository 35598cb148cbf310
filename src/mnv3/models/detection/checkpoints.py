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
from collections.abc import Mapping, Sequence

import torch

from mnv3.models.checkpoints import (
    LoadReport,
    load_mapped_state_dict,
    read_checkpoint,
    rename_modules,
    torchvision_module_map,
)
from mnv3.models.detection.ssdlite import SSDLite


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
    return rename_modules(state, torchvision_ssdlite_module_map(model))


def _class_predictors(model: SSDLite) -> list[str]:
    return [
        f"head.classification.{k}.project.{p}"
        for k in range(len(model.head.classification))
        for p in ("weight", "bias")
    ]


def select_category_predictors(
    state: Mapping[str, torch.Tensor], model: SSDLite, category_ids: Sequence[int]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep, of a checkpoint indexed by category id, the class scores of ``model``'s labels.

    torchvision's COCO detectors predict one score per COCO category id (91 outputs: 0 is the
    background, ids 1-90 with gaps), while this project's COCO data numbers its 80 categories
    1..80. Each class predictor's 1x1 conv has ``anchors x classes`` output channels ordered
    anchor-major (channel ``a * classes + k``, as both heads reshape them), so label ``k`` of
    ``model`` takes channel ``a * 91 + category_ids[k]`` for every anchor ``a``. The logits of
    the kept classes are then exactly the checkpoint's; only the softmax no longer spreads mass
    over the 10 unused ids, which the checkpoint trained as background-only.

    ``category_ids``: label -> category id, entry 0 the background's 0 (the detection task's
    ``label_to_category_id``). Returns the state dict (other tensors shared) and the notes of
    what was selected; a checkpoint that already fits, or whose class count cannot hold those
    ids, is returned unchanged.
    """
    if len(category_ids) != model.num_classes or category_ids[0] != 0:
        raise ValueError(
            f"category_ids must list {model.num_classes} ids, background 0 first; got "
            f"{len(category_ids)} starting with {category_ids[0] if category_ids else None}"
        )
    out, notes = dict(state), []
    for k, predictor in enumerate(model.head.classification):
        weight_key = f"head.classification.{k}.project.weight"
        bias_key = f"head.classification.{k}.project.bias"
        weight, bias = state.get(weight_key), state.get(bias_key)
        anchors = predictor.project.weight.shape[0] // model.num_classes
        if weight is None or bias is None or weight.shape[0] % anchors:
            return dict(state), []
        theirs = weight.shape[0] // anchors
        if theirs == model.num_classes or max(category_ids) >= theirs:
            return dict(state), []
        rows = torch.tensor([a * theirs + c for a in range(anchors) for c in category_ids])
        out[weight_key], out[bias_key] = weight[rows], bias[rows]
        notes.append(f"{weight_key}: {theirs} category-id scores -> {model.num_classes} labels")
    return out, notes


def load_ssdlite_weights(
    model: SSDLite,
    source: str | os.PathLike[str],
    progress: bool = True,
    category_ids: Sequence[int] | None = None,
) -> LoadReport:
    """Load a detector checkpoint into ``model`` in place; see the module docstring for rules.

    ``category_ids`` (label -> dataset category id, background 0 first): a torchvision
    checkpoint indexed by category id (its COCO weights) keeps the scores of these categories
    (:func:`select_category_predictors`) instead of re-initialising the class predictors.
    """
    source = str(source)
    state = read_checkpoint(source, progress=progress, arch=model.name)
    fmt = "mnv3"
    if is_torchvision_ssd_state_dict(state):
        state, fmt = from_torchvision_ssdlite(state, model), "torchvision"
    report = LoadReport(source=source, format=fmt)
    if category_ids is not None and fmt == "torchvision":
        state, report.adapted = select_category_predictors(state, model, category_ids)
    expected = model.state_dict()

    predictors = _class_predictors(model)
    if all(k in state for k in predictors) and any(
        state[k].shape != expected[k].shape for k in predictors
    ):
        report.ignored = predictors
        report.reinitialized = predictors
        state = {k: v for k, v in state.items() if k not in predictors}

    describe = f"{model.name} ({model.num_classes} classes)"
    return load_mapped_state_dict(model, state, report, describe, model.reset_class_predictors)
