"""Collation drops unreadable samples and says how many."""

from __future__ import annotations

import torch

from mnv3.data import collate_classification


def test_drops_none_and_counts() -> None:
    sample = {"image": torch.ones(3, 4, 4), "label": 2}
    batch = collate_classification([None, sample, sample, None])
    assert batch["image"].shape == (2, 3, 4, 4) and batch["image"].dtype == torch.float32
    assert batch["label"].tolist() == [2, 2] and batch["label"].dtype == torch.int64
    assert batch["skipped"] == 2


def test_all_unreadable_gives_an_empty_batch() -> None:
    batch = collate_classification([None, None])
    assert batch["image"].numel() == 0 and batch["image"].ndim == 4
    assert batch["label"].shape == (0,) and batch["label"].dtype == torch.int64
    assert batch["skipped"] == 2
