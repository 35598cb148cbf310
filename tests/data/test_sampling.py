"""Evaluation shards under data parallelism: every index once, no padding; no processes needed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.utils.data import DistributedSampler

from mnv3.data import DataModule
from mnv3.data.sampling import UnpaddedShardSampler, eval_sampler


@pytest.mark.parametrize(("items", "ranks"), [(7, 2), (7, 3), (8, 2), (2, 2), (5, 1)])
def test_shards_cover_every_index_once_in_order_without_padding(items: int, ranks: int) -> None:
    dataset = list(range(items))
    shards = [list(UnpaddedShardSampler(dataset, ranks, rank)) for rank in range(ranks)]
    # Joined in rank order (as a gather joins them) they are the one-process order.
    assert [i for shard in shards for i in shard] == dataset
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for rank, shard in enumerate(shards):
        assert len(UnpaddedShardSampler(dataset, ranks, rank)) == len(shard)


def test_seven_items_over_two_ranks() -> None:
    first, second = (UnpaddedShardSampler(range(7), 2, rank) for rank in (0, 1))
    assert (list(first), list(second)) == ([0, 1, 2, 3], [4, 5, 6])
    # Lightning's sampler replacement keeps any DistributedSampler: it must stay one.
    assert isinstance(first, DistributedSampler)


def test_eval_sampler_shards_only_across_processes() -> None:
    assert eval_sampler(range(7), None) is None
    assert eval_sampler(range(7), {"num_replicas": 1, "rank": 0}) is None
    sampler = eval_sampler(range(7), {"num_replicas": 2, "rank": 1})
    assert isinstance(sampler, UnpaddedShardSampler) and list(sampler) == [4, 5, 6]
    # Fewer images than processes: a rank without a batch would stall the others; padded instead.
    with pytest.warns(UserWarning, match="fewer images than processes"):
        assert eval_sampler(range(1), {"num_replicas": 2, "rank": 0}) is None


def test_data_module_eval_loaders_take_the_rank_s_shard(tmp_path: Path, write_image) -> None:
    root = tmp_path / "pets"
    for name, colour in {"cat": (200, 30, 90), "dog": (10, 250, 128)}.items():
        write_image(root / "train" / name / "0.png", colour, size=(40, 30))
    for i, name in enumerate(["cat", "cat", "dog"]):  # 3 val images: uneven over 2 ranks
        write_image(root / "val" / name / f"{i}.png", size=(40, 30))
    module = DataModule(str(root), batch_size=2, num_workers=0, image_size=24, test_split=None)
    assert len(module.val_dataloader().dataset) == 3
    assert not isinstance(module.val_dataloader().sampler, DistributedSampler)
    counts = []
    for rank in (0, 1):
        module.trainer = SimpleNamespace(
            distributed_sampler_kwargs={"num_replicas": 2, "rank": rank}
        )
        loader = module.val_dataloader()
        counts.append(sum(len(batch["label"]) for batch in loader))
    assert counts == [2, 1]
