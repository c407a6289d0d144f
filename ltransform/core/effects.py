"""Effects: the two calls a step makes instead of ``loss.backward()`` / ``optimizer.step()``.

A step transform acts *inside* a step by installing handlers that these effects pass
through. Handlers are frozen records naming their effect, a stage from the closed
:class:`Stage` enum, and on which micro-steps they act. When a step is bound to a state, each
effect's chain is composed from those records twice, for a boundary and for a non-boundary
micro-step: sorted by stage (so the composition order never matters), keeping only the
handlers that act on that kind of micro-step and that the state needs, and cut after a
handler that halts. What ``lt.explain`` prints is those chains; nothing re-tests the boundary.

During a step call the frame of the call is the value of a ``contextvars.ContextVar`` (set and
reset with a token), so a hand-written step's ``lt.backward`` / ``lt.optimizer_step`` reach
its chains. Without one, the effects do exactly the plain PyTorch thing.
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
    """Fixed positions in an effect's chain; lower runs first (outermost)."""

    # the whole step call
    SYNC = 10  # accumulate/distribute: no gradient sync unless boundary
    AUTOCAST = 20  # precision: autocast, input dtype; scaler.update() after the step
    # backward
    LOSS_CHECK = 25  # guard_nonfinite: keep each micro-step's loss, to name a non-finite one
    LOSS_NORMALIZE = 30  # accumulate: divide the loss by n
    LOSS_SCALE = 40  # precision: scale the loss, run backward outside autocast
    # optimizer_step
    GATE = 50  # accumulate: skip unless boundary
    ZERO_GRAD = 60  # built in: zero gradients once the update is done (or skipped for inf)
    REDUCE = 70  # distribute: reduce gradients where the backend does not (XLA)
    UNSCALE = 80  # precision: unscale gradients
    FINITE_CHECK = 85  # guard_nonfinite: skip (or stop) on inf/NaN gradients, before clipping
    CLIP = 90  # clip_gradients
    APPLY = 100  # precision: scaler.step (skips on inf/NaN), replaces optimizer.step()


STAGES: dict[Effect, tuple[Stage, ...]] = {
    Effect.STEP: (Stage.SYNC, Stage.AUTOCAST),
    Effect.BACKWARD: (Stage.LOSS_CHECK, Stage.LOSS_NORMALIZE, Stage.LOSS_SCALE),
    Effect.OPTIMIZER_STEP: (Stage.GATE, Stage.ZERO_GRAD, Stage.REDUCE, Stage.UNSCALE, Stage.FINITE_CHECK,
                            Stage.CLIP, Stage.APPLY),
}


class When(enum.Enum):
    """On which micro-steps a handler is part of the chain."""

    ALWAYS = "always"
    BOUNDARY = "boundary only"
    NON_BOUNDARY = "non-boundary only"

    def includes(self, boundary: bool) -> bool:
        return self is When.ALWAYS or (self is When.BOUNDARY) == boundary


def _stage_of_effect(handler: Handler, attribute: Any, stage: Stage) -> None:
    if stage not in STAGES[handler.effect]:
        raise ValueError(
            f"Handler: stage {stage.name} does not belong to the {handler.effect.value} effect; "
            f"its stages are {', '.join(s.name for s in STAGES[handler.effect])}"
        )


@attrs.frozen(kw_only=True)
class Handler:
    """One stage of one effect.

    ``fn(ctx, frame, value, *, proceed)`` receives the runtime ``ctx`` that its transform's
    ``prepare`` returned, the per-call :class:`Frame`, and the effect's value (the loss, the
    optimizer, or ``(state, batch)`` for the step call); it calls ``proceed(frame, value)``
    to run the rest of the chain. A handler that ``halts`` never calls ``proceed``: the stages
    after it and the plain action are left out of its chain.

    Args:
        effect: what it intercepts.
        stage: its position, one of the effect's stages (see :data:`STAGES`).
        fn: the handler function.
        label: what it does before the inner stages, as ``explain`` prints it ("" if nothing).
        after: what it does once the inner stages have returned.
        when: on which micro-steps it is part of the chain.
        halts: it ends the chain (it replaces the stages after it).
        needed: ``ctx -> bool``, asked once when the step is bound: False leaves the handler out
            of that state's chains (e.g. no gradient sync to switch off in one process).
        needed_text: when it is needed, for ``explain`` of an unbound step.
    """

    effect: Effect = attrs.field(validator=attrs.validators.instance_of(Effect))
    stage: Stage = attrs.field(validator=[attrs.validators.instance_of(Stage), _stage_of_effect])
    fn: Callable[..., Any] = attrs.field(validator=attrs.validators.is_callable())
    label: str = ""
    after: str = ""
    when: When = attrs.field(default=When.ALWAYS, validator=attrs.validators.instance_of(When))
    halts: bool = False
    needed: Callable[[Any], bool] | None = None
    needed_text: str = ""


class Frame:
    """What one step call hands every handler: the boundary decision, made once, and tallies.

    A binding reuses one frame per kind of micro-step; handlers keep no state of their own.
    """

    __slots__ = ("boundary", "micro_step", "window", "attempted", "applied", "metrics", "owner", "counted_inside",
                 "busy", "_pipelines")

    def __init__(self, pipelines: Pipelines, boundary: bool, micro_step: int = 0, owner: Any = None) -> None:
        self._pipelines = pipelines
        self.owner = owner  # the transformed step whose call this is
        self.counted_inside = False  # a step called inside this one advanced the counters
        self.boundary = boundary
        self.micro_step = micro_step
        # micro-steps in this accumulation window (a schedule's binding sets it per call)
        self.window = getattr(owner, "every", 1)
        self.attempted = 0  # optimizer_step calls that passed the gate
        self.applied = 0  # optimizer updates really applied
        self.metrics: dict[str, Any] | None = None  # extra metrics handlers report
        self.busy = False  # in use by a call (a re-entrant call takes a fresh frame)

    def report(self, name: str, value: Any) -> None:
        """Add a metric (a tensor, no host sync) to the step's returned metrics."""
        if self.metrics is None:
            self.metrics = {}
        self.metrics[name] = value


@attrs.frozen
class Chain:
    """One effect's composed handlers for one kind of micro-step: what runs and what
    ``explain`` prints. ``run`` is None when no handler is in it (the plain action runs inline)."""

    effect: Effect
    boundary: bool
    handlers: tuple[Handler, ...]
    halted: bool
    run: Callable[[Frame, Any], Any] | None


@attrs.frozen
class Pipelines:
    """The three chains of one kind of micro-step, and their callables (None: plain action)."""

    step: Callable[[Frame, Any], Any] | None
    backward: Callable[[Frame, torch.Tensor], None] | None
    optimizer_step: Callable[[Frame, torch.optim.Optimizer], bool] | None
    chains: tuple[Chain, ...] = ()


ACTIVE: contextvars.ContextVar[Frame | None] = contextvars.ContextVar(
    "ltransform_active_frame", default=None
)


def _halted(frame: Frame, value: Any) -> Any:
    raise RuntimeError("a handler marked halts=True called proceed; it must not (its chain ends there)")


def compose_chain(bound: list[tuple[Handler, Any]], effect: Effect, boundary: bool,
                  terminal: Callable[[Frame, Any], Any], *, resolve: bool = True) -> Chain:
    """Chain the ``(handler, ctx)`` pairs of ``effect`` that act on this kind of micro-step
    around ``terminal``, sorted by stage; with ``resolve``, ask each ``needed`` of its ctx."""
    mine = [(h, c) for h, c in sorted(bound, key=lambda p: p[0].stage)
            if h.effect is effect and h.when.includes(boundary) and not (resolve and h.needed and not h.needed(c))]
    halted = next((i for i, (h, _) in enumerate(mine) if h.halts), None)
    if halted is not None:
        mine = mine[:halted + 1]
    if effect is Effect.OPTIMIZER_STEP and mine and (halted is None or mine[-1][0].stage > Stage.ZERO_GRAD):
        mine = sorted([*mine, (ZERO_GRAD, None)], key=lambda p: p[0].stage)
    chain = _halted if halted is not None else terminal
    for handler, ctx in reversed(mine):
        chain = functools.partial(handler.fn, ctx, proceed=chain)
    return Chain(effect, boundary, tuple(h for h, _ in mine), halted is not None, chain if mine else None)


def backward_terminal(frame: Frame, loss: torch.Tensor) -> None:
    run_backward(loss)


def _optimizer_terminal(frame: Frame, optimizer: torch.optim.Optimizer) -> bool:
    optimizer.step()
    return True


def _zero_grad(ctx: None, frame: Frame, optimizer: torch.optim.Optimizer, *, proceed: Any) -> bool:
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


def build_pipelines(bound: list[tuple[Handler, Any]], boundary: bool,
                    step_terminal: Callable[[Frame, Any], Any], *, resolve: bool = True) -> Pipelines:
    """The three chains of one kind of micro-step from every transform's (handler, ctx) pairs."""
    chains = (compose_chain(bound, Effect.STEP, boundary, step_terminal, resolve=resolve),
              compose_chain(bound, Effect.BACKWARD, boundary, backward_terminal, resolve=resolve),
              compose_chain(bound, Effect.OPTIMIZER_STEP, boundary, _optimizer_terminal, resolve=resolve))
    return Pipelines(chains[0].run, chains[1].run, chains[2].run, chains=chains)


def active_frame() -> Frame | None:
    """The frame of the step call in progress, or None outside any transformed step."""
    return ACTIVE.get()


def run_backward(loss: torch.Tensor) -> None:
    """``loss.backward()``, with a clear message for a loss that was not reduced to a scalar."""
    try:
        loss.backward()
    except RuntimeError as error:
        raise not_a_scalar(loss, error) or error from None


def not_a_scalar(loss: torch.Tensor, error: RuntimeError) -> ValueError | None:
    """The clear error for torch's "grad can be implicitly created only for scalar outputs"
    (caught where backward fails, so it costs nothing per step); None for any other error."""
    if loss.numel() > 1 and "scalar outputs" in str(error):
        return ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}; reduce it, e.g. "
                          f".mean() (or reduction='mean' in the loss function)")
    return None


def backward(loss: torch.Tensor) -> None:
    """Backpropagate ``loss`` through the active transforms (plain ``loss.backward()`` if none).

    Args:
        loss: a scalar tensor that requires grad.

    Raises:
        ValueError: ``loss`` has more than one element (not reduced).

    Example:
        >>> import torch, ltransform as lt
        >>> w = torch.ones(2, requires_grad=True)
        >>> lt.backward((w * 3).sum()); w.grad
        tensor([3., 3.])
    """
    frame = ACTIVE.get()
    if frame is None:
        run_backward(loss)
    else:
        backward_in(frame, loss)


def backward_in(frame: Frame, loss: torch.Tensor) -> None:
    """``backward`` through ``frame``'s chain (what the effect does inside a step call)."""
    chain = frame._pipelines.backward
    if chain is None:
        run_backward(loss)
    else:
        chain(frame, loss)


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
    frame = ACTIVE.get()
    if frame is None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True
    return optimizer_step_in(frame, optimizer)


def optimizer_step_in(frame: Frame, optimizer: torch.optim.Optimizer) -> bool:
    """``optimizer_step`` through ``frame``'s chain (what the effect does inside a step call)."""
    chain = frame._pipelines.optimizer_step
    if chain is not None:
        return chain(frame, optimizer)
    frame.attempted += 1  # what ZERO_GRAD around optimizer.step() does, inline
    try:
        optimizer.step()
    finally:
        optimizer.zero_grad(set_to_none=True)
    frame.applied += 1
    return True
