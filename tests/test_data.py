"""Per-rank data for lt.run: which loaders get a DistributedSampler, and how."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

from ltransform.runner.data import per_rank, set_epoch

DATA = TensorDataset(torch.arange(10.0))


def indices(loader) -> list[int]:
    return [int(x) for (batch,) in loader for x in batch]


def test_a_dataloader_is_split_across_ranks_with_its_options_kept():
    loader = DataLoader(DATA, batch_size=2, drop_last=False, collate_fn=None)
    parts = [per_rank(loader, world=3, rank=r) for r in range(3)]
    assert all(isinstance(p.sampler, DistributedSampler) for p in parts)
    assert all(p.batch_size == 2 for p in parts)
    seen = [indices(p) for p in parts]
    assert seen == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]  # padded by repeating, never uneven
    assert {len(s) for s in seen} == {4}


def test_shuffle_follows_the_loader_and_set_epoch_reshuffles():
    ordered = per_rank(DataLoader(DATA, batch_size=5), world=2, rank=0)
    assert not ordered.sampler.shuffle
    shuffled = per_rank(DataLoader(DATA, batch_size=5, shuffle=True), world=2, rank=0)
    assert shuffled.sampler.shuffle
    set_epoch(shuffled, 0)
    first = indices(shuffled)
    set_epoch(shuffled, 1)
    assert indices(shuffled) != first
    set_epoch(shuffled, 0)
    assert indices(shuffled) == first  # the same epoch, the same order: resumable


def test_what_is_left_alone():
    data = [1, 2, 3]
    assert per_rank(data, world=2, rank=0) is data  # already per rank
    loader = DataLoader(DATA, batch_size=2)
    assert per_rank(loader, world=1, rank=0) is loader
    own = DataLoader(DATA, batch_size=2, sampler=DistributedSampler(DATA, num_replicas=2, rank=0))
    assert per_rank(own, world=2, rank=0) is own

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(4))

    stream = DataLoader(Stream(), batch_size=2)
    assert per_rank(stream, world=2, rank=0) is stream


def test_custom_samplers_are_an_error_naming_the_opt_out():
    weighted = DataLoader(DATA, batch_size=2, sampler=torch.utils.data.WeightedRandomSampler([1.0] * 10, 10))
    with pytest.raises(ValueError, match="custom sampler .WeightedRandomSampler.*distributed_sampler=False"):
        per_rank(weighted, world=2, rank=0)
    batches = DataLoader(DATA, batch_sampler=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="custom batch_sampler.*distributed_sampler=False"):
        per_rank(batches, world=2, rank=0)
