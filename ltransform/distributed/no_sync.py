"""Backward passes without the gradient all-reduce (DDP) or reduce-scatter (FSDP2): what
``lt.accumulate`` does on its non-boundary micro-steps, and ``lt.no_backward_sync`` for loops of
your own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ltransform.distributed import wrappers


@contextlib.contextmanager
def without_gradient_sync(modules: list[Any]) -> Iterator[None]:
    """Backward passes inside reduce no gradients across ranks; each module's setting restored after.
    (Any: FSDP2 or replicate modules, whose set_requires_gradient_sync torch adds to the module's class
    when wrapping it.)"""
    previous = [wrappers.gradient_sync(m) for m in modules]
    for module in modules:
        module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for module, sync in zip(modules, previous):
            module.set_requires_gradient_sync(sync)


@contextlib.contextmanager
def no_backward_sync(model: torch.nn.Module, /, enabled: bool = True) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) of the backward passes run inside,
    for accumulating gradients in a loop of your own.

    Gradients then build up on each rank alone; the first backward after the block (outside it)
    reduces them all. What ``lt.accumulate`` does on its non-boundary micro-steps, for a model
    that ``lt.distribute("ddp")`` replicated (when its step was prepared: ``lt.prepare(step,
    state)``), that ``lt.shard`` sharded, or that you wrapped in ``DistributedDataParallel``.
    On any other model (one process, a plain module) it does nothing.

    Args:
        model: the model (or a module containing the wrapped ones; ``torch.compile(model)`` too).
        enabled: ``False`` makes the block synchronise as usual: ``enabled=not boundary`` on the
            micro-step that should reduce.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> for i, x in enumerate(torch.ones(4, 3, 2)):
        ...     with lt.no_backward_sync(model, enabled=i < 3):  # reduce on the 4th only
        ...         (model(x).sum() / 4).backward()
        >>> model.weight.grad
        tensor([[3., 3.]])

    Note:
        With FSDP2 the gradients inside stay unsharded on every rank (more memory, as
        ``lt.accumulate`` without ``sync_micro_steps``). Run every forward of the block inside it
        too: DDP decides at the forward whether the backward reduces. A model replicated with
        ``lt.Strategy(static_graph=True)`` must synchronise its very first backward (torch's
        static graph is recorded then): start the block from the second iteration.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"no_backward_sync: expected the model (a torch.nn.Module), got {type(model).__name__}")
    if not enabled:
        yield
        return
    inner = wrappers.compiled_original(model)
    root = inner if inner is not None else model
    if isinstance(root, torch.nn.parallel.DistributedDataParallel):  # wrapped by the user
        with root.no_sync():
            yield
        return
    with without_gradient_sync(_synchronising(root)):
        yield


def _synchronising(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost modules of ``module`` (itself included) that reduce gradients: FSDP2's and replicate's
    (FSDP2's setting reaches its inner units)."""
    if wrappers.is_sharded(module) or wrappers.is_replicated(module):
        return [module]
    return [found for child in module.children() for found in _synchronising(child)]
