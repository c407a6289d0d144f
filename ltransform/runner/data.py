"""Per-rank data: a ``DataLoader`` handed to ``lt.run`` on several ranks gets a ``DistributedSampler``."""

from __future__ import annotations

import functools
import itertools
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from ltransform.seed import seed_worker, workers_seeded


def per_rank(data: Iterable[Any], *, world: int, rank: int, shuffle_seed: int = 0) -> Iterable[Any]:
    """``data`` as this rank's part: a ``DataLoader`` rebuilt with a ``DistributedSampler``.

    Anything else (a list, a generator, a loader over an ``IterableDataset`` or with its own
    ``DistributedSampler``) is taken as already per-rank. Every rank gets the same number of
    batches (the sampler pads by repeating a few samples), so collectives never wait on a rank
    that ran out of data. With workers, each (rank, worker) gets its own seed (``seed_worker``,
    before the loader's own ``worker_init_fn``) unless ``lt.seed_everything(workers=False)``.
    """
    if world <= 1 or not isinstance(data, DataLoader) or isinstance(data.dataset, IterableDataset):
        return data
    if isinstance(data.sampler, DistributedSampler):
        return data
    if data.batch_sampler is None or type(data.batch_sampler).__name__ != "BatchSampler":
        raise ValueError(
            "lt.run: the DataLoader has a custom batch_sampler, which cannot be split across "
            f"{world} ranks automatically; split it per rank yourself and pass "
            "distributed_sampler=False"
        )
    if not isinstance(data.sampler, (RandomSampler, SequentialSampler)):
        raise ValueError(
            f"lt.run: the DataLoader has a custom sampler ({type(data.sampler).__name__}), which "
            f"cannot be split across {world} ranks automatically; use a DistributedSampler "
            f"yourself, or pass distributed_sampler=False"
        )
    sampler: DistributedSampler[Any] = DistributedSampler(data.dataset, num_replicas=world, rank=rank,
                                 shuffle=isinstance(data.sampler, RandomSampler), seed=shuffle_seed,
                                 drop_last=data.drop_last)
    worker_init_fn = data.worker_init_fn
    if data.num_workers > 0 and workers_seeded():
        # torch seeds worker k of every rank alike, so each rank would repeat the same augmentations
        worker_init_fn = functools.partial(_seed_then, rank=rank, then=data.worker_init_fn)
    options = dict(batch_size=data.batch_size, sampler=sampler, num_workers=data.num_workers,
                   collate_fn=data.collate_fn, pin_memory=data.pin_memory, drop_last=data.drop_last,
                   timeout=data.timeout, worker_init_fn=worker_init_fn,
                   multiprocessing_context=data.multiprocessing_context, generator=data.generator,
                   persistent_workers=data.persistent_workers)
    if data.num_workers > 0:
        options["prefetch_factor"] = data.prefetch_factor
    return DataLoader(data.dataset, **options)


def data_parallel(models: Iterable[torch.nn.Module], *, world: int, rank: int) -> tuple[int, int]:
    """How many parts the data splits into, and this rank's part: one per rank, unless a model is tensor
    parallel (``lt.parallelize``), whose ranks in one tensor-parallel group must all see the same batch."""
    from ltransform.models.parallelize import tensor_parallel

    record = tensor_parallel(models)
    return (world, rank) if record is None else (record.dp, record.dp_rank)


def _seed_then(worker_id: int, *, rank: int, then: Callable[[int], None] | None) -> None:
    """Per-rank worker seeds, then the user's ``worker_init_fn`` (it may reseed on purpose); module-level,
    so the partial pickles for spawn and forkserver workers."""
    seed_worker(worker_id, rank=rank)
    if then is not None:
        then(worker_id)


def check_same_length(data: Iterable[Any], name: str) -> None:
    """On several ranks, every rank must get as many batches, or the longest would wait forever
    in a collective at its extra step; checked once, with one collective, when the length is known."""
    from ltransform.distributed import env

    try:
        length = len(data)  # type: ignore[arg-type]
    except TypeError:
        length = -1  # unknown: checked by nobody, documented
    lengths = [int(t) for t in env.all_gather(torch.tensor([length], device=env.collective_device()))]
    if len(set(lengths)) > 1 and -1 not in lengths:
        per_rank_text = ", ".join(f"rank {r}: {n}" for r, n in enumerate(lengths))
        raise ValueError(
            f"lt.run: {name} has a different number of batches on each rank ({per_rank_text}); "
            f"the ranks would hang at the first step one of them lacks. Give every rank the same "
            f"number (a DataLoader gets a padding DistributedSampler automatically)"
        )


class Limited:
    """The first ``n`` batches of ``data`` in each pass (``lt.run(limit_batches=...)``).

    ``sampler`` (and any other attribute) is ``data``'s, so ``set_epoch`` still reaches a
    ``DistributedSampler`` and each epoch's first ``n`` batches come from that epoch's shuffle;
    ``len`` is the limited length, which the progress bar and the epoch count see."""

    def __init__(self, data: Iterable[Any], n: int) -> None:
        self.data, self.n = data, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.data), self.n)

    def __len__(self) -> int:
        return min(self.n, len(self.data))  # type: ignore[arg-type]  # (TypeError: no length, as data)

    def __getattr__(self, name: str) -> Any:
        if name in ("data", "n"):  # (not set yet: while unpickling)
            raise AttributeError(name)
        return getattr(self.data, name)

    def __repr__(self) -> str:
        return f"Limited({self.data!r}, {self.n})"


def batch_limit(limit: int | float | None, data: Iterable[Any], option: str, call: str = "lt.run") -> int | None:
    """``limit`` (a number of batches, or a fraction in (0, 1] of ``data``'s length, rounded down,
    at least 1) as a number of batches; None: no limit."""
    if limit is None:
        return None
    if isinstance(limit, int) and not isinstance(limit, bool):
        if limit < 1:
            raise ValueError(f"{call}: {option} must be a positive int (batches), a float in (0, 1] "
                             f"(a fraction of the batches) or None, got {limit!r}")
        return limit
    if not isinstance(limit, float):
        raise TypeError(f"{call}: {option} must be an int (batches), a float in (0, 1] (a fraction of "
                        f"the batches) or None, got {type(limit).__name__}")
    if not 0 < limit <= 1:  # (also NaN)
        raise ValueError(f"{call}: {option} as a float is a fraction of the batches, in (0, 1], got "
                         f"{limit!r}; for a number of batches give an int")
    try:
        length = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{call}: {option}={limit!r} is a fraction of the batches, but the data has no "
                         f"length ({type(data).__name__}); give a number of batches (an int)") from None
    return max(1, int(length * limit))


class _WhileTheRunRuns:
    """A ``DataLoader``'s ``worker_init_fn`` under ``lt.run``: the worker ignores the preemption
    signals while the run is in progress, then runs the loader's own ``worker_init_fn``.

    A job's end (SLURM's ``scancel``, a preemption) signals every process of it, and torch's
    workers die of a SIGTERM their parent did not send: the loader then raised "worker killed"
    at any point of the run's stop and save. The run handles the signal (it stops after a step and
    saves), and the workers are shut down by their loader as always. Once ``lt.run`` has
    returned or raised (``running`` set to 0), the signal ends a worker as before: the
    ``terminate()`` multiprocessing sends its daemonic workers at exit must still work."""

    def __init__(self, inner: Callable[[int], Any] | None, signals: tuple[int, ...], running: Any) -> None:
        self.inner, self.signals, self.running = inner, signals, running

    def __call__(self, worker_id: int) -> None:
        for sig in self.signals:
            signal.signal(sig, self._on_signal)
        if self.inner is not None:
            self.inner(worker_id)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self.running.value:  # the run is over: die of it, as the worker did
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def workers_survive(sources: Iterable[Any], signals: Iterable[Any]) -> Callable[[], None]:
    """Keep the workers that the forking ``DataLoader``s among ``sources`` start from now on alive
    through ``signals`` while the run is in progress (see :class:`_WhileTheRunRuns`); the function
    that ends that and puts their ``worker_init_fn`` back."""
    import multiprocessing

    numbers = tuple(int(s) for s in signals)
    loaders: list[DataLoader] = []
    for source in sources:
        while isinstance(source, Limited):
            source = source.data
        context = getattr(source, "multiprocessing_context", None)
        forks = context is None and multiprocessing.get_start_method() == "fork" or (
            context is not None and getattr(context, "get_start_method", lambda: None)() == "fork")
        if (isinstance(source, DataLoader) and source.num_workers > 0 and forks and numbers
                and all(source is not loader for loader in loaders)):
            loaders.append(source)
    if not loaders:
        return lambda: None
    running = multiprocessing.RawValue("b", 1)  # shared with the forked workers: read in their handler
    previous = [loader.worker_init_fn for loader in loaders]
    for loader, inner in zip(loaders, previous):
        loader.worker_init_fn = _WhileTheRunRuns(inner, numbers, running)

    def restore() -> None:
        running.value = 0
        for loader, inner in zip(loaders, previous):
            loader.worker_init_fn = inner

    return restore


def set_epoch(data: Iterable[Any], epoch: int) -> None:
    """Tell a distributed sampler which epoch starts, so each epoch shuffles differently."""
    set_sampler_epoch = getattr(getattr(data, "sampler", None), "set_epoch", None)
    if callable(set_sampler_epoch):
        set_sampler_epoch(epoch)
