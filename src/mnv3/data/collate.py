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
