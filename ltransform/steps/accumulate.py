"""``accumulate``: gradient accumulation over ``n`` micro-steps, or over a schedule of epochs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ltransform.core.compose import MISSING
from ltransform.core.effects import Effect, Handler, Stage, When
from ltransform.core.state import get_extra, read_counters, read_epoch, with_extra
from ltransform.core.step import StepTransform, apply_step_transform

WINDOW = "accumulate_window"  # state.extra key: (first micro-step of the current run of windows, their n)


def accumulate(step: Any = MISSING, /, n: Any = MISSING, *, schedule: Any = None) -> Any:
    """Accumulate gradients over ``n`` step calls (micro-steps), updating on the n-th.

    Each micro-step's loss is divided by ``n`` once, before backward; on the other micro-steps
    ``lt.optimizer_step`` returns False and keeps the gradients (and, under ``distribute``,
    gradients are not synchronised). The boundary is decided once per call from
    ``state.micro_step``: micro-step ``k`` is a boundary when ``(k + 1) % n == 0``.

    With ``schedule`` (Lightning's ``GradientAccumulationScheduler``) ``n`` changes with the
    epoch: ``{0: 8, 4: 4}`` accumulates 8 micro-steps per update in epochs 0-3 and 4 from
    epoch 4 on. Epochs before the smallest key use ``n = 1`` (as Lightning does). A window is
    never cut: the new ``n`` applies from the first window that *starts* in (or after) the
    epoch of its key, so a window of 8 that began in epoch 3 closes after its 8th micro-step
    in epoch 4, and every window's losses are divided by that window's own ``n``. Where the
    current run of windows began is kept in ``state.extra["accumulate_window"]`` (checkpointed
    with the state, so a resumed run continues the same windows).

    Args:
        step: the step to transform; omit it for the partial form.
        n: micro-steps per optimizer update, a positive int.
        schedule: instead of ``n``, a dict ``{epoch: n}`` with int epochs >= 0 and positive
            int ``n``; read against ``state.epoch``.

    Raises:
        ValueError: ``n`` is not a positive int; a bad ``schedule``; both or neither given;
            ``accumulate`` applied twice.
        TypeError: ``schedule`` is not a dict.

    Example:
        >>> import torch, ltransform as lt
        >>> step = lt.pipe(lt.train_step(lambda m, b: m(b).sum()), lt.accumulate(2))
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> state, _ = step(state, torch.ones(1, 2)); state, _ = step(state, torch.ones(1, 2))
        >>> state.micro_step, state.step
        (2, 1)
        >>> lt.accumulate(schedule={0: 8, 4: 4, 8: 1})
        lt.accumulate(schedule={0: 8, 4: 4, 8: 1})

    Note:
        Accumulation windows run across epoch ends: a window is closed by the n-th call,
        whichever epoch it falls in.
    """
    if n is MISSING and not callable(step) and step is not MISSING:
        step, n = MISSING, step
    if schedule is not None:
        if n is not MISSING:
            raise ValueError(f"accumulate: give n or schedule, not both (got n={n!r} and schedule={schedule!r})")
        return apply_step_transform(step, _scheduled(check_schedule(schedule)), "accumulate")
    if n is MISSING:
        raise ValueError("accumulate: give n (micro-steps per update), e.g. lt.accumulate(4), or "
                         "schedule={epoch: n}, e.g. lt.accumulate(schedule={0: 8, 4: 4})")
    if isinstance(n, Mapping):
        raise ValueError(f"accumulate: n must be a positive int (micro-steps per update), got the dict {n!r}; "
                         f"pass a schedule by name: lt.accumulate(schedule={n!r})")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"accumulate: n must be a positive int (micro-steps per update), got {n!r}")
    transform = StepTransform(
        name=f"accumulate(n={n})",
        kind="accumulate",
        every=n,
        handlers=(
            Handler(effect=Effect.BACKWARD, stage=Stage.LOSS_NORMALIZE, fn=_normalize,
                    label=f"accumulate: divide loss by {n}"),
            _GATE,
        ),
        prepare=lambda state: (state, n),
    )
    return apply_step_transform(step, transform, "accumulate")


def _normalize(n: int, frame, loss, *, proceed):
    return proceed(frame, loss / n)


def _gate(n: int, frame, optimizer, *, proceed):
    return False  # in the non-boundary chain only, where it ends the chain


_GATE = Handler(effect=Effect.OPTIMIZER_STEP, stage=Stage.GATE, fn=_gate,
                label="accumulate: return False, keep gradients", when=When.NON_BOUNDARY, halts=True)


# --- the schedule ------------------------------------------------------------------------


def check_schedule(schedule: Any) -> tuple[tuple[int, int], ...]:
    """``schedule`` as sorted ``(epoch, n)`` pairs, with ``(0, 1)`` first if it has no key 0.

    Raises:
        TypeError: not a dict.
        ValueError: empty, a key not an int >= 0, or an ``n`` not a positive int.
    """
    hint = "e.g. lt.accumulate(schedule={0: 8, 4: 4, 8: 1}) (from epoch 0: 8 micro-steps per update, ...)"
    if not isinstance(schedule, Mapping):
        raise TypeError(f"accumulate: schedule must be a dict {{epoch: n}}, got {type(schedule).__name__} "
                        f"{schedule!r}; {hint}")
    if not schedule:
        raise ValueError(f"accumulate: schedule is empty; give at least one epoch: n, {hint}")
    for epoch, n in schedule.items():
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"accumulate: schedule keys must be epochs, ints >= 0, got {epoch!r}; {hint}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"accumulate: schedule[{epoch}] must be a positive int (micro-steps per update), "
                             f"got {n!r}")
    pairs = sorted(schedule.items())
    return tuple(pairs if pairs[0][0] == 0 else [(0, 1), *pairs])


def n_at(schedule: tuple[tuple[int, int], ...], epoch: int) -> int:
    """The ``n`` the schedule gives from ``epoch`` on."""
    n = 1
    for first, value in schedule:
        if first > epoch:
            break
        n = value
    return n


def _scheduled(schedule: tuple[tuple[int, int], ...]) -> StepTransform:
    shown = "{" + ", ".join(f"{e}: {n}" for e, n in schedule) + "}"

    def window(state: Any, micro: int) -> tuple[Any, bool, int]:
        """The boundary decision of micro-step ``micro``: (state, boundary, the window's n)."""
        record = get_extra(state, WINDOW)
        if record is None or record[0] > micro:  # none yet, or counters set back: windows start here
            start, n = micro, n_at(schedule, read_epoch(state))
            state = with_extra(state, WINDOW, (start, n))
        else:
            start, n = record
            if (micro - start) % n == 0:  # a window starts here: it takes the epoch's n
                wanted = n_at(schedule, read_epoch(state))
                if wanted != n:
                    start, n = micro, wanted
                    state = with_extra(state, WINDOW, (start, n))
        return state, (micro - start + 1) % n == 0, n

    def prepare(state: Any) -> tuple[Any, None]:
        if get_extra(state, WINDOW) is None:  # so that a checkpoint of the first step has it
            state = with_extra(state, WINDOW, (read_counters(state)[1], n_at(schedule, read_epoch(state))))
        return state, None

    return StepTransform(
        name=f"accumulate(schedule={shown})",
        kind="accumulate",
        every=max(n for _, n in schedule),
        window=window,
        setting=schedule,
        handlers=(
            Handler(effect=Effect.BACKWARD, stage=Stage.LOSS_NORMALIZE, fn=_normalize_window,
                    label=f"accumulate: divide loss by the window's n (schedule {shown}, by epoch)"),
            _GATE,
        ),
        prepare=prepare,
    )


def _normalize_window(ctx: None, frame, loss, *, proceed):
    return proceed(frame, loss / frame.window)


def open_micro_steps(step: Any, state: Any, micro: int) -> int:
    """How many micro-steps of an accumulation window are done but not yet applied at micro-step
    count ``micro`` (0 at a window's end): what an exception's save gives back to the data."""
    if getattr(step, "window", None) is None:
        return micro % getattr(step, "every", 1)
    record = get_extra(state, WINDOW)
    if record is None:
        return 0
    start, n = record
    return (micro - start) % n if micro >= start else 0


def planned_updates(step: Any, batches: int, epochs: int, *, epoch: int = 0) -> int:
    """Optimizer updates that ``epochs`` passes of ``batches`` micro-steps make, from the start
    of ``epoch`` at a window's start (a last window left open is not counted): what ``lt.run``'s
    total is under accumulation.

    Example:
        >>> import ltransform as lt
        >>> from ltransform.steps.accumulate import planned_updates
        >>> planned_updates(lt.accumulate(lambda s, b: (s, {}), schedule={0: 4, 1: 2}), 10, 2)
        7
    """
    transform = next((t for t in getattr(step, "transforms", ()) if t.kind == "accumulate"), None)
    if transform is None or transform.window is None:
        every = getattr(step, "every", 1)
        return (batches * epochs) // every
    schedule = transform.setting
    updates, pos, n = 0, 0, n_at(schedule, epoch)
    for e in range(epoch, epoch + epochs):
        left = batches
        if pos == 0:
            n = n_at(schedule, e)
        elif n - pos <= left:  # the window that began in an earlier epoch closes in this one
            left -= n - pos
            updates, pos, n = updates + 1, 0, n_at(schedule, e)
        if pos == 0:
            updates += left // n
            pos = left % n
        else:
            pos += left
    return updates
