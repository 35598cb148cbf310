"""Evaluation under data parallelism: every image of a split seen exactly once, across all ranks.

Lightning (``use_distributed_sampler=True``, 2.6) replaces an evaluation loader's sequential
sampler with torch's :class:`~torch.utils.data.DistributedSampler`, which pads the index list to a
multiple of the number of processes by repeating its first indices. With 7 validation images on
2 ranks, image 0 is then scored twice and detection mAP / segmentation mIoU differ from the
one-process numbers (measured: mAP 0.00369 vs 0.00319). :func:`eval_sampler` gives each rank an
unpadded shard instead. Metric states then differ in size between ranks: torchmetrics gathers
concatenated and summed states of any size, and the detection task's mAP gathers its per-image
lists itself (:class:`mnv3.tasks.detection.ShardedMeanAveragePrecision`).
Training keeps Lightning's padded, shuffled sampler: its steps all-reduce gradients every batch,
so ranks must run the same number of batches there.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import DistributedSampler


class UnpaddedShardSampler(DistributedSampler):
    """One contiguous block of a map-style dataset's indices per rank, in order, none repeated.

    The blocks of ranks ``0, 1, ...`` follow each other and cover the dataset once; their sizes
    differ by at most one (the first ``len % num_replicas`` ranks hold one more). Contiguous, not
    strided, so that states gathered in rank order (torchmetrics, ``all_gather_object``) list the
    images in the one-process order: COCOeval breaks score ties by that order. It is a
    :class:`DistributedSampler` so that Lightning's automatic sampler replacement leaves it in
    place (it replaces only samplers that are not one). For evaluation only: a rank with one batch
    fewer would wait forever at a training step's gradient all-reduce.

    Args:
        dataset: the split to shard (needs ``__len__``).
        num_replicas: processes sharing the split (the data-parallel world size).
        rank: this process's index among them, ``0 <= rank < num_replicas``.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.total_size = len(dataset)
        share, extra = divmod(self.total_size, num_replicas)
        self.start = rank * share + min(rank, extra)
        self.num_samples = share + (1 if rank < extra else 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.start + self.num_samples))


def eval_sampler(dataset: Any, distributed: dict[str, Any] | None) -> UnpaddedShardSampler | None:
    """This process's unpadded shard of an evaluation split, or None to read the split whole.

    Args:
        dataset: the validation or test split.
        distributed: the trainer's ``distributed_sampler_kwargs`` (``num_replicas``, ``rank``);
            None outside a parallel strategy.

    Returns:
        None with one process, for a dataset without ``__len__``, or (with a warning) when the
        split has fewer images than processes: a rank without a single batch would leave the
        others waiting at the first evaluation forward's buffer broadcast during ``fit``, so
        Lightning's padded sampler, which repeats a few images, is kept for such a split.
    """
    if not distributed or not isinstance(dataset, Sized):
        return None
    num_replicas, rank = int(distributed["num_replicas"]), int(distributed["rank"])
    if num_replicas <= 1:
        return None
    if len(dataset) < num_replicas:
        warnings.warn(
            f"evaluation split of {len(dataset)} images over {num_replicas} processes: fewer "
            "images than processes, so some images are evaluated twice and the metrics differ "
            "from a one-process run",
            stacklevel=2,
        )
        return None
    return UnpaddedShardSampler(dataset, num_replicas=num_replicas, rank=rank)
