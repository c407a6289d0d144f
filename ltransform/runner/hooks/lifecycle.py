"""Hooks at the run's other points: after every ``n`` epochs, at the end, and when it fails.

``lt.every(n, fn)`` runs ``fn`` after optimizer steps; these run it at the points Lightning's
callbacks call ``on_train_epoch_end``, ``on_train_end`` and ``on_exception``. Each takes a hook
function ``fn(state)`` or ``fn(state, run)`` (a saver such as ``lt.checkpoint_sharded(dir=...)``
too: ``resume="latest"`` then looks in its directory).
"""

from __future__ import annotations

import sys
from typing import Any

from ltransform.runner.hooks import Hook, apply_hook, bind_hook, check_plain


class _Point:
    """A hook called at one of the run's points, not after steps (no ``__call__``)."""

    def __init__(self, fn: Hook, what: str, label: str = "") -> None:
        if not callable(fn):
            raise TypeError(f"lt.{what}: fn must be a callable (state) or (state, run), got {fn!r}")
        check_plain(fn, what)
        self.fn = bind_hook(fn)
        self.__name__ = f"{what}({label}{getattr(fn, '__name__', None) or type(fn).__name__})"
        self.checkpoint_dir = getattr(fn, "checkpoint_dir", None)  # resume="latest" and preemption find a saver
        self.saver = fn if self.checkpoint_dir is not None else None
        self.writes_files = getattr(fn, "writes_files", None)  # a dry run leaves a writer out
        self.saved_at: int | None = None  # the step it last ran at (a preemption then does not save it again)

    def _run(self, state: Any, run: Any) -> Any:
        result = self.fn(state, run)
        self.saved_at = run.step
        return result


class _EveryEpoch(_Point):
    def __init__(self, n: int, fn: Hook) -> None:
        super().__init__(fn, "every_epoch", f"{n}, ")
        self.n = n

    def epoch_end(self, state: Any, run: Any) -> Any:
        return self._run(state, run) if run.epoch % self.n == 0 else None


class _AtEnd(_Point):
    def end(self, state: Any, run: Any) -> Any:
        return self._run(state, run)


class _OnException(_Point):
    def exception(self, state: Any, run: Any) -> Any:
        return self._run(state, run)


def every_epoch(n: int, fn: Hook, /) -> Any:
    """A hook running ``fn`` after every ``n``-th epoch (Lightning's ``on_train_epoch_end``).

    ``fn`` takes ``(state)`` or ``(state, run)`` and returns a new state, None or
    ``lt.stop(...)``, like a hook of :func:`lt.every <ltransform.runner.hooks.every>`; it runs
    after the epoch's last step, with ``state.epoch`` already counting the finished epoch, on
    every rank.

    Args:
        n: a positive int: run after epochs ``n``, ``2n``, ...
        fn: the hook function, e.g. ``lt.checkpoint_sharded(dir=...)``.

    Returns:
        A hook for ``lt.run(hooks=[...])``.

    Raises:
        ValueError: ``n`` is not a positive int.
        TypeError: ``fn`` is not callable, or is a hook object with its own cadence.

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> seen = []
        >>> state = lt.run(lt.train_step(lambda m, b: m(b).pow(2).mean()), state, [torch.ones(4, 2)] * 3,
        ...                max_epochs=4, hooks=[lt.every_epoch(2, lambda s: seen.append(s.epoch))], progress=False)
        >>> seen
        [2, 4]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"lt.every_epoch: n must be a positive int (epochs), got {n!r}")
    return _EveryEpoch(n, fn)


def at_end(fn: Hook, /) -> Any:
    """A hook running ``fn`` once when training ends (Lightning's ``on_train_end``).

    It runs after the last step, whatever ended the run: ``max_steps``, ``max_epochs``, a hook's
    ``lt.stop()``, ``max_time``; not after an error, an interrupt or a preemption (see
    :func:`on_exception`). Its result (a new state, or None) is the state ``lt.run`` returns.

    Args:
        fn: the hook function ``(state)`` or ``(state, run)``, e.g. a final save or an export.

    Returns:
        A hook for ``lt.run(hooks=[...])``.

    Raises:
        TypeError: ``fn`` is not callable, or is a hook object with its own cadence.

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> state = lt.run(lt.train_step(lambda m, b: m(b).pow(2).mean()), state, [torch.ones(4, 2)] * 3,
        ...                hooks=[lt.at_end(lambda s: print("done at step", s.step))], progress=False)
        done at step 3
    """
    return _AtEnd(fn, "at_end")


def on_exception(fn: Hook, /) -> Any:
    """A hook running ``fn`` when an exception stops ``lt.run`` (Lightning's ``OnExceptionCheckpoint``).

    ``lt.run(..., hooks=[lt.on_exception(lt.checkpoint_sharded(dir=d))])`` saves the state so
    far when the step, the data or a hook raises, or on Ctrl-C (``KeyboardInterrupt``); the
    error then goes on as before (an interrupt returns the state, as ``lt.run`` does). The state
    is the one after the last completed optimizer step: when the error comes in the middle of an
    accumulation window, the window's micro-batches are given back to the data position (its
    gradients are not kept), so ``resume=`` from that save continues bitwise as if the error had
    not happened (only what the hooks see is rewound: after Ctrl-C ``lt.run`` returns the state
    with its counters as they were). ``run.error`` is the exception. A preemption is not an
    error: it saves through the same saver (the hook's ``checkpoint_dir``) by itself.

    If ``fn`` itself fails, the original error is still the one raised; ``fn``'s error is
    printed and added to it as a note (Python 3.11+). On several ranks ``fn`` runs on each rank the error reached:
    a collective save such as ``lt.checkpoint_sharded`` completes when every rank stops on the
    error (the same bad batch everywhere, a Ctrl-C to the launcher, a rank's death turned into
    ``lt.CollectiveError`` on the others); when one rank alone fails, its save waits for the
    others and fails at the process group's timeout, and the original error is raised.

    Args:
        fn: the hook function ``(state)`` or ``(state, run)``.

    Returns:
        A hook for ``lt.run(hooks=[...])``.

    Raises:
        TypeError: ``fn`` is not callable, or is a hook object with its own cadence.

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> def fails(model, batch):
        ...     if batch is None:
        ...         raise ValueError("a bad batch")
        ...     return model(batch).pow(2).mean()
        >>> saved = []
        >>> try:
        ...     lt.run(lt.train_step(fails), state, [torch.ones(4, 2), None], progress=False,
        ...            hooks=[lt.on_exception(lambda s, run: saved.append((s.step, repr(run.error))))])
        ... except ValueError:
        ...     pass
        >>> saved
        [(1, "ValueError('a bad batch')")]
    """
    return _OnException(fn, "on_exception")


def call_on_exception(slots: list[Any], run: Any, error: BaseException) -> Any:
    """Run every ``on_exception`` hook with the state so far, its counters and data position
    rewound to the last completed update; a hook's own error is added to ``error`` as a note and
    printed, never raised. The state so far (counters as they were: after Ctrl-C ``lt.run``
    returns it, the unfinished window's gradients with it), as the last hook left it."""
    hooks = [s.hook for s in slots if callable(getattr(s.hook, "exception", None))]
    if not hooks:
        return run.current()
    run.error = error
    micro, batches = run.micro, run.position.batches
    _rewind_to_update(run)
    state = run.current()
    for hook in hooks:
        run.doing = f"{hook.__name__} after {type(error).__name__}"
        try:
            state, _ = apply_hook(hook.exception, state, run)
        except BaseException as failure:  # noqa: BLE001  (the run's own error is the one to raise)
            note = f"lt.run: {hook.__name__} failed too: {type(failure).__name__}: {failure}"
            if hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(note)
            print(note, file=sys.stderr, flush=True)
    run.doing = None
    run.state, run.micro, run.position.batches = state, micro, batches  # the run itself is where it was
    return run.current()


def _rewind_to_update(run: Any) -> None:
    """Give back the micro-batches of an unfinished accumulation window (their gradients are not
    saved), so the data position and ``micro_step`` are those of the last completed update."""
    from ltransform.steps.accumulate import open_micro_steps

    extra = open_micro_steps(run.bound.step, run.state, run.micro)  # since the last window closed
    if 0 < extra <= run.position.batches:  # (a window begun in the previous epoch: kept as is)
        run.micro -= extra
        run.position.batches -= extra


__all__ = ["at_end", "call_on_exception", "every_epoch", "on_exception"]
