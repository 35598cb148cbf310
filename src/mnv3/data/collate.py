"""Batching classification samples, skipping the ones that could not be read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate


def collate_classification(samples: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Stack ``{"image", "label"}`` samples into a batch, dropping ``None`` (unreadable) ones.

    Returns:
        ``{"image": float (N, C, H, W), "label": int64 (N,), "skipped": int}``, where ``skipped``
        counts the samples dropped from this batch. When every sample was unreadable, ``image``
        has shape ``(0, 0, 0, 0)`` and ``label`` shape ``(0,)``; the task skips such a batch.
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
        "label": torch.tensor([int(s["label"]) for s in kept], dtype=torch.int64),
        "skipped": skipped,
    }
