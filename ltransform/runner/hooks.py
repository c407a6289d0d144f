"""Runner hooks: ``every``, ``stop``, and calling a hook with or without metrics."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ltransform.core.state import read_counters

Hook = Callable[..., Any]


@attrs.frozen
class Stop:
    """Returned by a hook to end the run after the current step (see :func:`stop`)."""

    state: Any = None


def stop(state: Any = None) -> Stop:
    """What a hook returns to stop ``lt.run`` early; ``state`` replaces the current one if given.

    Example:
        >>> import ltransform as lt
        >>> def stop_at_loss(state, metrics):
        ...     return lt.stop() if metrics["loss"] < 0.1 else None
    """
    return Stop(state)


def _wants_metrics(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def bind_hook(fn: Any) -> Callable[[Any, Mapping[str, Any]], Any]:
    """``fn`` as ``hook(state, metrics)``, whether it takes ``(state)`` or ``(state, metrics)``."""
    if not callable(fn):
        raise TypeError(f"lt.run: a hook must be callable state -> state | None, got {fn!r}")
    if _wants_metrics(fn):
        return fn
    return lambda state, metrics: fn(state)


def every(n: int, fn: Hook, /) -> Callable[[Any, Mapping[str, Any]], Any]:
    """A hook running ``fn`` every ``n`` optimizer steps (when ``state.step % n == 0``).

    ``fn`` takes ``(state)`` or ``(state, metrics)`` and returns a new state, None (keep the
    state) or ``lt.stop(...)``.

    Example:
        >>> import ltransform as lt
        >>> hook = lt.every(100, lambda state: print("step", state.step))
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"every: n must be a positive int (optimizer steps), got {n!r}")
    inner = bind_hook(fn)

    def hook(state: Any, metrics: Mapping[str, Any]) -> Any:
        if read_counters(state)[0] % n == 0:
            return inner(state, metrics)
        return None

    hook.__name__ = f"every({n}, {getattr(fn, '__name__', repr(fn))})"
    hook.cadence = n  # lt.run calls it only at multiples of n
    hook.checkpoint_dir = getattr(fn, "checkpoint_dir", None)  # for lt.run(resume="latest")
    hook.saver = fn if hook.checkpoint_dir is not None else None  # for a save at preemption
    return hook


def apply_hook(hook: Callable[..., Any], state: Any, metrics: Mapping[str, Any]) -> tuple[Any, bool]:
    """Run one bound hook; returns ``(state, stop)``."""
    result = hook(state, metrics)
    if result is None:
        return state, False
    if isinstance(result, Stop):
        return (state if result.state is None else result.state), True
    if type(result) is not type(state):
        raise TypeError(
            f"hook {getattr(hook, '__name__', hook)!r} returned {type(result).__name__}; a hook "
            f"returns the state ({type(state).__name__}), None, or lt.stop(state)"
        )
    return result, False
