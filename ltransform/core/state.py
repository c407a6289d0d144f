"""Training state: a frozen record, its counters and extras, in any kind of state.

The record is replaced, never edited; the torch objects inside it are mutable. Any attrs
class, dataclass or dict also works as state: ``core/inventory.py`` finds the torch objects
in it, in one walk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch


@attrs.frozen(kw_only=True, slots=False)  # a __dict__ makes the per-step copy one dict copy
class State:
    """What a step reads and returns; keyword arguments only.

    Args:
        model: a ``torch.nn.Module`` (or a dict/list of them for several models).
        optimizer: a ``torch.optim.Optimizer`` (or several), built *after* model transforms.
        scheduler: an LR scheduler, stepped only when an optimizer update was applied.
        step: optimizer updates applied so far (the global step loggers see).
        micro_step: step calls so far; differs from ``step`` under accumulation.
        epoch: completed passes over the training data.
        extra: anything else to carry and checkpoint (a grad scaler, user values).

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> state.step, state.micro_step
        (0, 0)
    """

    model: Any
    optimizer: Any = None
    scheduler: Any = None
    step: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    micro_step: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    epoch: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    def __new__(cls, *args: Any, **kwargs: Any) -> State:
        if args:  # attrs' own message ("takes 1 positional argument") does not say what to do
            raise TypeError(
                f"lt.State takes keyword arguments only: lt.State(model=..., optimizer=...), got "
                f"{len(args)} positional argument{'s' * (len(args) > 1)}"
            )
        return super().__new__(cls)


_new, _set = object.__new__, object.__setattr__


def _copy_state(state: State, **changes: Any) -> State:
    # attrs.evolve re-runs __init__ and its validators (~3 us); a copy of the fields is
    # enough for values that are valid by construction.
    new = _new(State)
    _set(new, "__dict__", {**state.__dict__, **changes})
    return new


# --- extras (a grad scaler, ...) -------------------------------------------------------


def extras(state: Any) -> Mapping[str, Any]:
    """``state.extra`` (``state["extra"]`` for a dict state), ``{}`` if it has none."""
    extra = state.get("extra", {}) if isinstance(state, Mapping) else getattr(state, "extra", {})
    return extra if isinstance(extra, Mapping) else {}


def get_extra(state: Any, key: str) -> Any:
    """``state.extra[key]`` (or ``state[key]`` for a dict state), None if absent."""
    if isinstance(state, Mapping):
        return state.get(key)
    extra = getattr(state, "extra", None)
    return extra.get(key) if isinstance(extra, Mapping) else None


def with_extra(state: Any, key: str, value: Any) -> Any:
    """A new state carrying ``value`` under ``key`` in its extras."""
    if isinstance(state, Mapping):
        return {**state, key: value}
    extra = getattr(state, "extra", None)
    if not isinstance(extra, Mapping):
        raise TypeError(
            f"cannot store {key!r} in a state of type {type(state).__name__}: it has no "
            f"'extra' dict field; use lt.State, a dict, or add `extra: dict` to your class"
        )
    return _replace(state, extra={**extra, key: value})


# --- counters --------------------------------------------------------------------------


def _replace(state: Any, **changes: Any) -> Any:
    if isinstance(state, State):
        return _copy_state(state, **changes)
    if isinstance(state, Mapping):
        return {**state, **changes}
    if attrs.has(type(state)):
        return attrs.evolve(state, **changes)
    return dataclasses.replace(state, **changes)


def read_epoch(state: Any) -> int:
    """Completed passes over the data (0 for a state without an ``epoch``)."""
    return state.get("epoch", 0) if isinstance(state, Mapping) else getattr(state, "epoch", 0)


def read_counters(state: Any) -> tuple[int, int]:
    """``(step, micro_step)`` of ``state``."""
    if type(state) is State:
        return state.step, state.micro_step
    if isinstance(state, Mapping):
        return state.get("step", 0), state.get("micro_step", 0)
    try:
        return state.step, state.micro_step
    except AttributeError:
        raise TypeError(
            f"a state of type {type(state).__name__} has no 'step'/'micro_step' counters; "
            f"use lt.State, a dict, or add `step: int = 0` and `micro_step: int = 0` fields"
        ) from None


def advance(state: Any, applied: bool) -> Any:
    """A new state one micro-step on, and one step on if an update was ``applied``."""
    if type(state) is State:  # the per-step fast path: one dict copy (0.5 us)
        fields = state.__dict__.copy()
        fields["step"] += applied
        fields["micro_step"] += 1
        new = _new(State)
        _set(new, "__dict__", fields)
        return new
    step, micro = read_counters(state)
    return _replace(state, step=step + applied, micro_step=micro + 1)


def with_counters(state: Any, step: int, micro_step: int) -> Any:
    """``state`` carrying these counters (itself if it already does): how the runner, which
    keeps the counters in plain ints while it runs, materialises the state where it is looked at."""
    if read_counters(state) == (step, micro_step):
        return state
    return _replace(state, step=step, micro_step=micro_step)


def set_field(state: Any, name: str, value: Any) -> Any:
    """A new state with field (or dict key) ``name`` set; unknown fields are left alone."""
    if isinstance(state, (State, Mapping)) or hasattr(state, name):
        return _replace(state, **{name: value})
    return state


_REPLACED = "_ltransform_replaced_by"


def mark_replaced(params: Iterable[torch.Tensor], by: str) -> None:
    """Mark parameters a model transform has swapped for new ones (e.g. sharded copies)."""
    for param in params:
        setattr(param, _REPLACED, by)


def check_optimizers(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Raise if an optimizer holds parameters that a model transform has since replaced."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                by = getattr(param, _REPLACED, None)
                if by is not None:
                    raise RuntimeError(
                        f"the optimizer {type(optimizer).__name__} was built before {by}, so it holds "
                        f"the old parameters, which {by} replaced; build the optimizer after "
                        f"the model transforms: model = {by}(model, ...); "
                        f"optimizer = {type(optimizer).__name__}(model.parameters(), ...)"
                    )
