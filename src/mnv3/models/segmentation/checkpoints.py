"""Loading segmentation checkpoints: torchvision's LR-ASPP and this project's, ``weights_only=True``.

Reading (a path, a URL through the torch.hub cache, or a name of
:data:`KNOWN_SEGMENTATION_WEIGHTS`) and unwrapping Lightning checkpoints is
:func:`mnv3.models.checkpoints.read_checkpoint`'s job. Formats, told apart by their keys:
torchvision's ``lraspp_mobilenet_v3_large`` (``backbone.N...``, ``classifier.cbr...``), renamed by
a key map derived from the model; and this project's (``backbone.stem...``, ``head...``). A
checkpoint with another class count keeps everything but the two logits layers, which are
re-initialised (the fine-tuning path, e.g. COCO-VOC -> Cityscapes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from mnv3.models.checkpoints import (
    CheckpointError,
    KnownWeights,
    LoadReport,
    Preprocessing,
    load_mapped_state_dict,
    read_checkpoint,
    rename_modules,
    torchvision_module_map,
)
from mnv3.models.segmentation.heads import LRASPPHead
from mnv3.models.segmentation.segmenter import Segmenter

# Published segmenters, the same record type as the classifiers' and detectors'
# (mnv3.models.checkpoints.KNOWN_WEIGHTS); ``build`` holds the builder arguments they need.
KNOWN_SEGMENTATION_WEIGHTS: dict[str, KnownWeights] = {
    w.name: w
    for w in (
        # torchvision's LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1 (COCO val2017
        # restricted to the 20 VOC classes + background), evaluated at resize 520.
        KnownWeights(
            "lraspp_mobilenet_v3_large.COCO_WITH_VOC_LABELS_V1",
            "lraspp_mobilenet_v3_large",
            "https://download.pytorch.org/models/lraspp_mobilenet_v3_large-d234d4ea.pth",
            3_221_538,
            {"miou": 57.9, "pixel_acc": 91.2},
            Preprocessing(resize_size=520, crop_size=520),
            num_classes=21,
            build={
                "backbone": "mobilenet_v3_large",
                "num_classes": 21,
                "pool": "global",
                "reduced_tail": False,
                "output_stride": 16,
                "low_tap": "C3_first",
                "inter_channels": 128,
            },
        ),
    )
}


def torchvision_segmentation_map(model: Segmenter) -> dict[str, str]:
    """Map torchvision's ``LRASPP`` module names to ours, derived from the model.

    torchvision's backbone is its ``features`` list under ``backbone.`` (an
    ``IntermediateLayerGetter``), so the classifier's map renames it; its head is
    ``classifier.{cbr.0, cbr.1, scale.1, low_classifier, high_classifier}``.
    """
    if not isinstance(model.head, LRASPPHead):
        raise CheckpointError(f"torchvision has no {model.name} model; only LR-ASPP maps")
    names = {
        "backbone." + tv.removeprefix("features."): "backbone." + ours
        for tv, ours in torchvision_module_map(model.backbone).items()
        if tv.startswith("features.")
    }
    names.update(
        {
            "classifier.cbr.0": "head.conv.conv",
            "classifier.cbr.1": "head.conv.bn",
            "classifier.scale.1": "head.gate",
            "classifier.low_classifier": "head.low_classifier",
            "classifier.high_classifier": "head.high_classifier",
        }
    )
    return names


def is_torchvision_segmentation_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    """torchvision's LRASPP: ``backbone.0.0.weight`` (its stem) and ``classifier.*`` keys."""
    return "backbone.0.0.weight" in state and any(k.startswith("classifier.") for k in state)


def from_torchvision_segmentation(
    state: Mapping[str, torch.Tensor], model: Segmenter
) -> dict[str, torch.Tensor]:
    """Rename a torchvision LRASPP state dict to our names (unknown keys kept as they are)."""
    return rename_modules(state, torchvision_segmentation_map(model))


def _describe(model: Segmenter) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in model.config.items() if k != "head")
    return f"{model.config.get('head', model.name)}({args})"


def load_segmentation_weights(
    model: Segmenter, source: str | os.PathLike[str], progress: bool = True
) -> LoadReport:
    """Load a segmentation checkpoint into ``model`` in place; see the module docstring.

    Raises :class:`~mnv3.models.checkpoints.CheckpointError` (one sentence naming the source,
    the model's arguments and the first missing / unexpected / mis-shaped key) when the
    checkpoint is another architecture (another backbone, tail, F, or head).
    """
    source = str(source)
    state = read_checkpoint(
        source, progress=progress, arch=model.name, known_weights=KNOWN_SEGMENTATION_WEIGHTS
    )
    fmt = "mnv3"
    if is_torchvision_segmentation_state_dict(state):
        state, fmt = from_torchvision_segmentation(state, model), "torchvision"
    report = LoadReport(source=source, format=fmt)
    expected = model.state_dict()

    logits_keys = {
        f"{prefix}.{param}"
        for prefix, module in model.named_modules()
        if any(module is layer for layer in model.logits_layers())
        for param in ("weight", "bias")
    }
    other_classes = [k for k in logits_keys if k in state and state[k].shape != expected[k].shape]
    if other_classes:  # another class count: keep the rest, re-initialise the logits layers
        report.ignored = sorted(logits_keys & set(state))
        report.reinitialized = sorted(logits_keys)
        state = {k: v for k, v in state.items() if k not in logits_keys}

    def reset_logits() -> None:
        for layer in model.logits_layers():
            layer.reset_parameters()

    return load_mapped_state_dict(model, state, report, _describe(model), reset_logits)
