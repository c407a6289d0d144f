"""``accumulate``: gradient accumulation over ``n`` micro-steps."""

from __future__ import annotations

from typing import Any

from ltransform.core.compose import MISSING
from ltransform.core.effects import Effect, Handler, Stage, When
from ltransform.core.step import StepTransform, apply_step_transform


def accumulate(step: Any = MISSING, /, n: Any = MISSING) -> Any:
    """Accumulate gradients over ``n`` step calls (micro-steps), updating on the n-th.

    Each micro-step's loss is divided by ``n`` once, before backward; on the other micro-steps
    ``lt.optimizer_step`` returns False and keeps the gradients (and, under ``distribute``,
    gradients are not synchronised). The boundary is decided once per call from
    ``state.micro_step``: micro-step ``k`` is a boundary when ``(k + 1) % n == 0``.

    Args:
        step: the step to transform; omit it for the partial form.
        n: micro-steps per optimizer update, a positive int.

    Raises:
        ValueError: ``n`` is not a positive int; ``accumulate`` applied twice.

    Example:
        >>> import torch, ltransform as lt
        >>> step = lt.pipe(lt.train_step(lambda m, b: m(b).sum()), lt.accumulate(2))
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> state, _ = step(state, torch.ones(1, 2)); state, _ = step(state, torch.ones(1, 2))
        >>> state.micro_step, state.step
        (2, 1)

    Note:
        Accumulation windows run across epoch ends: a window is closed by the n-th call,
        whichever epoch it falls in.
    """
    if n is MISSING and not callable(step):
        step, n = MISSING, step
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"accumulate: n must be a positive int (micro-steps per update), got {n!r}")
    transform = StepTransform(
        name=f"accumulate(n={n})",
        kind="accumulate",
        every=n,
        handlers=(
            Handler(effect=Effect.BACKWARD, stage=Stage.LOSS_NORMALIZE, fn=_normalize,
                    label=f"accumulate: divide loss by {n}"),
            Handler(effect=Effect.OPTIMIZER_STEP, stage=Stage.GATE, fn=_gate,
                    label="accumulate: return False, keep gradients", when=When.NON_BOUNDARY,
                    halts=True),
        ),
        prepare=lambda state: (state, n),
    )
    return apply_step_transform(step, transform, "accumulate")


def _normalize(n: int, frame, loss, *, proceed):
    return proceed(frame, loss / n)


def _gate(n: int, frame, optimizer, *, proceed):
    return False  # in the non-boundary chain only, where it ends the chain
