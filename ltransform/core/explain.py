"""``explain``: print the composed chains of a step, the ones that run."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from ltransform.core.binding import bound_to
from ltransform.core.effects import ZERO_GRAD, Chain, Effect, Pipelines, build_pipelines
from ltransform.core.step import TransformedStep, as_step, step_name

_TERMINALS = {
    Effect.STEP: "call the step: {name}(state, batch)",
    Effect.BACKWARD: "loss.backward()",
    Effect.OPTIMIZER_STEP: "optimizer.step()",
}


def explain(step: Any, state: Any = None, *, file: TextIO | None = None) -> None:
    """Print what ``step`` runs, stage by stage, on a boundary and a non-boundary micro-step.

    The lines are read from the composed chains themselves, so they cannot disagree with what
    runs. Given a ``state``, they are the chains bound to it (the step is prepared for it, as
    ``lt.prepare`` would, unless it already was): handlers the state does not need are left
    out (e.g. switching off gradient sync in one process). Without one, such handlers are
    shown with when they apply.

    Example:
        >>> import ltransform as lt
        >>> step = lt.pipe(lt.train_step(lambda m, b: m(b).sum()), lt.accumulate(2))
        >>> lt.explain(step)
        step '<lambda>' with accumulate(n=2)
        boundary micro-step (micro_step % 2 == 1):
          step call:
            1. call the step: <lambda>(state, batch)
          backward:
            1. [LOSS_NORMALIZE] accumulate: divide loss by 2
            2. loss.backward()
          optimizer_step:
            1. optimizer.step()
            2. [ZERO_GRAD] zero gradients (set_to_none), whether the update was applied or skipped
        non-boundary micro-step (gradients accumulate):
          step call:
            1. call the step: <lambda>(state, batch)
          backward:
            1. [LOSS_NORMALIZE] accumulate: divide loss by 2
            2. loss.backward()
          optimizer_step:
            1. [GATE] accumulate: return False, keep gradients
    """
    print(explanation(as_step(step, "explain"), state), file=file or sys.stdout)


def explanation(step: TransformedStep, state: Any = None) -> str:
    """The text :func:`explain` prints."""
    if state is None:
        handlers = [(h, None) for t in step.ordered() for h in t.handlers]
        boundary = build_pipelines(handlers, True, _unbound, resolve=False)
        inner = build_pipelines(handlers, False, _unbound, resolve=False)
    else:
        _, bound = bound_to(step, state)
        boundary, inner = bound.boundary, bound.inner
    name = step_name(step)
    transforms = ", ".join(t.name for t in step.transforms) or "no transforms"
    lines = [f"step {name!r} with {transforms}" + ("" if state is None else ", bound to its state")]
    cases: list[tuple[Pipelines, str]] = [(boundary, "boundary micro-step (the optimizer updates)")]
    if step.every > 1:
        rule = (f"micro_step % {step.every} == {step.every - 1}" if step.window is None else
                "the last micro-step of its window, whose n the schedule gives")
        cases = [(boundary, f"boundary micro-step ({rule})"),
                 (inner, "non-boundary micro-step (gradients accumulate)")]
    for pipelines, title in cases:
        lines.append(f"{title}:")
        for chain in pipelines.chains:
            lines.append(f"  {chain.effect.value}:")
            lines.extend(f"    {i}. {text}" for i, text in enumerate(chain_lines(chain, name, state is None), 1))
    return "\n".join(lines)


def _unbound(frame: Any, value: Any) -> Any:
    raise RuntimeError("an unbound chain (composed for explain) cannot run")


def chain_lines(chain: Chain, name: str, unbound: bool = False) -> list[str]:
    """One line per action of ``chain``, in the order they happen."""
    handlers = chain.handlers
    if chain.effect is Effect.OPTIMIZER_STEP and not handlers:
        handlers = (ZERO_GRAD,)  # the inline path zeroes gradients after the step, as ZERO_GRAD does
    steps: list[str] = []
    unwind: list[str] = []
    for h in handlers:
        when = f" (only {h.needed_text})" if unbound and h.needed is not None and h.needed_text else ""
        if h.label:
            steps.append(f"[{h.stage.name}] {h.label}{when}")
        if h.after:
            unwind.append(f"[{h.stage.name}] {h.after}{when if not h.label else ''}")
    if not chain.halted:
        steps.append(_TERMINALS[chain.effect].format(name=name))
    steps.extend(reversed(unwind))
    return steps
