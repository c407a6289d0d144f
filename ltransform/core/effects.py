"""Effects: the two calls a step makes instead of ``loss.backward()`` / ``optimizer.step()``.

A step transform acts *inside* a step by installing handlers that these effects pass
through. Handlers are frozen records naming their effect and a stage from the closed
:class:`Stage` enum; each effect's pipeline is sorted by stage once, when the step is
prepared, so the order in which transforms were composed never matters.

The active pipeline lives in a ``contextvars.ContextVar`` for the duration of one step call
(set and reset with a token). Without one, the effects do exactly the plain PyTorch thing.
"""

from __future__ import annotations

import contextvars
import enum
import functools
from collections.abc import Callable
from typing import Any

import attrs
import torch


class Effect(enum.Enum):
    """What a handler intercepts."""

    STEP = "step call"
    BACKWARD = "backward"
    OPTIMIZER_STEP = "optimizer_step"


class Stage(enum.IntEnum):
    """Fixed positions in an effect's pipeline; lower runs first (outermost)."""

    # the whole step call
    SYNC = 10  # accumulate/distribute: no gradient sync unless boundary
    AUTOCAST = 20  # precision: autocast, input dtype; scaler.update() after the step
    # backward
    LOSS_NORMALIZE = 30  # accumulate: divide the loss by n
    LOSS_SCALE = 40  # precision: scale the loss, run backward outside autocast
    # optimizer_step
    GATE = 50  # accumulate: skip unless boundary
    ZERO_GRAD = 60  # built in: zero gradients once the update is done (or skipped for inf)
    REDUCE = 70  # distribute: reduce gradients where the backend does not (XLA)
    UNSCALE = 80  # precision: unscale gradients
    CLIP = 90  # clip_gradients
    APPLY = 100  # precision: scaler.step (skips on inf/NaN), replaces optimizer.step()


class When(enum.Enum):
    """On which micro-steps a handler does its work (for :func:`ltransform.explain`)."""

    ALWAYS = "always"
    BOUNDARY = "boundary only"
    NON_BOUNDARY = "non-boundary only"


@attrs.frozen(kw_only=True)
class Handler:
    """One stage of one effect.

    ``fn(ctx, frame, value, *, proceed)`` receives the runtime ``ctx`` that its transform's
    ``prepare`` returned, the per-call :class:`Frame`, and the effect's value (the loss, the
    optimizer, or ``(state, batch)`` for the step call); it calls ``proceed(frame, value)``
    to run the rest of the pipeline, or returns without it to stop there.
    """

    effect: Effect = attrs.field(validator=attrs.validators.instance_of(Effect))
    stage: Stage = attrs.field(validator=attrs.validators.instance_of(Stage))
    fn: Callable[..., Any] = attrs.field(validator=attrs.validators.is_callable())
    label: str = ""  # what it does before the inner stages ("" if nothing)
    after: str = ""  # what it does once the inner stages have returned
    when: When = When.ALWAYS
    halts: bool = False  # when it acts, the inner stages do not run


class Frame:
    """What one step call hands every handler: the boundary decision, made once, and tallies.

    It lives for one call only; handlers keep no state of their own.
    """

    __slots__ = ("boundary", "micro_step", "attempted", "applied", "metrics", "owner", "counted_inside",
                 "_pipelines")

    def __init__(self, pipelines: Pipelines, boundary: bool, micro_step: int, owner: Any = None) -> None:
        self._pipelines = pipelines
        self.owner = owner  # the transformed step whose call this is
        self.counted_inside = False  # a step called inside this one advanced the counters
        self.boundary = boundary
        self.micro_step = micro_step
        self.attempted = 0  # optimizer_step calls that passed the gate
        self.applied = 0  # optimizer updates really applied
        self.metrics: dict[str, Any] | None = None  # extra metrics handlers report

    def report(self, name: str, value: Any) -> None:
        """Add a metric (a tensor, no host sync) to the step's returned metrics."""
        if self.metrics is None:
            self.metrics = {}
        self.metrics[name] = value


@attrs.frozen
class Pipelines:
    """Each effect's handlers, composed once into one callable per effect.

    An effect with no handler has None: its plain action then runs inline, with no call
    through a pipeline (every call saved counts on a step that takes ~100 us).
    """

    step: Callable[[Frame, Any], Any] | None
    backward: Callable[[Frame, torch.Tensor], None] | None
    optimizer_step: Callable[[Frame, torch.optim.Optimizer], bool] | None


ACTIVE: contextvars.ContextVar[Frame | None] = contextvars.ContextVar(
    "ltransform_active_frame", default=None
)

# Functions run before the next optimizer update, then left in place until they remove
# themselves: an async checkpoint registers its wait here, so parameters are not changed
# while it is still reading them. Empty (one falsy check per update) unless a save is pending.
BEFORE_UPDATE: list[Callable[[], None]] = []


def compose_pipeline(
    bound: list[tuple[Handler, Any]], effect: Effect, terminal: Callable[[Frame, Any], Any]
) -> Callable[[Frame, Any], Any]:
    """Chain ``bound`` (handler, ctx) pairs of ``effect`` around ``terminal``, sorted by stage."""
    chain = terminal
    mine = sorted((p for p in bound if p[0].effect is effect), key=lambda p: p[0].stage)
    for handler, ctx in reversed(mine):
        chain = functools.partial(handler.fn, ctx, proceed=chain)
    return chain


def _backward_terminal(frame: Frame, loss: torch.Tensor) -> None:
    loss.backward()


def _optimizer_terminal(frame: Frame, optimizer: torch.optim.Optimizer) -> bool:
    optimizer.step()
    return True


def _zero_grad(ctx: None, frame: Frame, optimizer: torch.optim.Optimizer, *, proceed) -> bool:
    frame.attempted += 1
    try:
        applied = proceed(frame, optimizer)
    finally:
        optimizer.zero_grad(set_to_none=True)
    frame.applied += bool(applied)
    return applied


ZERO_GRAD = Handler(
    effect=Effect.OPTIMIZER_STEP,
    stage=Stage.ZERO_GRAD,
    fn=_zero_grad,
    after="zero gradients (set_to_none), whether the update was applied or skipped",
)


def build_pipelines(
    bound: list[tuple[Handler, Any]], step_terminal: Callable[[Frame, Any], Any]
) -> Pipelines:
    """Compose the three effect pipelines from every transform's (handler, ctx) pairs."""
    handled = {h.effect for h, _ in bound}
    return Pipelines(
        step=compose_pipeline(bound, Effect.STEP, step_terminal) if Effect.STEP in handled else None,
        backward=(compose_pipeline(bound, Effect.BACKWARD, _backward_terminal)
                  if Effect.BACKWARD in handled else None),
        optimizer_step=(compose_pipeline([*bound, (ZERO_GRAD, None)], Effect.OPTIMIZER_STEP,
                                         _optimizer_terminal)
                        if Effect.OPTIMIZER_STEP in handled else None),
    )


def active_frame() -> Frame | None:
    """The frame of the step call in progress, or None outside any transformed step."""
    return ACTIVE.get()


def backward(loss: torch.Tensor) -> None:
    """Backpropagate ``loss`` through the active transforms (plain ``loss.backward()`` if none).

    Args:
        loss: a scalar tensor that requires grad.

    Example:
        >>> import torch, ltransform as lt
        >>> w = torch.ones(2, requires_grad=True)
        >>> lt.backward((w * 3).sum()); w.grad
        tensor([3., 3.])
    """
    frame = ACTIVE.get()
    if frame is None or frame._pipelines.backward is None:
        loss.backward()
    else:
        frame._pipelines.backward(frame, loss)


def optimizer_step(optimizer: torch.optim.Optimizer) -> bool:
    """Update with ``optimizer`` through the active transforms, then zero its gradients.

    Without transforms this is ``optimizer.step(); optimizer.zero_grad(set_to_none=True)``.

    Args:
        optimizer: a ``torch.optim.Optimizer``.

    Returns:
        True if an update was applied; False on a non-boundary accumulation micro-step
        (gradients are kept) or when a grad scaler found inf/NaN gradients (gradients are
        zeroed, the update skipped). Step a scheduler only when it returns True.

    Example:
        >>> import torch, ltransform as lt
        >>> w = torch.nn.Parameter(torch.ones(1)); opt = torch.optim.SGD([w], lr=0.5)
        >>> lt.backward(w.sum()); lt.optimizer_step(opt), w.data, w.grad
        (True, tensor([0.5000]), None)
    """
    if BEFORE_UPDATE:
        for fn in list(BEFORE_UPDATE):
            fn()
    frame = ACTIVE.get()
    if frame is None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True
    pipeline = frame._pipelines.optimizer_step
    if pipeline is not None:
        return pipeline(frame, optimizer)
    frame.attempted += 1  # what ZERO_GRAD around optimizer.step() does, inline
    try:
        optimizer.step()
    finally:
        optimizer.zero_grad(set_to_none=True)
    frame.applied += 1
    return True
