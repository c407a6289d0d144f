"""Runner hooks: what ``lt.run`` calls around its loop, built-in features and users' functions alike.

A hook is a plain function ``fn(state)`` or ``fn(state, run)``, called after every optimizer
step, or an object with any of these (all optional except ``__call__``):

- ``__call__(state, run)``: called at the steps it is due; returns a new state, None (keep the
  state) or ``lt.stop(...)`` (an object without it is called only at the points below);
- ``next_step(step) -> int``: the first step after ``step`` at which it is due (default: every
  ``cadence`` steps, ``cadence`` defaulting to 1); ``math.inf`` for never;
- ``start(state, run)``, ``epoch_end(state, run)``, ``end(state, run)``: before the first step,
  after each epoch, after the last step (same returns as ``__call__``);
- ``exception(state, run)``: when an error or an interrupt stops the loop, before ``close``
  (``run.error`` is the exception; see ``lt.on_exception``);
- ``around_step(call) -> call``: wraps the loop's step call ``call(state, batch, micro) ->
  (state, metrics, applied)``, to see every step call (the running means of ``log_reduce="mean"``);
  it costs every step, so only a hook that needs each call has it;
- ``close(run)``: always, last, also after an error or an interrupt;
- ``prepare(state) -> state``: once, before a checkpoint is loaded (``resume=``), to add what the
  hook keeps in the state (e.g. ``lt.ema``'s average in ``state.extra``) so the load fills it;
- ``reads_state = False``: it does not look at the state's counters (saves materialising them);
- ``writes_files = True``: it writes files, so ``lt.run(dry_run=...)`` leaves it out;
- ``checkpoint_dir``: the directory of its ``step-N`` checkpoints, where ``resume="latest"``
  looks and where a preemption saves (by calling it, unless its ``saved_at`` is the step).

``run`` is the run context (:class:`ltransform.runner.context.Run`): the counters, the latest
metrics (it is a mapping of them, so ``run["loss"]`` works), logged and evaluated values, the
data position, ``run.log(values)``. Logging, evaluation, the progress bar, checkpoints,
preemption and the monitors are hooks of this shape, assembled by ``lt.run``'s keywords.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import attrs

from ltransform.core.state import read_counters

Hook = Callable[..., Any]
NEVER = math.inf  # the next_step of a hook that is not due again


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


def _wants_run(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes a second positional argument (the run)."""
    call = getattr(type(fn), "__call__", None)  # noqa: B004  (the class's own function, to inspect)
    if inspect.isfunction(call):  # a hook object: its class answers once (inspect costs ~90 us a call)
        return _class_takes_two(call)
    return _takes_two(fn, 0)


@functools.lru_cache(maxsize=256)
def _class_takes_two(call: Callable[..., Any]) -> bool:
    """For a class's ``__call__`` (classes live as long as the process: caching keeps nothing alive)."""
    return _takes_two(call, 1)


def _takes_two(fn: Callable[..., Any], bound: int) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) - bound >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def bind_hook(fn: Any) -> Callable[[Any, Any], Any]:
    """``fn`` as ``hook(state, run)``, whether it takes ``(state)`` or ``(state, run)``."""
    if not callable(fn):
        raise TypeError(f"lt.run: a hook must be callable state -> state | None, got {fn!r}")
    if _wants_run(fn):
        return fn
    return lambda state, run: fn(state)


class Slot:
    """A hook as the loop holds it: the call, when it is next due, and whether it reads the state."""

    __slots__ = ("call", "hook", "name", "next_step", "reads_state")

    def __init__(self, hook: Any) -> None:
        self.hook = hook
        self.name: str = getattr(hook, "__name__", None) or type(hook).__name__
        self.next_step: Callable[[int], float]
        self.call: Callable[[Any, Any], Any]
        self.reads_state: bool
        if not callable(hook) and any(hasattr(hook, m) for m in ("start", "epoch_end", "end", "exception", "close")):
            self.call, self.next_step, self.reads_state = _nothing, _never, False  # no step calls
            return
        self.call = bind_hook(hook)
        self.reads_state = getattr(hook, "reads_state", True)
        next_step = getattr(hook, "next_step", None)
        if next_step is None:
            n = getattr(hook, "cadence", 1)
            next_step = (lambda step: step + 1) if n == 1 else (lambda step: (step // n + 1) * n)
        self.next_step = next_step


def _nothing(state: Any, run: Any) -> None:
    return None


def _never(step: int) -> float:
    return NEVER


def check_plain(fn: Any, what: str, hint: str = "") -> None:
    """Refuse a hook object with its own cadence or lifecycle where ``lt.{what}`` wraps a hook
    function: the wrapper would drop them."""
    own = [m for m in ("next_step", "start", "epoch_end", "end", "exception", "close", "prepare") if hasattr(fn, m)]
    if own:
        raise TypeError(
            f"lt.{what}: {getattr(fn, '__name__', None) or type(fn).__name__} is a hook object with its own "
            f"cadence and lifecycle ({', '.join(own)}), which lt.{what} would drop; pass it in hooks=[...] "
            f"directly{hint}"
        )


def every(n: int, fn: Hook, /) -> Callable[[Any, Any], Any]:
    """A hook running ``fn`` every ``n`` optimizer steps (when ``state.step % n == 0``).

    ``fn`` takes ``(state)`` or ``(state, run)`` (``run`` is also a mapping of the latest
    metrics) and returns a new state, None (keep the state) or ``lt.stop(...)``.

    Example:
        >>> import ltransform as lt
        >>> hook = lt.every(100, lambda state: print("step", state.step))
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"every: n must be a positive int (optimizer steps), got {n!r}")
    check_plain(fn, "every", " (most take every=)")
    inner = bind_hook(fn)

    def hook(state: Any, run: Any) -> Any:
        if read_counters(state)[0] % n == 0:
            return inner(state, run)
        return None

    hook.__name__ = f"every({n}, {getattr(fn, '__name__', repr(fn))})"
    hook.cadence = n  # type: ignore[attr-defined]  # lt.run calls it only at multiples of n
    hook.checkpoint_dir = getattr(fn, "checkpoint_dir", None)  # type: ignore[attr-defined]  # for resume="latest"
    hook.saver = fn if hook.checkpoint_dir is not None else None  # type: ignore[attr-defined]  # for preemption
    hook.writes_files = getattr(fn, "writes_files", None)  # type: ignore[attr-defined]  # a dry run leaves it out
    return hook


def say(text: str) -> None:
    """A line on rank 0's stderr that does not break a progress bar."""
    from ltransform.distributed import env

    if env.rank() == 0:
        import sys

        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)


def apply_hook(hook: Callable[..., Any], state: Any, run: Any) -> tuple[Any, bool]:
    """Run one hook (bound: ``(state, run)``); returns ``(state, stop)``."""
    result = hook(state, run)
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



def cadence_next(n: int | None) -> Callable[[int], float]:
    """``next_step`` for a hook due every ``n`` steps (None: never)."""
    if not n:
        return lambda step: NEVER
    return lambda step: (step // n + 1) * n


__all__ = ["NEVER", "Hook", "Slot", "Stop", "apply_hook", "bind_hook", "cadence_next", "check_plain", "every", "say",
           "stop"]
