"""seed_everything, and per-(rank, worker) seeds for the DataLoader workers lt.run splits across ranks."""

from __future__ import annotations

import random

import numpy
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import ltransform as lt
from ltransform.runner.data import per_rank

MARK = {"worker": None}


class Noise(Dataset):
    """Every item is fresh randomness from the worker's torch, ``random`` and NumPy, and the marker
    the user's worker_init_fn left."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.tensor([torch.rand(()).item(), random.random(), numpy.random.rand(), MARK["worker"] or -1.0])


def mark_worker(worker_id: int) -> None:
    MARK["worker"] = 100.0 + worker_id


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    """seed_everything writes os.environ; undo it, so workers=False cannot leak into other tests."""
    monkeypatch.setenv("LT_SEED", "0")
    monkeypatch.setenv("LT_SEED_WORKERS", "1")


def draws(rank: int, *, workers: bool = True, worker_init_fn=None) -> torch.Tensor:
    """What rank ``rank`` of 2 sees through 2 workers, after seeding as every rank does."""
    lt.seed_everything(0, workers=workers)
    loader = DataLoader(Noise(), batch_size=1, num_workers=2, worker_init_fn=worker_init_fn)
    return torch.cat(list(per_rank(loader, world=2, rank=rank)))


def test_workers_of_different_ranks_draw_different_numbers_and_a_rerun_draws_the_same():
    zero, one = draws(0), draws(1)
    assert zero.shape == one.shape == (4, 4)
    assert (zero[:, :3] != one[:, :3]).all()  # torch, random and NumPy all differ across ranks
    assert len(set(zero[:, 0].tolist())) == 4  # and across the two workers of a rank
    assert (zero[:, 1] != zero[:, 2]).all()  # random and NumPy are not seeded alike
    assert torch.equal(draws(0), zero) and torch.equal(draws(1), one)  # reproducible


def test_workers_false_keeps_torchs_seeds_the_same_on_every_rank():
    zero, one = draws(0, workers=False), draws(1, workers=False)
    assert torch.equal(zero[:, :3], one[:, :3])
    plain = DataLoader(Noise(), batch_size=1, num_workers=2)
    assert per_rank(plain, world=2, rank=0).worker_init_fn is None


def test_the_users_worker_init_fn_runs_after_the_rank_seeds():
    zero, one = draws(0, worker_init_fn=mark_worker), draws(1, worker_init_fn=mark_worker)
    assert sorted(zero[:, 3].tolist()) == [100.0, 100.0, 101.0, 101.0]  # each worker ran it
    assert torch.equal(zero[:, :3], draws(0)[:, :3]) and (zero[:, :3] != one[:, :3]).all()


def test_spawned_workers_get_the_same_seeds():  # the worker init pickles
    forked = draws(1, worker_init_fn=mark_worker)
    lt.seed_everything(0)
    loader = DataLoader(Noise(), batch_size=1, num_workers=2, worker_init_fn=mark_worker,
                        multiprocessing_context="spawn")
    assert torch.equal(torch.cat(list(per_rank(loader, world=2, rank=1))), forked)


def test_worker_seeds_are_on_without_seed_everything(monkeypatch):
    monkeypatch.delenv("LT_SEED_WORKERS")
    loader = DataLoader(Noise(), batch_size=1, num_workers=2)
    assert per_rank(loader, world=2, rank=1).worker_init_fn.keywords == {"rank": 1, "then": None}


def test_loaders_without_workers_or_ranks_are_left_alone():
    single = DataLoader(Noise(), batch_size=1, worker_init_fn=mark_worker)
    assert per_rank(single, world=2, rank=0).worker_init_fn is mark_worker  # no worker to seed
    workers = DataLoader(Noise(), batch_size=1, num_workers=2)
    assert per_rank(workers, world=1, rank=0) is workers


def test_bad_arguments_name_the_call():
    with pytest.raises(ValueError, match=r"seed_everything: seed must be an int in \[0, 2\*\*32\), got -1"):
        lt.seed_everything(-1)
    with pytest.raises(ValueError, match="got True"):
        lt.seed_everything(True)
    with pytest.raises(TypeError, match="seed_everything: workers must be True or False, got 'no'"):
        lt.seed_everything(0, workers="no")
