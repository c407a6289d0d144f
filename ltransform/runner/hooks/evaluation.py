"""The evaluation hook, and ``evaluate``: metrics weighted by batch size, the padding a
``DistributedSampler`` adds left out, averaged over every rank with one collective, so the result
does not depend on the number of processes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map

from ltransform.core.inventory import inventory
from ltransform.distributed import env
from ltransform.runner.hooks import cadence_next
from ltransform.runner.metrics import to_floats


class Evaluation:
    """Evaluate every ``every`` optimizer steps, or at the end of each epoch (``every=None``).

    The results (``val_*``) are logged at the step they are computed (``run.fresh`` tells them
    from stale ones) and kept in ``run.evaluated``."""

    __name__ = "evaluation"

    def __init__(self, eval_step: Any, data: Iterable[Any], every: int | None) -> None:
        self.eval_step, self.data, self.every = eval_step, data, every
        self.next_step = cadence_next(every)

    def __call__(self, state: Any, run: Any) -> None:
        run.doing = "evaluation"
        results = evaluate(self.eval_step, state, self.data, average=run.distributed)
        values = {f"val_{k}": v for k, v in results.items()}
        run.evaluated, run.evaluated_at = values, run.step
        run.log(values)

    def epoch_end(self, state: Any, run: Any) -> None:
        if self.every is None:
            self(state, run)


def evaluate(eval_step: Any, state: Any, data: Iterable[Any], *, average: bool | None = None) -> dict[str, float]:
    """``eval_step``'s metrics over ``data``, every model in eval mode, as floats.

    Each batch's metrics count with its batch size (dim 0 of its first tensor; 1 if it has
    none). From a ``DataLoader`` with a ``DistributedSampler``, the samples the sampler repeats
    to give every rank as many are left out (a batch holding some is cut to its real samples;
    one holding only them still runs, so every rank runs as many batches, and counts for
    nothing). With ``average`` (default: on several processes), the sums and counts are added
    over every rank (one collective), so 1 process and N give the same result.
    """
    if average is None:
        average = env.process_count() > 1 and torch.distributed.is_initialized()
    modules = list(inventory(state).models.values())
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    sums: dict[str, Any] = {}
    count: float = 0.0
    real, seen, batches = _real_samples(data), 0, 0
    try:
        for batch in data:
            batches += 1
            size = _batch_size(batch)
            weight = 1 if size is None else size
            if size is not None and real is not None:
                weight = max(0, min(size, real - seen))
                seen += size
                if 0 < weight < size:
                    batch = _first(batch, weight, size)
            state, metrics = eval_step(state, batch)
            for name, value in metrics.items():
                value = value.detach().float().mean() if isinstance(value, torch.Tensor) else float(value)
                sums[name] = sums[name] + value * weight if name in sums else value * weight
            count += weight
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    if not batches:
        raise ValueError("lt.run: eval_data yielded no batches")
    return _mean(sums, count, average)


def _mean(sums: dict[str, Any], count: float, average: bool) -> dict[str, float]:
    """``sums / count``, the sums and counts added over every rank first if ``average``."""
    if average:
        device = env.collective_device()
        stacked = torch.stack([torch.as_tensor(v).to(device, torch.float64) for v in [*sums.values(), count]])
        totals = env.all_reduce(stacked).tolist()
        count, values = totals[-1], totals[:-1]
    else:
        values = list(to_floats(sums).values())  # one host sync
    if count == 0:
        raise ValueError("lt.run: eval_data held no samples (every batch was padding)")
    return {name: value / count for name, value in zip(sums, values)}


def _first(batch: Any, n: int, size: int) -> Any:
    """The first ``n`` samples of a batch of ``size``: each tensor with that first dimension cut."""
    return tree_map(lambda t: t[:n] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == size else t, batch)


def _batch_size(batch: Any) -> int | None:
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def _real_samples(data: Any) -> int | None:
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
