"""Batching classification samples, skipping the ones that could not be read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate


def collate_classification(samples: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Stack ``{"image", "label"}`` samples into a batch, dropping ``None`` (unreadable) ones.

    Returns:
        ``{"image": float (N, C, H, W), "label": ..., "skipped": int}``, where ``label`` is int64
        ``(N,)`` for class indices and float32 ``(N, K)`` for multi-label vectors (tensor labels),
        and ``skipped`` counts the samples dropped from this batch. When every sample was
        unreadable, ``image`` has shape ``(0, 0, 0, 0)`` and ``label`` shape ``(0,)`` (int64, as
        the label width is unknown); the task skips such a batch.
    """
    kept = [s for s in samples if s is not None]
    skipped = len(samples) - len(kept)
    if not kept:
        return {
            "image": torch.empty((0, 0, 0, 0), dtype=torch.float32),
            "label": torch.empty((0,), dtype=torch.int64),
            "skipped": skipped,
        }
    return {
        # default_collate stacks straight into shared memory inside a worker: no extra copy.
        "image": default_collate([s["image"] for s in kept]),
        "label": _stack_labels([s["label"] for s in kept]),
        "skipped": skipped,
    }


def _stack_labels(labels: list[Any]) -> torch.Tensor:
    """Class indices to int64 ``(N,)``; label vectors (multi-label) to float32 ``(N, K)``."""
    if isinstance(labels[0], torch.Tensor) and labels[0].ndim > 0:
        return default_collate(labels).to(torch.float32)
    return torch.tensor([int(label) for label in labels], dtype=torch.int64)


def collate_detection(samples: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Batch detection samples of equal image size, dropping ``None`` (unreadable) ones.

    Box counts differ between images, so targets stay per-image lists.

    Returns:
        ``{"image": float (N, 3, S, S), "boxes": list of float32 (n_i, 4) xyxy in input
        pixels, "labels": list of int64 (n_i,), "image_id": list[int], "orig_size": list of
        (H, W), "eval_target": list of dicts, "skipped": int}``; all plain tensors (tv_tensor
        wrappers removed). When every sample was unreadable, ``image`` has shape
        ``(0, 0, 0, 0)`` and the lists are empty; the task skips such a batch.
    """
    kept = [s for s in samples if s is not None]
    skipped = len(samples) - len(kept)
    if not kept:
        image = torch.empty((0, 0, 0, 0), dtype=torch.float32)
    else:
        image = default_collate([s["image"].as_subclass(torch.Tensor) for s in kept])
    return {
        "image": image,
        "boxes": [s["boxes"].as_subclass(torch.Tensor) for s in kept],
        "labels": [torch.as_tensor(s["labels"], dtype=torch.int64) for s in kept],
        "image_id": [int(s["image_id"]) for s in kept],
        "orig_size": [(int(s["orig_size"][0]), int(s["orig_size"][1])) for s in kept],
        "eval_target": [s["eval_target"] for s in kept],
        "skipped": skipped,
    }


def collate_segmentation(samples: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Batch segmentation samples of equal size, dropping ``None`` (unreadable) ones.

    Evaluation feeds whole frames, so every image of a batch must have the same size (Cityscapes'
    are all 1024x2048); a batch that mixes sizes is a DatasetError naming two of its frames.

    Returns:
        ``{"image": float (N, 3, H, W), "mask": int64 (N, H, W) (255 = ignore), "name":
        list[str], "orig_size": list of (H, W), "skipped": int}``; plain tensors (tv_tensor
        wrappers removed). When every sample was unreadable, ``image`` has shape
        ``(0, 0, 0, 0)``, ``mask`` ``(0, 0, 0)`` and the lists are empty; the task skips such a
        batch.
    """
    from mnv3.data.errors import DatasetError

    kept = [s for s in samples if s is not None]
    skipped = len(samples) - len(kept)
    if not kept:
        return {
            "image": torch.empty((0, 0, 0, 0), dtype=torch.float32),
            "mask": torch.empty((0, 0, 0), dtype=torch.int64),
            "name": [],
            "orig_size": [],
            "skipped": skipped,
        }
    sizes = [tuple(s["image"].shape[-2:]) for s in kept]
    if len(set(sizes)) > 1:
        other = next(i for i, size in enumerate(sizes) if size != sizes[0])
        raise DatasetError(
            f"a segmentation batch mixes frame sizes: {kept[0]['name']} is "
            f"{sizes[0][1]}x{sizes[0][0]} and {kept[other]['name']} is "
            f"{sizes[other][1]}x{sizes[other][0]} (width x height); expected equal sizes "
            "(set data.batch_size=1 or data.eval_resize for evaluation)"
        )
    return {
        "image": default_collate([s["image"].as_subclass(torch.Tensor) for s in kept]),
        # Stacked at the masks' own (uint8) width, widened once for the loss and the metric.
        "mask": torch.stack([s["mask"].as_subclass(torch.Tensor) for s in kept]).to(torch.int64),
        "name": [str(s["name"]) for s in kept],
        "orig_size": [(int(s["orig_size"][0]), int(s["orig_size"][1])) for s in kept],
        "skipped": skipped,
    }
