"""Steps: ``train_step``, ``eval_step`` and the driver every step transform merges into.

A step is any ``step(state, batch) -> (state, metrics)``. Applying a step transform does
not nest a wrapper per transform: it adds a :class:`StepTransform` record to one
:class:`TransformedStep` around the user's step. When prepared, that driver binds every
record's handlers and sorts each effect's pipeline by stage, which is what makes the
composition order irrelevant.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from ltransform.core.binding import BoundStep, bind, bound_to
from ltransform.core import effects
from ltransform.core.compose import MISSING, Partial
from ltransform.core.effects import ACTIVE, Frame, Handler
from ltransform.core.inventory import inventory
from ltransform.core.state import State, advance, read_counters

Prepare = Callable[[Any], tuple[Any, Any]]


@attrs.frozen(kw_only=True)
class StepTransform:
    """What one step transform contributes to a step.

    Args:
        name: how it shows in ``explain`` and errors, e.g. ``"accumulate(n=4)"``.
        kind: at most one transform of a kind per step (``"precision"``, ``"accumulate"``).
        handlers: its effect handlers, each at a fixed stage.
        prepare: ``state -> (state, ctx)``, run once before the first step; ``ctx`` is
            passed to each of its handlers.
        every: an optimizer boundary every ``every`` micro-steps (accumulation); with ``window``,
            the longest window.
        window: ``(state, micro_step) -> (state, boundary, n)``: decides the boundary itself, when
            it is not every ``every`` micro-steps (an accumulation schedule); ``n`` is the window's
            length (``frame.window``). It may return a new state (its record of the windows).
        setting: its main setting, for readers other than the handlers (the precision name,
            which checkpoints record).
        rejects: ``other -> reason | None``: why it cannot share a step with the transform
            ``other`` (asked both ways when either is added), None if it can.
    """

    name: str
    kind: str
    handlers: tuple[Handler, ...] = ()
    prepare: Prepare | None = None
    every: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    window: Callable[[Any, int], tuple[Any, bool, int]] | None = None
    setting: Any = None
    rejects: Callable[[StepTransform], str | None] | None = None


def _check_step(step: Any, transform: str) -> None:
    if isinstance(step, Partial):
        raise TypeError(
            f"{transform}: got the transform {step!r} where a step was expected; apply "
            f"transforms to a step: lt.pipe(lt.train_step(loss_fn), {step!r}, ...)"
        )
    if not callable(step):
        raise TypeError(
            f"{transform}: expected a step function step(state, batch) -> (state, metrics), "
            f"got {type(step).__name__} {step!r}"
        )


def check_result(result: Any, base: Callable[..., Any]) -> tuple[Any, Mapping[str, Any]]:
    if type(result) is tuple and len(result) == 2 and (
        type(result[1]) is dict or isinstance(result[1], Mapping)  # `is dict` first: ABC checks are slow
    ):
        return result
    name = step_name(base)
    got = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
    hint = " Did you return the loss? Return (state, {'loss': loss})." if isinstance(
        result, torch.Tensor) else ""
    raise TypeError(
        f"step {name!r} must return (state, metrics) with metrics a dict, got {got}.{hint}"
    )


@attrs.frozen
class Body:
    """What ``train_step`` / ``eval_step`` built a step from, so a binding can inline it."""

    kind: str  # "train" or "eval"
    fn: Callable[..., Any]


class TransformedStep:
    """A user's step plus the step transforms applied to it; callable as the step itself.

    It is a value: its base function, its transform records and nothing else that changes.
    Preparing it for a state (:meth:`prepare`) yields the prepared state and a
    :class:`~ltransform.core.binding.BoundStep`, which is kept with that state's models, so a
    direct call ``step(state, batch)`` finds its own state's binding (preparing lazily, once).
    """

    # Set once in __init__ (through __dict__: the step is immutable); declared for type checkers.
    base: Callable[..., Any]
    transforms: tuple[StepTransform, ...]
    counts: bool
    trusted: bool
    body: Body | None
    every: int
    window: Callable[[Any, int], tuple[Any, bool, int]] | None
    unanchored: dict[TransformedStep, BoundStep]

    def __init__(
        self,
        base: Callable[..., Any],
        transforms: tuple[StepTransform, ...],
        *,
        counts: bool = True,
        trusted: bool = False,
        body: Body | None = None,
    ) -> None:
        fields = {
            "base": base,
            "transforms": transforms,
            "counts": counts,  # train steps advance state.step / micro_step; eval steps do not
            "trusted": trusted,  # built by train_step/eval_step: its result needs no check
            "body": body,
            "every": max((t.every for t in transforms), default=1),
            "window": next((t.window for t in transforms if t.window is not None), None),
            "unanchored": {},  # the binding of states holding no torch object to keep it with
        }
        self.__dict__.update(fields)
        # Name, doc and __wrapped__ (so inspect.signature follows it), but not base's
        # __dict__: a user wrapper made with functools.wraps(our_step) carries our fields.
        for name in functools.WRAPPER_ASSIGNMENTS:
            if hasattr(base, name):
                self.__dict__[name] = getattr(base, name)
        self.__dict__["__wrapped__"] = base

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a transformed step is immutable (setting {name!r}); transforms return new steps")

    def __repr__(self) -> str:
        inner = ", ".join(t.name for t in self.transforms)
        return f"<step {step_name(self)!r} [{inner}]>"

    def with_transform(self, transform: StepTransform) -> TransformedStep:
        """A new step with ``transform`` added; raises if one of its kind is already there, or
        if it and a transform already there reject each other."""
        for existing in self.transforms:
            reason = (f"a step takes one {transform.kind} transform; remove one of them"
                      if existing.kind == transform.kind else _rejection(transform, existing))
            if reason:
                raise ValueError(f"{transform.name} cannot be combined with {existing.name}: {reason}")
        return TransformedStep(self.base, (*self.transforms, transform), counts=self.counts,
                               trusted=self.trusted, body=self.body)

    def ordered(self) -> list[StepTransform]:
        """The transforms in the order their prepares run and same-stage handlers nest: by
        kind, so that this too is independent of the composition order."""
        return sorted(self.transforms, key=lambda t: t.kind)

    def prepare(self, state: Any) -> tuple[Any, BoundStep]:
        """Run every transform's ``prepare`` for ``state`` and bind the chains.

        Returns:
            ``(prepared_state, bound_step)``; use the prepared state from here on.
        """
        return bind(self, state)

    def __call__(self, state: Any, batch: Any) -> tuple[Any, Mapping[str, Any]]:
        state, bound = bound_to(self, state)
        return self.call_bound(bound, state, batch)

    def call_bound(self, bound: BoundStep, state: Any, batch: Any) -> tuple[Any, Mapping[str, Any]]:
        """One direct call through ``bound``: counters read from the state and advanced on it."""
        if not self.counts:
            micro = 0
        elif type(state) is State:
            micro = state.micro_step
        else:
            micro = read_counters(state)[1]
        outer = ACTIVE.get()
        if outer is not None and self.counts:
            _enter_nested(outer, self)
        new_state, metrics, applied = bound.run(state, batch, micro)
        if self.counts and applied >= 0:
            new_state = advance(new_state, applied > 0)
        if self.body is not None and type(metrics.get("loss")) is torch.Tensor:
            metrics = {**metrics, "loss": metrics["loss"].detach()}  # the runner detaches at log time
        return new_state, metrics


def _rejection(a: StepTransform, b: StepTransform) -> str | None:
    return (a.rejects and a.rejects(b)) or (b.rejects and b.rejects(a)) or None


def _enter_nested(outer: Frame, inner: TransformedStep) -> None:
    """A counting step called inside another's call (through a plain wrapper function)."""
    if outer.owner is None or not outer.owner.counts:
        return
    if outer.owner.transforms:
        raise RuntimeError(
            f"step {step_name(inner)!r} was called inside {step_name(outer.owner)!r}, whose transforms "
            f"({', '.join(t.name for t in outer.owner.transforms)}) cannot reach it through the "
            f"plain function between them; apply ltransform's transforms before your own "
            f"wrapper (your wrapper outermost), or write your transform as an lt.StepTransform"
        )
    outer.counted_inside = True  # the outer step has no transforms: the inner one counts


def step_name(step: Any) -> str:
    """How a step (or the function inside a transformed step) is named in messages."""
    base = getattr(step, "base", step)
    return getattr(base, "__qualname__", None) or repr(base)


def as_step(step: Any, transform: str = "lt.run") -> TransformedStep:
    """``step`` as a :class:`TransformedStep` (with no transforms if it was a plain function)."""
    if isinstance(step, TransformedStep):
        return step
    _check_step(step, transform)
    return TransformedStep(step, ())


def apply_step_transform(step: Any, transform: StepTransform, call: str) -> Any:
    """``step`` with ``transform`` added, or the partial transform if ``step`` is missing."""
    if step is MISSING:
        return Partial(lambda s: apply_step_transform(s, transform, call), transform.name)
    if not isinstance(step, TransformedStep):
        _check_not_wrapping_ours(step, transform)
    return as_step(step, call).with_transform(transform)


def _check_not_wrapping_ours(step: Any, transform: StepTransform) -> None:
    inner = getattr(step, "__wrapped__", None)
    while inner is not None and not isinstance(inner, TransformedStep):
        inner = getattr(inner, "__wrapped__", None)
    if inner is not None:
        raise ValueError(
            f"{transform.name} cannot reach inside {step_name(step)!r}: it is a plain function wrapping "
            f"the transformed step {inner!r}; apply {transform.name} to that step before your "
            f"wrapper (your wrapper outermost), or write your transform as an lt.StepTransform"
        )


def prepare(step: Any, state: Any) -> Any:
    """Prepare ``step``'s transforms for ``state`` (cast weights, create a grad scaler, ...).

    ``lt.run`` calls it before the first step; a step called directly prepares itself on its
    first call. The binding it makes belongs to this state's models: one step can be prepared
    for two states and train both, each with its own grad scaler and contexts. A state whose
    model, optimizer or scheduler is swapped is prepared anew at its next call.

    Returns:
        The prepared state; use it (not the old one) from here on.

    Example:
        >>> import torch, ltransform as lt
        >>> step = lt.with_precision(lt.train_step(lambda m, b: m(b).sum()), "64-true")
        >>> state = lt.prepare(step, lt.State(model=torch.nn.Linear(2, 2)))
        >>> state.model.weight.dtype
        torch.float64
    """
    return step.prepare(state)[0] if isinstance(step, TransformedStep) else state


def split_loss(out: Any, fn: Callable[..., Any]) -> tuple[torch.Tensor, Mapping[str, Any]]:
    if isinstance(out, torch.Tensor):
        return out, {}
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        return out
    raise TypeError(
        f"loss function {step_name(fn)!r} must return a loss tensor or "
        f"(loss, metrics dict), got {type(out).__name__}"
    )


def train_step(loss_fn: Callable[..., Any], /) -> TransformedStep:
    """The usual training step built from ``loss_fn(model, batch) -> loss | (loss, metrics)``.

    It runs ``lt.backward(loss)``, then ``lt.optimizer_step(optimizer)``, and steps the
    scheduler only if an update was applied. Metrics stay tensors (no host sync).

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> step = lt.train_step(lambda m, b: m(b).pow(2).mean())
        >>> state, metrics = step(state, torch.ones(4, 2))
        >>> state.step, sorted(metrics)
        (1, ['loss'])
    """
    _check_step(loss_fn, "train_step")

    @functools.wraps(loss_fn)
    def step(state: Any, batch: Any) -> tuple[Any, Mapping[str, Any]]:
        # What the body does written with the effects; a binding runs it inlined instead.
        inv = inventory(state)
        model, optimizer, scheduler = (inv.the_one(k) for k in ("model", "optimizer", "scheduler"))
        loss, metrics = split_loss(loss_fn(model, batch), loss_fn)
        effects.backward(loss)
        if effects.optimizer_step(optimizer) and scheduler is not None:
            scheduler.step()
        return state, {"loss": loss.detach(), **metrics}

    return TransformedStep(step, (), trusted=True, body=Body("train", loss_fn))


def eval_step(fn: Callable[..., Any], /) -> TransformedStep:
    """An evaluation step from ``fn(model, batch) -> loss | metrics dict | (loss, metrics)``.

    Runs under ``torch.no_grad()``, does not advance the state's counters, and composes
    with ``with_precision`` (the forward runs under the same autocast).

    Example:
        >>> import torch, ltransform as lt
        >>> step = lt.eval_step(lambda m, b: {"mse": m(b).pow(2).mean()})
        >>> _, metrics = step(lt.State(model=torch.nn.Linear(2, 1)), torch.ones(4, 2))
        >>> sorted(metrics)
        ['mse']
    """
    _check_step(fn, "eval_step")

    @functools.wraps(fn)
    def step(state: Any, batch: Any) -> tuple[Any, Mapping[str, Any]]:
        # A binding resolves the model once and runs evaluate() itself.
        return state, evaluate(fn, inventory(state).the_one("model", "eval_step"), batch)

    return TransformedStep(step, (), counts=False, trusted=True, body=Body("eval", fn))


def evaluate(fn: Callable[..., Any], model: Any, batch: Any) -> Mapping[str, Any]:
    """``eval_step``'s body: ``fn(model, batch)`` under ``no_grad``, as a metrics dict."""
    with torch.no_grad():
        out = fn(model, batch)
    if isinstance(out, Mapping):
        return out
    loss, metrics = split_loss(out, fn)
    return {"loss": loss, **metrics}
