"""The loop: batches, counters, the next event, stop, interrupt. Everything else is a hook.

While it runs, the step and micro-step counters are plain ints; the state is given them only at
an event, where a hook looks at it. The next event is the smallest ``next_step`` of the hooks,
computed once after each event, so a step costs the call, a counter and one comparison.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch

from ltransform.core.binding import bound_to, sees_counters
from ltransform.core.state import read_counters, read_epoch, set_field, with_counters
from ltransform.runner.context import Run
from ltransform.runner.data import set_epoch
from ltransform.runner.hooks import Slot, apply_hook


def loop(run: Run, state: Any, slots: list[Slot]) -> Any:
    """Train until ``run.max_steps``/``run.max_epochs`` or a hook stops; the final state."""
    run.state = state
    run.step, run.micro = read_counters(state)
    run.epoch = read_epoch(state)
    if _call(run, slots, "start"):
        return run.current()
    while (run.max_epochs is None or run.epoch < run.max_epochs) and not run.done():
        set_epoch(run.data, run.epoch)
        batches, skip = _batches(run)
        outcome = _epoch(run, slots, batches, skip)
        if outcome == "empty":
            run.warn_empty()
            break
        if outcome == "stop" or run.done():
            break
        run.epoch += 1
        run.state = set_field(run.current(), "epoch", run.epoch)
        if _call(run, slots, "epoch_end"):
            break
    _call(run, slots, "end")
    return run.current()


def _call(run: Run, slots: list[Slot], method: str) -> bool:
    """Call ``method`` (``start``, ``epoch_end``, ``end``) of every hook that has it; True to stop."""
    stopped = False
    for slot in slots:
        fn = getattr(slot.hook, method, None)
        if fn is not None:
            run.doing = f"{slot.name}.{method}"
            run.state, stop = apply_hook(fn, run.current(), run)
            stopped = stopped or stop
    run.step, run.micro = read_counters(run.state)
    run.state, run.bound = bound_to(run.bound.step, run.state)
    run.doing = None
    return stopped


def _batches(run: Run) -> tuple[Iterator[Any], int]:
    """This epoch's batch iterator, and how many of its batches a resumed run already did.

    The torch RNG state the iterator is created with is kept (a shuffling DataLoader draws its
    order from it); resuming mid-epoch recreates the iterator from the saved one, skips the
    batches done, and puts back the RNG state the checkpoint was taken with."""
    position = run.position
    position.epoch, position.batches = run.epoch, 0
    resume, run.resume_at = run.resume_at, None
    if resume is None or resume.get("epoch") != run.epoch or resume.get("epoch_rng") is None:
        position.epoch_rng = torch.get_rng_state()
        return iter(run.data), 0
    now_rng = torch.get_rng_state()
    position.epoch_rng = resume["epoch_rng"]
    torch.set_rng_state(resume["epoch_rng"])
    batches = iter(run.data)
    skip = resume["batches"]
    for _ in itertools.islice(batches, skip):
        pass
    torch.set_rng_state(now_rng)
    position.batches = skip
    return batches, skip


def _epoch(run: Run, slots: list[Slot], batches: Iterator[Any], done: int) -> str:
    """One pass over the data: the hot loop, so what it uses every step is a local."""
    state, step, micro = run.state, run.step, run.micro
    seen = done  # batches of this epoch consumed (a nested step may count micro-steps otherwise)
    looks = sees_counters(run.bound)
    call, next_event = _stepper(run, slots), _next_event(run, slots, step)
    outcome, metrics, batch = "end", run.metrics, None
    try:
        for batch in batches:
            if looks:  # a hand-written step may read its counters: give it them
                state = with_counters(state, step, micro)
            state, metrics, applied = call(state, batch, micro)
            micro += 1
            seen += 1
            if not applied:
                continue  # a non-boundary micro-step (or an update skipped on inf)
            if applied < 0:  # a step called inside advanced the counters itself
                step, micro = read_counters(state)
            else:
                step += 1
            if step >= next_event:
                run.state, run.step, run.micro, run.metrics, run.batch = state, step, micro, metrics, batch
                run.position.batches = seen
                stopped = _event(run, slots)
                state, step, micro = run.state, run.step, run.micro
                if stopped:
                    outcome = "stop"
                    break
                call, next_event = _stepper(run, slots), _next_event(run, slots, step)
                if run.done():
                    break
    finally:  # also on KeyboardInterrupt: the state so far
        run.state, run.step, run.micro, run.metrics = state, step, micro, metrics
        run.position.batches = seen
        if batch is not None:
            run.batch = batch
    return "empty" if seen == 0 else outcome


def _stepper(run: Run, slots: list[Slot]) -> Any:
    """The step call of the loop: the binding's, wrapped by the hooks that see every call
    (``around_step``, e.g. the running means of ``log_reduce="mean"``); the binding's alone if none."""
    call = run.bound.run
    for slot in slots:
        around = getattr(slot.hook, "around_step", None)
        if around is not None:
            call = around(call)
    return call


def _next_event(run: Run, slots: list[Slot], step: int) -> float:
    """The step at which someone next looks: the smallest ``next_step`` of the hooks, or the end."""
    end = math.inf if run.max_steps is None else run.max_steps
    return min([end, *(slot.next_step(step) for slot in slots)])


def _event(run: Run, slots: list[Slot]) -> bool:
    """Call the hooks due at this step, in order; True to stop. A hook may return a new state,
    which is bound anew if its torch objects changed."""
    now, stopped, changed = run.step, False, False
    for slot in slots:
        if slot.next_step(now - 1) > now:
            continue
        run.doing = f"hook {slot.name} at step {now}"
        state = run.current() if slot.reads_state else run.state
        new, stop = apply_hook(slot.call, state, run)
        if new is not state:
            if not slot.reads_state:  # it was given the state with lagging counters: give it the run's
                new = with_counters(new, run.step, run.micro)
            run.state, changed = new, True
        stopped = stopped or stop
    if changed:
        run.step, run.micro = read_counters(run.state)
        run.state, run.bound = bound_to(run.bound.step, run.state)
    run.doing = None
    return stopped

