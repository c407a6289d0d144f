"""Bindings: a transformed step prepared for one state.

Preparing a step for a state runs the transforms' ``prepare`` and yields the prepared state and
a :class:`BoundStep`: the composed chains of a boundary and of a non-boundary micro-step, the
handlers' contexts, one reusable frame for each, and a call path specialised when it is bound
(the plain ``train_step`` with no handler calls ``loss.backward()`` and ``optimizer.step()``
inline, with no frame and no context variable). The step object itself stays immutable: the
binding is kept with the state's own objects (its first model or optimizer), so one step can
train two states side by side, each with its own scaler, models and contexts.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ltransform.core.effects import (ACTIVE, Effect, Frame, Handler, Pipelines, Stage, backward_in,
                                     build_pipelines, optimizer_step_in, run_backward)
from ltransform.core.inventory import Inventory, anchor, inventory
from ltransform.core.state import State, check_optimizers
from ltransform.distributed import env, xla

if TYPE_CHECKING:
    from ltransform.core.step import TransformedStep

_BINDINGS = "_ltransform_bindings"


class BoundStep:
    """A step bound to one state's objects.

    ``bound(state, batch)`` is the step itself (counters advanced); ``bound.run(state, batch,
    micro_step)`` is what ``lt.run`` calls: it leaves the counters to the caller and returns
    ``(state, metrics, applied)``, ``applied`` being the number of optimizer updates (-1 when a
    step called inside advanced the counters itself). Metrics are not detached on that path.
    """

    __slots__ = ("step", "signature", "alive", "boundary", "inner", "move", "run", "_frames")

    def __init__(self, step: TransformedStep, signature: tuple[int, ...], boundary: Pipelines,
                 inner: Pipelines, move: Callable[[Any], Any] | None,
                 terminal: Callable[[Frame, Any], Any], fast: Callable[..., Any] | None) -> None:
        self.step = step
        self.signature = signature  # ids of the state's torch objects it was bound to
        self.alive: tuple[Any, ...] = ()  # weak references to them: an id is only theirs while they live
        self.boundary, self.inner = boundary, inner
        self.move = move  # puts a batch where the models are (None: leave it, on the CPU)
        self._frames = (Frame(inner, False, owner=step), Frame(boundary, True, owner=step))
        self.run = fast if fast is not None else self._make_run(terminal)

    def __repr__(self) -> str:
        return f"<bound {self.step!r}>"

    def __call__(self, state: Any, batch: Any) -> tuple[Any, Mapping[str, Any]]:
        return self.step.call_bound(self, state, batch)

    def _make_run(self, terminal: Callable[[Frame, Any], Any]) -> Callable[..., Any]:
        step, frames, move = self.step, self._frames, self.move
        every, window, trusted, base = step.every, step.window, step.trusted, step.base
        context = not trusted or sees_counters(self)  # user code in the step call may call the effects
        calls = (self.inner.step or terminal, self.boundary.step or terminal)  # as frames: by boundary
        from ltransform.core.step import check_result

        def run(state: Any, batch: Any, micro: int) -> tuple[Any, Mapping[str, Any], int]:
            if move is not None:
                batch = move(batch)
            if window is None:
                boundary = every == 1 or (micro + 1) % every == 0
            else:  # an accumulation schedule: windows of varying length
                state, boundary, size = window(state, micro)
            frame, call = frames[boundary], calls[boundary]
            if frame.busy:  # a re-entrant call (a step calling itself): its own frame
                frame = Frame(frame._pipelines, frame.boundary, owner=step)
            if window is not None:
                frame.window = size
            frame.busy, frame.micro_step, frame.attempted, frame.applied = True, micro, 0, 0
            frame.metrics, frame.counted_inside = None, False
            try:
                if not context:  # our own body calls the chains directly: no context variable
                    result = call(frame, (state, batch))
                else:
                    token = ACTIVE.set(frame)
                    try:
                        result = call(frame, (state, batch))
                    finally:
                        ACTIVE.reset(token)
            finally:
                frame.busy = False
            new_state, metrics = result if trusted else check_result(result, base)
            if frame.metrics:
                metrics = {**metrics, **frame.metrics}
            return new_state, metrics, -1 if frame.counted_inside else frame.applied

        return run


def bind(step: TransformedStep, state: Any) -> tuple[Any, BoundStep]:
    """Prepare ``step`` for ``state``: place its models, run every transform's ``prepare``,
    compose the chains; the binding is kept with the state's objects for direct calls."""
    inv = inventory(state)
    check_optimizers(inv.optimizers.values())
    move = _place(inv)
    bound: list[tuple[Handler, Any]] = []
    for transform in step.ordered():
        ctx = None
        if transform.prepare is not None:
            state, ctx = transform.prepare(state)
        bound.extend((h, ctx) for h in transform.handlers)
    inv = inventory(state)  # as prepared (a transform's prepare returns a new state)
    if move is not None and env.on_xla() and not any(t.kind == "distribute" for t in step.transforms):
        bound.append((_XLA_CUT, None))  # else the traced graph would grow until something reads a value
    terminal = _terminal(step, inv)
    boundary = build_pipelines(bound, True, terminal)
    inner = build_pipelines(bound, False, terminal) if step.every > 1 else boundary
    fast = None
    if step.body is not None and step.body.kind == "train" and move is None and not bound:
        fast = _fast_train(step.body.fn, inv) if (len(inv.optimizers), len(inv.models)) == (1, 1) and len(
            inv.schedulers) <= 1 else None
    binding = BoundStep(step, signature(state, inv), boundary, inner, move, terminal, fast)
    binding.alive = tuple(weakref.ref(o) for group in (inv.models, inv.optimizers, inv.schedulers)
                          for o in group.values())
    _remember(anchor(state, inv), step, binding)
    return state, binding


def sees_counters(bound: BoundStep) -> bool:
    """Whether code that is not ltransform's reads the state inside the step (a hand-written
    step, or a user's handler of the step call): the runner then passes it the state with
    its counters on every call; otherwise the counters are materialised only where looked at."""
    step = bound.step
    if not step.trusted:
        return True
    return any(not getattr(h.fn, "__module__", "").startswith("ltransform.")
               for t in step.transforms for h in t.handlers if h.effect is Effect.STEP)


def signature(state: Any, inv: Inventory | None = None) -> tuple[int, ...]:
    """Identities of the torch objects a binding captured: a state whose model, optimizer or
    scheduler has been swapped is bound anew."""
    if type(state) is State:
        return (id(state.model), id(state.optimizer), id(state.scheduler))
    inv = inv or inventory(state)
    return tuple(id(o) for group in (inv.models, inv.optimizers, inv.schedulers) for o in group.values())


def lookup(step: TransformedStep, state: Any) -> BoundStep | None:
    """The binding of ``step`` made for this state's objects, if there is one."""
    inv = None if type(state) is State else inventory(state)  # one walk for both, if any
    key = anchor(state, inv)
    holder = step.unanchored if key is None else getattr(key, _BINDINGS, None)
    binding = holder.get(step) if holder is not None else None
    if (binding is not None and binding.signature == signature(state, inv)
            and all(r() is not None for r in binding.alive)):
        return binding
    return None


def bound_to(step: TransformedStep, state: Any) -> tuple[Any, BoundStep]:
    """``state`` and its binding of ``step``: the one it has, else a new one (``bind``)."""
    bound = lookup(step, state)
    return (state, bound) if bound is not None else bind(step, state)


def forget(step: TransformedStep, state: Any) -> None:
    """Drop the binding of ``step`` kept with ``state``'s objects (a step made for one call, e.g.
    ``lt.predict``'s, would otherwise stay with the model as long as it lives)."""
    key = anchor(state, None if type(state) is State else inventory(state))
    holder = step.unanchored if key is None else getattr(key, _BINDINGS, None)
    if holder is not None:
        holder.pop(step, None)


def _remember(key: Any, step: TransformedStep, binding: BoundStep) -> None:
    if key is None:
        step.unanchored[step] = binding
        return
    holder = getattr(key, _BINDINGS, None)
    if holder is None:
        holder = _Bindings()
        object.__setattr__(key, _BINDINGS, holder)  # not Module.__setattr__: no submodule, no buffer
    holder[step] = binding


class _Bindings(dict["TransformedStep", BoundStep]):
    """The bindings kept with a model or optimizer. They are runtime objects: a copy or a pickle
    of the model carries none (a copied model is bound anew when a step meets it)."""

    def __reduce__(self) -> Any:
        return (_Bindings, ())

    def __deepcopy__(self, memo: Any) -> _Bindings:
        return _Bindings()

    def __copy__(self) -> _Bindings:
        return _Bindings()


def _place(inv: Inventory) -> Callable[[Any], Any] | None:
    """Move the state's models to ``lt.device()`` when that is an accelerator, and return what
    puts a batch there (None on the CPU: nothing moves; on XLA, batches are split over the mesh
    a ``distribute("xla")`` or ``shard`` set up). ``Module.to`` keeps the Parameter objects, so an
    optimizer built before stays valid; on XLA it cannot (an XLA tensor cannot take a CPU one's
    place), so the optimizers are given the new parameters instead (any state they hold moves
    with them). Only models entirely on the CPU move: ones on ``meta`` (not materialized yet),
    sharded ones, and ones placed by hand on accelerators are left where they are."""
    device = env.device()
    if device.type == "cpu":
        return None
    moved: dict[int, torch.Tensor] = {}  # (XLA: one tensor shared by two models stays one)
    for module in inv.models.values():
        tensors = [*module.parameters(), *module.buffers()]
        if tensors and all(t.device.type == "cpu" and not hasattr(t, "device_mesh") for t in tensors):
            if device.type != "xla":
                module.to(device)  # one placed by hand on accelerators (or split over several) stays
                continue
            xla.move(module, moved)
    if moved:
        new = {old: t for old, t in moved.items() if id(t) != old and isinstance(t, torch.nn.Parameter)}
        for optimizer in inv.optimizers.values():
            _rebind(optimizer, new, device)
    if device.type == "xla":
        return xla.batch_mover(device)
    return functools.partial(env.to_device, device=device)


_XLA_CUT = Handler(effect=Effect.STEP, stage=Stage.SYNC, fn=xla.cut, after="on XLA: torch_xla.sync() (run the step)")


def _rebind(optimizer: torch.optim.Optimizer, new: Mapping[int, torch.Tensor], device: torch.device) -> None:
    """Point ``optimizer`` at the moved parameters (``new``: old parameter's id -> new one)."""
    for group in optimizer.param_groups:
        group["params"] = [new.get(id(p), p) for p in group["params"]]
    capturable = any(g.get("capturable") or g.get("fused") for g in optimizer.param_groups)  # (their step too)
    for param in [p for p in list(optimizer.state) if id(p) in new]:
        state = optimizer.state.pop(param)
        optimizer.state[new[id(param)]] = {
            k: v.to(device) if isinstance(v, torch.Tensor) and (k != "step" or capturable) else v
            for k, v in state.items()}


def _terminal(step: TransformedStep, inv: Inventory) -> Callable[[Frame, Any], Any]:
    """What the step chain calls last: the user's step, or our body with the chains inlined."""
    body = step.body
    if body is None:
        base = step.base
        return lambda frame, value: base(*value)
    try:
        if body.kind == "eval":
            return _eval_terminal(body.fn, inv.the_one("model", "eval_step"))
        return _train_terminal(body.fn, inv)
    except TypeError as error:  # e.g. a state prepared only to be loaded into: fail when called
        message = str(error)

        def missing(frame: Frame, value: Any) -> Any:
            raise TypeError(message)

        return missing


def _train_terminal(loss_fn: Callable[..., Any], inv: Inventory) -> Callable[[Frame, Any], Any]:
    from ltransform.core.step import split_loss

    model, optimizer, scheduler = _weak(inv.the_one("model"), inv.the_one("optimizer"), inv.the_one("scheduler"))

    def train(frame: Frame, value: Any) -> tuple[Any, Mapping[str, Any]]:
        state, batch = value
        out = loss_fn(model(), batch)
        loss, metrics = (out, None) if type(out) is torch.Tensor else split_loss(out, loss_fn)
        backward_in(frame, loss)
        if optimizer_step_in(frame, optimizer()) and scheduler is not None:
            scheduler().step()
        return state, {"loss": loss, **metrics} if metrics else {"loss": loss}

    return train


def _fast_train(loss_fn: Callable[..., Any], inv: Inventory) -> Callable[..., Any]:
    """The plain train step with no handler: what a hand-written loop does, and nothing else."""
    from ltransform.core.step import split_loss

    model, optimizer, scheduler = _weak(inv.the_one("model"), inv.the_one("optimizer"), inv.the_one("scheduler"))
    tensor = torch.Tensor

    def run(state: Any, batch: Any, micro: int) -> tuple[Any, Mapping[str, Any], int]:
        out = loss_fn(model(), batch)
        loss, metrics = (out, None) if type(out) is tensor else split_loss(out, loss_fn)
        run_backward(loss)
        opt = optimizer()
        try:
            opt.step()
        finally:
            opt.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler().step()
        return state, {"loss": loss, **metrics} if metrics else {"loss": loss}, 1

    return run


def _weak(*objects: Any) -> list[Any]:
    """Weak references (None stays None): the binding is kept with the model, so holding it
    strongly would make a cycle, and a dropped model would wait for the garbage collector
    instead of being freed at once (GPU memory a notebook expects back)."""
    return [None if o is None else weakref.ref(o) for o in objects]


def _eval_terminal(fn: Callable[..., Any], model: Any) -> Callable[[Frame, Any], Any]:
    from ltransform.core.step import evaluate

    (model,) = _weak(model)
    return lambda frame, value: (value[0], evaluate(fn, model(), value[1]))


