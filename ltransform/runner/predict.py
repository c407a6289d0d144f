"""``lt.predict``: a model's outputs over data, one per sample, in dataset order on any number of
ranks (the ``DistributedSampler``'s interleaving and padding undone), or handed to a writer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from ltransform.core.binding import bound_to, forget
from ltransform.core.inventory import inventory
from ltransform.core.step import Body, TransformedStep
from ltransform.distributed import env
from ltransform.runner.evaluate import batch_size, first, rank_data, real_samples

Writer = Callable[[list[Any], "list[int] | None"], Any]
_KEY = "lt.predict output"  # the metrics key the output travels under through the step's transforms


def predict(fn: Any, state: Any, data: Iterable[Any], *, write: Writer | None = None) -> list[Any] | None:
    """``fn(model, batch)`` over ``data`` under ``torch.inference_mode()``, models in eval mode,
    split into one output per sample: ``Trainer.predict``.

    Each output is split along dim 0 into the batch's samples (a tensor, or a dict/tuple of
    tensors with the batch first, or a list with one item per sample). On several ranks a
    ``DataLoader`` gets a ``DistributedSampler`` as in ``lt.run``; the samples it repeats to
    even out the ranks are dropped, and the outputs are gathered (through the CPU, one
    collective at the end) and put back in dataset order, so every rank returns exactly
    ``len(dataset)`` outputs, as one process does. Other iterables are taken as per rank, and
    their outputs are concatenated in rank order.

    Args:
        fn: ``fn(model, batch) -> output``; or ``lt.eval_step(fn)`` piped through
            ``lt.with_precision`` / ``lt.distribute``, whose ``fn`` then runs in the step's
            precision (its autocast and weight casts) on its prepared model.
        state: the state holding the model; its train/eval mode is restored afterwards.
        data: an iterable of batches (a list, or a ``DataLoader``, split over the ranks).
        write: ``write(outputs, indices)``, called on every rank after each batch with that
            rank's outputs (one per real sample) and their dataset indices (None when the data
            is not a ``DataLoader`` with a sequential or distributed sampler), for outputs too
            big to keep or gather (``BasePredictionWriter``). Nothing is kept then.

    Returns:
        The outputs, one per sample, in dataset order, on every rank; None when ``write`` is given.

    Raises:
        TypeError: ``fn`` is a training step or not callable, ``write`` is not callable, an
            output cannot be split into its batch's samples, or ``data`` is not iterable.

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> outputs = lt.predict(lambda m, b: m(b).argmax(-1), lt.State(model=model), [torch.ones(3, 2)] * 2)
        >>> len(outputs), outputs[0]
        (6, tensor(0))
    """
    step = _as_prediction(fn)
    if write is not None and not callable(write):
        raise TypeError(f"lt.predict: write must be a callable (outputs, indices), got {type(write).__name__}")
    data = rank_data(data, state, "lt.predict")
    state, _ = bound_to(step, state)  # prepared outside inference mode (casts, lt.distribute wrappers)
    try:
        kept = _run(step, state, data, write)
    finally:
        forget(step, state)  # the step was made for this call: its binding goes with it
    if write is not None:
        return None
    return _in_order(kept, data)


def _as_prediction(fn: Any) -> TransformedStep:
    """``fn`` as an eval step whose metrics carry the output, with the transforms it came with."""
    if isinstance(fn, TransformedStep):
        if fn.body is None or fn.body.kind != "eval":
            raise TypeError(
                f"lt.predict: got the step {fn!r}; pass fn(model, batch) -> output, or "
                f"lt.eval_step(fn) piped through lt.with_precision / lt.distribute"
            )
        inner, transforms = fn.body.fn, fn.transforms
    elif callable(fn):
        inner, transforms = fn, ()
    else:
        raise TypeError(f"lt.predict: fn must be a callable fn(model, batch) -> output, got {type(fn).__name__}")

    def output(model: Any, batch: Any) -> dict[str, Any]:
        return {_KEY: inner(model, batch)}

    def step(state: Any, batch: Any) -> tuple[Any, Mapping[str, Any]]:
        return state, output(inventory(state).the_one("model", "lt.predict"), batch)

    return TransformedStep(step, transforms, counts=False, trusted=True, body=Body("eval", output))


def _run(step: TransformedStep, state: Any, data: Iterable[Any], write: Writer | None) -> list[tuple[int, Any]]:
    """(position, output) of every real sample this rank predicts; positions index the sampler's order."""
    modules = list(inventory(state).models.values())
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    indices, real = _indices(data), real_samples(data)
    kept: list[tuple[int, Any]] = []
    seen = 0
    try:
        with torch.inference_mode():
            for batch in data:
                size = batch_size(batch)
                n = 1 if size is None else size if real is None else max(0, min(size, real - seen))
                if size is not None and 0 < n < size:
                    batch = first(batch, n, size)
                state, metrics = step(state, batch)
                outputs = _split(metrics[_KEY], n, size)[:n]  # a batch of padding only: none
                where = list(range(seen, seen + n))
                seen += size or 1
                if write is not None:
                    write(outputs, None if indices is None else [indices[i] for i in where])
                else:
                    kept.extend(zip(where, outputs))
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    if indices is not None:
        kept = [(indices[i], out) for i, out in kept]
    return kept


def _split(output: Any, n: int, size: int | None) -> list[Any]:
    """``output`` as one item per sample of a batch of ``n`` samples (``size`` before the cut)."""
    if size is None:
        return [output]
    if n == 0:
        return []
    if isinstance(output, list) and len(output) == n:
        return output
    leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n]
    if not leaves:
        raise TypeError(
            f"lt.predict: cannot split fn's output ({type(output).__name__}) into its batch's {n} "
            f"samples; return a tensor (or a dict/tuple of tensors) with the batch as dim 0, or a "
            f"list with one item per sample"
        )
    return [tree_map(lambda t, i=i: t[i] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t,
                     output) for i in range(n)]


def _indices(data: Any) -> list[int] | None:
    """The dataset index of each sample this rank gets, in order, when the sampler tells them."""
    sampler = getattr(data, "sampler", None) if isinstance(data, DataLoader) else None
    if isinstance(sampler, (DistributedSampler, SequentialSampler)):
        return list(iter(sampler))  # a DistributedSampler's order is fixed by its seed and epoch
    return None


def _in_order(kept: list[tuple[int, Any]], data: Any) -> list[Any]:
    """Every rank's outputs, in dataset order (by index; a sample of a tensor-parallel group's
    shared data once) or, without indices, in rank order."""
    known = _indices(data) is not None
    if not (env.process_count() > 1 and torch.distributed.is_initialized()):
        return [out for _, out in (sorted(kept, key=lambda p: p[0]) if known else kept)]
    on_cpu = tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, kept)  # one copy, at the end
    ranks = env.all_gather_objects((known, on_cpu))
    if all(known for known, _ in ranks):
        by_index = {i: out for _, part in ranks for i, out in part}
        return [by_index[i] for i in sorted(by_index)]
    return [out for _, part in ranks for _, out in part]
