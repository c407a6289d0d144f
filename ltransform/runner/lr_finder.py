"""``find_lr``: a learning-rate range test (Lightning's ``Tuner.lr_find``) that runs the real
(transformed) step and then puts every torch object of the state back as it was."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import random
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs
import torch

from ltransform.core import binding
from ltransform.core.binding import bound_to, lookup, sees_counters
from ltransform.core.inventory import anchor, inventory
from ltransform.core.state import read_counters, with_counters
from ltransform.core.state import _replace as replace_fields
from ltransform.core.step import as_step
from ltransform.distributed import env

_MODES = ("exponential", "linear")


@attrs.frozen(kw_only=True)
class LRFinding:
    """What :func:`find_lr` found.

    Args:
        lrs: the learning rates tried, in order (fewer than ``steps`` if the loss diverged).
        losses: the smoothed loss after each update, averaged across ranks.
        suggestion: the learning rate where the smoothed loss falls fastest (None if too few
            finite points were recorded).
        diverged: the sweep stopped early because the loss diverged.
        mode: how the rates were spaced, ``"exponential"`` or ``"linear"``.
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    suggestion: float | None
    diverged: bool
    mode: str = "exponential"

    def plot(self, ax: Any = None, *, suggest: bool = True) -> Any:
        """Plot loss against learning rate (log scale when exponential); needs matplotlib.

        Returns:
            The matplotlib ``Axes`` drawn on.

        Raises:
            ImportError: matplotlib is not installed (the message names the pip install).
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError("LRFinding.plot needs matplotlib: pip install matplotlib") from error
        if ax is None:
            _, ax = plt.subplots()
        ax.plot(self.lrs, self.losses)
        if self.mode == "exponential":
            ax.set_xscale("log")
        if suggest and self.suggestion is not None:
            ax.axvline(self.suggestion, color="red", linestyle="--", label=f"suggestion {self.suggestion:.2e}")
            ax.legend()
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss (smoothed)")
        return ax


def find_lr(
    step: Any,
    state: Any,
    data: Iterable[Any],
    *,
    min_lr: float = 1e-8,
    max_lr: float = 1.0,
    steps: int = 100,
    mode: str = "exponential",
    smoothing: float = 0.98,
    diverge: float | None = 4.0,
    skip_begin: int = 10,
    skip_end: int = 1,
    distributed_sampler: bool = True,
) -> LRFinding:
    """Learning-rate range test: train ``steps`` updates with the learning rate swept from
    ``min_lr`` to ``max_lr``, then put the state back as it was.

    Every update (one accumulation window of the step) runs at the next learning rate, set in
    every param group of every optimizer in the state. The sweep runs on the state with its
    schedulers taken out (as Lightning swaps them out): an ``lt.State`` with ``scheduler=None``,
    a dict, attrs class or dataclass state with None where each sat, so no scheduler steps,
    runs past its ``total_steps`` or changes momentum; a hand-written step sees that state. The
    models train in train mode (as ``lt.run`` puts them; ``from_pretrained`` leaves a model in
    eval mode, dropout off), and each module's mode is put back afterwards.

    After each update the loss (the mean over the window's micro-steps, averaged across ranks)
    is smoothed as Lightning does (an exponential moving average with bias correction); the
    sweep stops early once the smoothed loss exceeds ``diverge`` times the best so far, or is
    not finite. The suggestion is the learning rate of the steepest descent of the smoothed
    loss (its most negative gradient against ``log(lr)``, or ``lr`` when linear), leaving out
    the first ``skip_begin`` and the last ``skip_end`` points, as Lightning's ``suggestion()``.

    Afterwards the models' parameters, buffers and gradients, the optimizers' state and param
    groups, the schedulers' state, ``state.extra`` objects (a grad scaler), and the RNG states
    (torch, CUDA, ``random``, numpy) are restored bitwise; the state record and its counters
    are never changed, so training from ``state`` starts where it would have without
    ``find_lr``. On several ranks every rank gets the same result (call it on every rank).

    Args:
        step: a training step (``lt.train_step(loss_fn)``, transformed or not) whose metrics
            hold ``"loss"``.
        state: the state to start from; it is left as it was.
        data: batches, re-iterated as often as the sweep needs. On several ranks a
            ``DataLoader`` is given a ``DistributedSampler``, as in ``lt.run``.
        min_lr: the first learning rate, > 0.
        max_lr: the last learning rate, > ``min_lr``.
        steps: how many updates (learning rates) to try, >= 2.
        mode: ``"exponential"`` (geometric spacing) or ``"linear"``.
        smoothing: the moving average's factor in [0, 1) (0: no smoothing).
        diverge: stop once the smoothed loss exceeds this many times the best one (> 1);
            None: never stop early (a non-finite loss still stops).
        skip_begin: points left out at the start when suggesting.
        skip_end: points left out at the end when suggesting.
        distributed_sampler: as ``lt.run``'s.

    Returns:
        An :class:`LRFinding` (``lrs``, ``losses``, ``suggestion``, ``diverged``, ``plot()``).

    Raises:
        ValueError: a bad option (the message names the valid values); the state has no
            optimizer.
        KeyError: the step's metrics have no ``"loss"``.

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Linear(1, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> data = [(x := torch.randn(16, 1), 3 * x) for _ in range(4)]
        >>> found = lt.find_lr(lt.train_step(lambda m, b: (m(b[0]) - b[1]).pow(2).mean()), state, data,
        ...                    min_lr=1e-4, max_lr=10.0, steps=40)
        >>> 1e-4 <= found.suggestion < 2.0 and found.diverged
        True

    Note:
        Each update costs one host sync (the loss is read to decide whether to stop), which a
        tuner can afford. The copy of the models and optimizer state is kept on their devices
        while it runs (twice their memory). Step transforms that count across calls
        (``lt.guard_nonfinite``) see the sweep's updates when ``lt.run`` had already bound the
        step to a state without schedulers; otherwise the sweep prepares the step afresh (the
        transforms' ``prepare`` runs again, on the state without its schedulers).
    """
    lrs = _sweep_values(min_lr, max_lr, steps, mode)
    _check_fraction("smoothing", smoothing)
    if diverge is not None and (isinstance(diverge, bool) or not isinstance(diverge, (int, float)) or diverge <= 1):
        raise ValueError(f"lt.find_lr: diverge must be a number > 1 (a multiple of the best loss) or None, "
                         f"got {diverge!r}")
    for name, value in (("skip_begin", skip_begin), ("skip_end", skip_end)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"lt.find_lr: {name} must be an int >= 0, got {value!r}")
    step = as_step(step, "lt.find_lr")
    distributed = env.ensure_process_group() and env.process_count() > 1
    if distributed and distributed_sampler:
        from ltransform.runner.data import data_parallel, per_rank

        parts, part = data_parallel(inventory(state).models.values(), world=env.process_count(),
                                    rank=env.process_index())
        data = per_rank(data, world=parts, rank=part)
    if not inventory(state).optimizers:
        raise ValueError("lt.find_lr: the state has no optimizer; give it one: lt.State(model=..., optimizer=...)")
    schedulers = list(inventory(state).schedulers.values())
    bare = _without(state, {id(s) for s in schedulers}) if schedulers else state
    kept = lookup(step, state)  # (binding the bare state replaces it: it is put back after)
    # bound afresh without schedulers (a binding's signature does not see one kept in extra)
    prepared, bound = binding.bind(step, bare) if schedulers else bound_to(step, state)
    saved = _snapshot(prepared, schedulers)
    modes = [(m, m.training) for model in inventory(prepared).models.values() for m in model.modules()]
    try:
        for model in inventory(prepared).models.values():
            model.train()  # as lt.run trains (a model from from_pretrained comes in eval mode)
        tried, losses, diverged = _sweep(bound, prepared, data, lrs, smoothing, diverge, distributed)
    finally:
        for module, was in modes:
            module.training = was  # each module's own flag (a frozen part may be in eval mode)
        _restore(prepared, saved)
        for done in (bare, prepared):  # the next lt.run prepares the state afresh, as it would have,
            binding.forget(step, done)
        if kept is not None:  # or finds the binding it had (a private helper of our own core)
            binding._remember(anchor(state), step, kept)
    return LRFinding(lrs=tuple(tried), losses=tuple(losses), diverged=diverged, mode=mode,
                     suggestion=suggest(tried, losses, log=mode == "exponential", skip_begin=skip_begin,
                                        skip_end=skip_end))


def _sweep_values(min_lr: Any, max_lr: Any, steps: Any, mode: Any) -> list[float]:
    if mode not in _MODES:
        raise ValueError(f"lt.find_lr: unknown mode {mode!r}; expected one of: {', '.join(map(repr, _MODES))}")
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"lt.find_lr: {name} must be a positive finite number, got {value!r}")
    if max_lr <= min_lr:
        raise ValueError(f"lt.find_lr: max_lr must be greater than min_lr, got min_lr={min_lr!r}, max_lr={max_lr!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"lt.find_lr: steps must be an int >= 2 (updates to try), got {steps!r}")
    if mode == "exponential":
        return [min_lr * (max_lr / min_lr) ** (i / (steps - 1)) for i in range(steps)]
    return [min_lr + (max_lr - min_lr) * i / (steps - 1) for i in range(steps)]


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"lt.find_lr: {name} must be a number in [0, 1), got {value!r}")


def _batches(data: Iterable[Any]) -> Iterator[Any]:
    """``data`` over and over (a fresh pass each time it ends)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("lt.find_lr: data yielded no batches; pass a re-iterable (a list or DataLoader)")


def _sweep(bound: Any, state: Any, data: Iterable[Any], lrs: list[float], smoothing: float,
           diverge: float | None, distributed: bool) -> tuple[list[float], list[float], bool]:
    """Run one update per learning rate; the rates tried, the smoothed losses, whether it diverged."""
    optimizers = list(inventory(state).optimizers.values())
    run, looks, window = bound.run, sees_counters(bound), max(bound.step.every, 1)
    count, micro = read_counters(state)
    batches = _batches(data)
    tried: list[float] = []
    losses: list[float] = []
    average, best = 0.0, math.inf
    for i, lr in enumerate(lrs):
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        total, calls, applied = None, 0, 0
        while not applied and calls < window:  # one update: the micro-steps of one window
            if looks:
                state = with_counters(state, count, micro)
            state, metrics, applied = run(state, next(batches), micro)
            micro, calls = micro + 1, calls + 1
            if applied < 0:
                count, micro = read_counters(state)
            else:
                count += applied
            if "loss" not in metrics:
                raise KeyError(f"lt.find_lr: the step's metrics have no 'loss' (got {sorted(metrics)}); return "
                               f"(state, {{'loss': loss, ...}}) from the step")
            loss = torch.as_tensor(metrics["loss"]).detach()
            if loss.element_size() < 4 or not loss.is_floating_point():  # (sums of half-precision losses)
                loss = loss.float()
            total = loss if total is None else total + loss
        value = float(total / calls)  # type: ignore[operator]  # the one host sync of an update
        if distributed:
            value = env.all_reduce(value, "mean")  # every rank decides on the same numbers
        average = smoothing * average + (1 - smoothing) * value
        smoothed = average / (1 - smoothing ** (i + 1))
        tried.append(lr)
        losses.append(smoothed)
        if not math.isfinite(smoothed) or (diverge is not None and i > 0 and smoothed > diverge * best):
            return tried, losses, True
        best = min(best, smoothed)
    return tried, losses, False


def suggest(lrs: Iterable[float], losses: Iterable[float], *, log: bool = True, skip_begin: int = 10,
            skip_end: int = 1) -> float | None:
    """The learning rate where ``losses`` fall fastest: the most negative gradient against
    ``log(lr)`` (``lr`` if not ``log``), leaving out ``skip_begin`` points at the start and
    ``skip_end`` at the end and the non-finite ones; None if fewer than 2 points remain
    (Lightning's ``_LRFinder.suggestion``).

    Example:
        >>> from ltransform.runner.lr_finder import suggest
        >>> suggest([1e-3, 1e-2, 1e-1, 1.0], [1.0, 0.9, 0.5, 0.45], skip_begin=0, skip_end=0)
        0.01
    """
    lrs, losses = list(lrs), list(losses)
    points = [(lr, loss) for lr, loss in zip(lrs, losses)][skip_begin:len(lrs) - skip_end]
    points = [(lr, loss) for lr, loss in points if math.isfinite(loss)]
    if len(points) < 2:
        return None
    x = torch.tensor([math.log(lr) if log else lr for lr, _ in points], dtype=torch.float64)
    y = torch.tensor([loss for _, loss in points], dtype=torch.float64)
    gradient = torch.gradient(y, spacing=(x,))[0]
    return points[int(torch.argmin(gradient))][0]


# --- putting the state back --------------------------------------------------------------------


def _without(node: Any, schedulers: set[int]) -> Any:
    """``node`` with each of ``schedulers`` (ids) replaced by None: an ``lt.State`` with
    ``scheduler=None``, a dict, attrs class, dataclass, list or tuple rebuilt where one sits
    (the walk of ``core/inventory.py``); the torch objects themselves are not copied."""
    if id(node) in schedulers:
        return None
    if isinstance(node, (torch.Tensor, torch.nn.Module, torch.optim.Optimizer, str, bytes)):
        return node
    if isinstance(node, Mapping):
        items = {k: _without(v, schedulers) for k, v in node.items()}
        return items if any(items[k] is not v for k, v in node.items()) else node
    if isinstance(node, (list, tuple)):
        values = [_without(v, schedulers) for v in node]
        if all(a is b for a, b in zip(values, node)):
            return node
        return type(node)(*values) if hasattr(node, "_fields") else type(node)(values)  # (a namedtuple)
    if attrs.has(type(node)):
        names = [a.name for a in attrs.fields(type(node))]
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        names = [f.name for f in dataclasses.fields(node)]
    else:
        return node
    changes = {name: _without(getattr(node, name), schedulers) for name in names}
    changes = {name: new for name, new in changes.items() if new is not getattr(node, name)}
    return replace_fields(node, **changes) if changes else node


def _snapshot(state: Any, schedulers: Iterable[Any] = ()) -> dict[str, Any]:
    """Copies of what a sweep changes: tensors of the models (values and gradients), optimizer,
    scheduler (``schedulers``: those taken out of ``state``) and extras' state dicts, and the
    RNG states."""
    inv = inventory(state)
    tensors = []
    with torch.no_grad():
        for model in inv.models.values():
            for t in itertools.chain(model.parameters(), model.buffers()):
                grad = t.grad.detach().clone() if t.grad is not None else None
                tensors.append((t, t.detach().clone(), grad))
    objects = [*inv.optimizers.values(), *inv.schedulers.values(), *schedulers, *inv.extras.values()]
    stateful = [o for o in objects
                if callable(getattr(o, "state_dict", None)) and callable(getattr(o, "load_state_dict", None))]
    return {"tensors": tensors, "stateful": [(o, copy.deepcopy(o.state_dict())) for o in stateful],
            "rng": _rng_states()}


def _restore(state: Any, saved: dict[str, Any]) -> None:
    with torch.no_grad():
        for t, value, grad in saved["tensors"]:
            t.copy_(value)
            t.grad = grad
    for obj, state_dict in saved["stateful"]:
        obj.load_state_dict(state_dict)
    _set_rng_states(saved["rng"])


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:
        states["numpy"] = sys.modules["numpy"].random.get_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["random"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        sys.modules["numpy"].random.set_state(states["numpy"])
