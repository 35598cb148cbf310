"""COCO mAP over images that data-parallel ranks hold in different numbers.

torchmetrics' :class:`~torchmetrics.detection.MeanAveragePrecision` keeps one tensor per image in
each of its list states and gathers them one all-gather per tensor: ranks holding different
numbers of images (an odd split over 2 ranks, :class:`mnv3.data.sampling.UnpaddedShardSampler`)
then issue different numbers of collectives, and gloo aborts ("Received data size doesn't match
expected size") or NCCL hangs. :class:`ShardedMeanAveragePrecision` gathers all its states in one
collective instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchmetrics.detection import MeanAveragePrecision


class ShardedMeanAveragePrecision(MeanAveragePrecision):
    """:class:`MeanAveragePrecision` whose per-image states gather whatever each rank holds.

    The states travel on the CPU in one ``all_gather_object`` and are joined in rank order, which
    is the one-process image order when each rank holds a contiguous block of the split; COCOeval
    breaks score ties by image order, so the mAP is then the one-process number exactly.
    """

    def _sync_dist(
        self, dist_sync_fn: Callable | None = None, process_group: Any | None = None
    ) -> None:
        group = process_group or self.process_group
        names = [name for name, default in self._defaults.items() if isinstance(default, list)]
        local = {name: _to_cpu(getattr(self, name)) for name in names}
        gathered: list[Any] = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(gathered, local, group=group)
        for name in names:
            joined = [item for part in gathered for item in part[name]]
            setattr(self, name, [_to_device(item, self.device) for item in joined])


def _to_cpu(items: list[Any]) -> list[Any]:
    """Tensors moved to the CPU (pickled CUDA tensors would land on the sender's device)."""
    return [item.cpu() if isinstance(item, torch.Tensor) else item for item in items]


def _to_device(item: Any, device: torch.device) -> Any:
    return item.to(device) if isinstance(item, torch.Tensor) else item
