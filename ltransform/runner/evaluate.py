"""``lt.evaluate``: an eval step's metrics over data, weighted by batch size, the padding a
``DistributedSampler`` adds left out, summed over every rank with one collective, so the result
does not depend on the number of processes. ``lt.run``'s evaluation is this same function."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map

from ltransform.core.binding import bound_to, forget, lookup
from ltransform.core.inventory import inventory
from ltransform.core.step import TransformedStep, as_step
from ltransform.distributed import env
from ltransform.runner.data import batch_limit, check_same_length, data_parallel, per_rank
from ltransform.runner.metrics import to_floats


def evaluate(eval_step: Any, state: Any, data: Iterable[Any], *, limit: int | float | None = None) -> dict[str, float]:
    """``eval_step``'s metrics over ``data``, every model in eval mode: ``Trainer.validate``/``test``.

    Each batch's metrics count with its batch size (dim 0 of its first tensor; 1 if it has none).
    The sums stay on the device (no host sync per batch); one collective and one host sync at
    the end. On several ranks a ``DataLoader`` gets a ``DistributedSampler`` as in ``lt.run``,
    the samples it repeats to even out the ranks are left out, and the sums and counts are
    added over the ranks: 1 process and N give the same result, odd dataset lengths included.
    ``lt.run(eval_step=..., eval_data=...)`` evaluates with this same function.

    Args:
        eval_step: ``lt.eval_step(fn)``, possibly with ``lt.with_precision`` / ``lt.distribute``,
            or a function ``(state, batch) -> (state, metrics)``; the state it returns is dropped.
        state: the state holding the model(s); their train/eval modes are restored afterwards.
        data: an iterable of batches (a list, or a ``DataLoader``, split over the ranks).
        limit: evaluate at most this many batches per rank (``limit_val_batches``), or that
            fraction of each rank's batches (a float in (0, 1], at least 1); None: all.

    Returns:
        ``{name: mean}`` as Python floats, the same on every rank.

    Raises:
        TypeError: ``eval_step`` is a training step or not callable, or ``data`` is not iterable.
        ValueError: ``limit`` is neither a positive int nor a fraction in (0, 1], or ``data``
            holds no batch or no sample.

    Example:
        >>> import torch, ltransform as lt
        >>> state = lt.State(model=torch.nn.Linear(2, 1))
        >>> data = [torch.ones(3, 2), torch.ones(1, 2)]
        >>> sorted(lt.evaluate(lt.eval_step(lambda m, b: {"n": b.sum(1).mean()}), state, data).items())
        [('n', 2.0)]
    """
    step = _check_eval_step(eval_step, "lt.evaluate")
    data = rank_data(data, state, "lt.evaluate")
    limit = batch_limit(limit, data, "limit", "lt.evaluate")
    bound_before = lookup(step, state) is not None
    state, _ = bound_to(step, state)  # prepared outside no_grad (a lt.distribute wrapper is built here)
    try:
        return weighted_means(step, state, data, limit=limit, what="lt.evaluate: data")
    finally:
        if not bound_before:  # a step made for this call (lt.evaluate(lt.eval_step(fn), ...)) goes with it
            forget(step, state)


def _check_eval_step(eval_step: Any, call: str) -> TransformedStep:
    step = as_step(eval_step, call)
    if step.body is not None and step.body.kind == "train":
        raise TypeError(
            f"{call}: got a training step ({step!r}), which would update the model; "
            f"pass lt.eval_step(fn) with the same fn instead"
        )
    return step


def rank_data(data: Any, state: Any, call: str) -> Any:
    """``data`` as this rank's part, as ``lt.run`` splits it: a ``DataLoader`` gets a
    ``DistributedSampler`` (over the data-parallel ranks); every rank must get as many batches."""
    if not isinstance(data, Iterable):
        raise TypeError(f"{call}: data must be an iterable of batches (a list, a DataLoader), "
                        f"got {type(data).__name__}")
    if not (env.ensure_process_group() and env.process_count() > 1):
        return data
    parts, part = data_parallel(inventory(state).models.values(), world=env.process_count(),
                                rank=env.process_index())
    data = per_rank(data, world=parts, rank=part)
    check_same_length(data, "data")
    return data


def weighted_means(eval_step: Any, state: Any, data: Iterable[Any], *, limit: int | None = None,
                   average: bool | None = None, what: str = "lt.run: eval_data") -> dict[str, float]:
    """The loop of :func:`evaluate` over data already split per rank; ``average`` (default: on
    several processes) adds the sums and counts over every rank. A batch holding some repeated
    samples is cut to its real ones; one holding only them still runs (every rank runs as many
    batches, for the collectives of a sharded forward) and counts for nothing."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{what.split(':')[0]}: limit must be a positive int or None, got {limit!r}")
    if average is None:
        average = env.process_count() > 1 and torch.distributed.is_initialized()
    modules = list(inventory(state).models.values())
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    sums: dict[str, Any] = {}
    count: float = 0.0
    real, seen, batches = real_samples(data), 0, 0
    try:
        for batch in data:
            if limit is not None and batches >= limit:
                break
            batches += 1
            batch, weight, seen = _real_part(batch, real, seen)
            state, metrics = eval_step(state, batch)
            for name, value in metrics.items():
                value = value.detach().float().mean() if isinstance(value, torch.Tensor) else float(value)
                sums[name] = sums[name] + value * weight if name in sums else value * weight
            count += weight
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    if not batches:
        raise ValueError(f"{what} yielded no batches")
    return _mean(sums, count, average, what)


def _real_part(batch: Any, real: int | None, seen: int) -> tuple[Any, int, int]:
    """The batch cut to its real samples, their count (its weight), and the samples seen so far."""
    size = batch_size(batch)
    if size is None:
        return batch, 1, seen
    if real is None:
        return batch, size, seen + size
    weight = max(0, min(size, real - seen))
    if 0 < weight < size:
        batch = first(batch, weight, size)
    return batch, weight, seen + size


def _mean(sums: dict[str, Any], count: float, average: bool, what: str) -> dict[str, float]:
    """``sums / count``, the sums and counts added over every rank first if ``average``."""
    if average:
        device = env.collective_device()
        stacked = torch.stack([torch.as_tensor(v).to(device, torch.float64) for v in [*sums.values(), count]])
        totals = env.all_reduce(stacked, "sum").tolist()
        count, values = totals[-1], totals[:-1]
    else:
        values = list(to_floats(sums).values())  # one host sync
    if count == 0:
        raise ValueError(f"{what} held no samples (every batch was padding)")
    return {name: value / count for name, value in zip(sums, values)}


def first(batch: Any, n: int, size: int) -> Any:
    """The first ``n`` samples of a batch of ``size``: each tensor with that first dimension cut."""
    return tree_map(lambda t: t[:n] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == size else t, batch)


def batch_size(batch: Any) -> int | None:
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def real_samples(data: Any) -> int | None:
    """How many samples of a ``DataLoader`` with a padding ``DistributedSampler`` this rank
    really has (the rest repeat others' to even out the ranks); None if it has no such sampler."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = getattr(data, "sampler", None) if isinstance(data, DataLoader) else None
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    try:
        total = len(sampler.dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    return len(range(sampler.rank, total, sampler.num_replicas))
