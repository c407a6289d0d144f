"""``explain``: print the resolved pipeline of a step, as it will run."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from ltransform.core.effects import ZERO_GRAD, Effect, Handler, When
from ltransform.core.step import TransformedStep, as_step, step_name

_TERMINALS = {
    Effect.STEP: "call the step: {name}(state, batch)",
    Effect.BACKWARD: "loss.backward()",
    Effect.OPTIMIZER_STEP: "optimizer.step()",
}


def explain(step: Any, *, file: TextIO | None = None) -> None:
    """Print what ``step`` runs, stage by stage, on a boundary and a non-boundary micro-step.

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
    print(explanation(as_step(step, "explain")), file=file or sys.stdout)


def explanation(step: TransformedStep) -> str:
    """The text :func:`explain` prints."""
    name = step_name(step)
    transforms = ", ".join(t.name for t in step.transforms) or "no transforms"
    handlers = [h for t in step.ordered() for h in t.handlers] + [ZERO_GRAD]
    lines = [f"step {name!r} with {transforms}"]
    cases = [(True, "boundary micro-step (the optimizer updates)")]
    if step.every > 1:
        cases[0] = (True, f"boundary micro-step (micro_step % {step.every} == {step.every - 1})")
        cases.append((False, "non-boundary micro-step (gradients accumulate)"))
    for boundary, title in cases:
        lines.append(f"{title}:")
        for effect in Effect:
            lines.append(f"  {effect.value}:")
            lines.extend(_effect_lines(handlers, effect, boundary, name))
    return "\n".join(lines)


def _effect_lines(handlers: list[Handler], effect: Effect, boundary: bool, name: str) -> list[str]:
    steps: list[str] = []
    unwind: list[str] = []
    skip = When.NON_BOUNDARY if boundary else When.BOUNDARY
    halted = False
    for h in sorted((h for h in handlers if h.effect is effect), key=lambda h: h.stage):
        if h.when is skip:
            continue
        if h.label:
            steps.append(f"[{h.stage.name}] {h.label}")
        if h.after:
            unwind.append(f"[{h.stage.name}] {h.after}")
        if h.halts:
            halted = True  # it acts here: the inner stages and the terminal do not run
            break
    if not halted:
        steps.append(_TERMINALS[effect].format(name=name))
    steps.extend(reversed(unwind))
    return [f"    {i}. {text}" for i, text in enumerate(steps, 1)]
