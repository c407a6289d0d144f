"""``with_precision``: autocast, loss scaling and low-precision weights for a step."""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch.utils._pytree import tree_map

from ltransform.core.compose import MISSING
from ltransform.core.effects import Effect, Handler, Stage, When
from ltransform.core.precisions import Precision, resolve_precision
from ltransform.core.state import find_modules, get_extra, with_extra
from ltransform.core.step import StepTransform, apply_step_transform

SCALER_KEY = "grad_scaler"


@attrs.frozen
class _Runtime:
    """What the handlers need, resolved from the state when the step is prepared."""

    device_type: str
    precision: Precision
    scaler: torch.amp.GradScaler | None


def with_precision(step: Any = MISSING, /, precision: Any = MISSING) -> Any:
    """Run ``step`` in a precision: ``"32-true"``, ``"64-true"``, ``"16-mixed"``,
    ``"bf16-mixed"``, ``"16-true"``, ``"bf16-true"`` (or Lightning's ``"16"``, ``"bf16"``, 16, ...).

    Mixed modes keep float32 weights and autocast the forward; ``16-mixed`` also scales the
    loss with a ``torch.amp.GradScaler`` (kept in ``state.extra["grad_scaler"]`` so it is
    checkpointed), unscales before clipping, and skips the update on inf/NaN gradients.
    ``-true`` modes cast the weights (when the step is prepared) and floating inputs.

    Args:
        step: the step to transform; omit it for the partial form.
        precision: the precision name.

    Raises:
        ValueError: unknown name (lists the valid ones); a second precision on one step.

    Example:
        >>> import torch, ltransform as lt
        >>> step = lt.pipe(lt.train_step(lambda m, b: m(b).sum()), lt.with_precision("bf16-mixed"))
        >>> model = torch.nn.Linear(2, 2)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters()))
        >>> state, _ = step(state, torch.ones(1, 2))
        >>> model.weight.dtype
        torch.float32

    Note:
        Build the optimizer after ``lt.to_precision`` for ``-true`` modes. ``16-mixed`` needs
        float32 weights: a float16 model with a grad scaler is rejected with a clear error.
    """
    if precision is MISSING and not callable(step):
        step, precision = MISSING, step
    record = resolve_precision(precision)
    transform = StepTransform(
        name=f"with_precision({record.name!r})",
        kind="precision",
        handlers=_handlers(record),
        prepare=lambda state: _prepare(state, record),
    )
    return apply_step_transform(step, transform, "with_precision")


def _handlers(p: Precision) -> tuple[Handler, ...]:
    if p.mixed:
        handlers = [
            Handler(effect=Effect.STEP, stage=Stage.AUTOCAST, fn=_autocast,
                    label=f"precision: enter autocast to {_short(p.autocast_dtype)}",
                    after="precision: leave autocast" + (
                        "; scaler.update() if an optimizer stepped" if p.scaler else "")),
            Handler(effect=Effect.BACKWARD, stage=Stage.LOSS_SCALE, fn=_scale_loss,
                    label="precision: " + ("scale loss, " if p.scaler else "") + "leave autocast"),
        ]
        if p.scaler:
            handlers += [
                Handler(effect=Effect.OPTIMIZER_STEP, stage=Stage.UNSCALE, fn=_unscale,
                        label="precision: scaler.unscale_(optimizer)", when=When.BOUNDARY),
                Handler(effect=Effect.OPTIMIZER_STEP, stage=Stage.APPLY, fn=_scaler_step,
                        label="precision: scaler.step(optimizer): optimizer.step() unless "
                              "gradients hold inf/NaN", when=When.BOUNDARY, halts=True),
            ]
        return tuple(handlers)
    if p.param_dtype != torch.float32:
        return (Handler(effect=Effect.STEP, stage=Stage.AUTOCAST, fn=_true_dtype,
                        label=f"precision: {_short(p.param_dtype)} inputs and default dtype"),)
    return ()


def _short(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def _prepare(state: Any, p: Precision) -> tuple[Any, _Runtime]:
    modules = find_modules(state)
    params = [(n, q) for m in modules for n, q in m.named_parameters()]
    device_type = params[0][1].device.type if params else "cpu"
    if p.mixed:
        low = [(n, q.dtype) for n, q in params
               if q.requires_grad and q.dtype in (torch.float16, torch.bfloat16)]
        if low:
            true_name = "16-true" if p.autocast_dtype == torch.float16 else "bf16-true"
            why = "a grad scaler cannot unscale half-precision gradients" if p.scaler else (
                "and autocasts only the forward")
            raise ValueError(
                f"with_precision({p.name!r}) keeps float32 weights ({why}), but the model has "
                f"{_short(low[0][1])} "
                f"parameters (e.g. {low[0][0]!r}); use {true_name!r}, or "
                f"lt.to_precision(model, {p.name!r}) before building the optimizer"
            )
        _shard_policy(modules, p)
    else:
        for module in modules:
            module.to(p.param_dtype)
    scaler = None
    if p.scaler:
        scaler = get_extra(state, SCALER_KEY)
        if scaler is None:
            scaler = torch.amp.GradScaler(device_type)
            state = with_extra(state, SCALER_KEY, scaler)
    return state, _Runtime(device_type, p, scaler)


def _shard_policy(modules: list[torch.nn.Module], p: Precision) -> None:
    """Sharded models all-gather parameters in the autocast dtype and reduce gradients in
    float32 (FSDP2's ``MixedPrecisionPolicy``); autocast still covers the forward."""
    from ltransform.distributed import wrappers

    for module in modules:
        if wrappers.is_sharded(module):
            wrappers.set_mixed_precision(module, p.autocast_dtype, torch.float32)


def _autocast(ctx: _Runtime, frame, value, *, proceed):
    with torch.autocast(ctx.device_type, dtype=ctx.precision.autocast_dtype):
        result = proceed(frame, value)
    if ctx.scaler is not None and frame.attempted:
        ctx.scaler.update()  # once per step call, after every optimizer of the call stepped
    return result


def _scale_loss(ctx: _Runtime, frame, loss, *, proceed):
    if ctx.scaler is not None:
        loss = ctx.scaler.scale(loss)
    with torch.autocast(ctx.device_type, enabled=False):
        return proceed(frame, loss)


def _unscale(ctx: _Runtime, frame, optimizer, *, proceed):
    ctx.scaler.unscale_(optimizer)
    return proceed(frame, optimizer)


def _scaler_step(ctx: _Runtime, frame, optimizer, *, proceed):
    # scaler.step calls optimizer.step() itself unless it found inf/NaN; a step post-hook
    # (public API) tells which, with no extra host sync beyond the scaler's own.
    applied = []
    handle = optimizer.register_step_post_hook(lambda *_: applied.append(True))
    try:
        ctx.scaler.step(optimizer)
    finally:
        handle.remove()
    return bool(applied)


def _true_dtype(ctx: _Runtime, frame, value, *, proceed):
    dtype = ctx.precision.param_dtype
    state, batch = value
    batch = tree_map(
        lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, batch
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return proceed(frame, (state, batch))
    finally:
        torch.set_default_dtype(previous)
