"""``with_precision``: autocast, loss scaling and low-precision weights for a step."""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch.utils._pytree import tree_map

from ltransform.core.compose import MISSING
from ltransform.core.effects import Effect, Handler, Stage, When
from ltransform.core.precisions import Precision, resolve_precision
from ltransform.core.inventory import inventory
from ltransform.core.state import get_extra, with_extra
from ltransform.core.step import StepTransform, apply_step_transform
from ltransform.distributed import wrappers
from ltransform.models import fp8
from ltransform.models.precision import apply_precision, shard_precision

SCALER_KEY = "grad_scaler"


@attrs.frozen
class _Runtime:
    """What the handlers need, resolved from the state when the step is prepared."""

    device_type: str
    precision: Precision
    scaler: torch.amp.GradScaler | None
    fp8_autocast: Any = None  # Transformer Engine's fp8 autocast, as a context factory


def with_precision(step: Any = MISSING, /, precision: Any = MISSING, *, recipe: Any = None) -> Any:
    """Run ``step`` in a precision: ``"32-true"``, ``"64-true"``, ``"16-mixed"``,
    ``"bf16-mixed"``, ``"16-true"``, ``"bf16-true"`` (or Lightning's ``"16"``, ``"bf16"``, 16, ...),
    or fp8: ``"transformer-engine"``, ``"transformer-engine-float16"``, ``"torchao-float8"``.

    Mixed modes keep float32 weights and autocast the forward; ``16-mixed`` also scales the
    loss with a ``torch.amp.GradScaler`` (kept in ``state.extra["grad_scaler"]`` so it is
    checkpointed), unscales before clipping, and skips the update on inf/NaN gradients.
    ``-true`` modes cast the weights (when the step is prepared) and floating inputs.

    fp8: ``"transformer-engine"`` (bf16 weights) and ``"transformer-engine-float16"`` (fp16)
    swap ``nn.Linear``/``nn.LayerNorm``/``nn.RMSNorm`` for Transformer Engine's layers when the
    step is prepared and run the step under TE's fp8 autocast with ``recipe``.
    ``"torchao-float8"`` swaps ``nn.Linear`` for torchao's ``Float8Linear`` (dynamic scaling) and
    otherwise runs as ``"bf16-mixed"``. A model already converted by ``lt.to_precision`` (needed
    before ``lt.shard``) is used as it is.

    Args:
        step: the step to transform; omit it for the partial form.
        precision: the precision name.
        recipe: fp8 only. Transformer Engine: a recipe from ``transformer_engine.common.recipe``
            (default: TE's, ``DelayedScaling`` on Hopper). torchao: a recipe name
            (``"tensorwise"``, ``"rowwise"``, ``"rowwise_with_gw_hp"``) or a ``Float8LinearConfig``.

    Raises:
        ValueError: unknown name (lists the valid ones); a second precision on one step; a
            recipe for a precision that is not fp8; (when prepared) a model ``lt.shard``
            sharded with another FSDP2 mixed-precision policy than this precision's.
        ImportError: the fp8 library is not installed (names the pip command).
        RuntimeError: (when prepared) fp8 on a model not on a GPU of compute capability 8.9+
            (torchao also runs on the CPU); a sharded or compiled model not converted first.

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
        FSDP2 takes its ``MixedPrecisionPolicy`` when sharding, so for a sharded model the mixed
        precision is chosen before ``lt.shard``: ``lt.shard(policy=..., precision="bf16-mixed")``
        or ``lt.to_precision(model, "bf16-mixed")`` first; ``with_precision`` checks that it agrees.
    """
    if precision is MISSING and not callable(step):
        step, precision = MISSING, step
    record = resolve_precision(precision)
    if recipe is not None and record.fp8 is None:
        raise ValueError(f"with_precision: recipe applies to the fp8 precisions only, not {record.name!r}")
    fp8.check_installed(record, "with_precision")
    transform = StepTransform(
        name=f"with_precision({record.name!r})",
        kind="precision",
        handlers=_handlers(record),
        prepare=lambda state: _prepare(state, record, recipe),
        setting=record.name,
    )
    return apply_step_transform(step, transform, "with_precision")


def _handlers(p: Precision) -> tuple[Handler, ...]:
    if p.mixed:
        handlers = [
            Handler(effect=Effect.STEP, stage=Stage.AUTOCAST, fn=_autocast,
                    label=f"precision: enter autocast to {_short(p.autocast_dtype)}" + (
                        " (torchao Float8Linear matmuls in fp8)" if p.fp8 else ""),
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
    if p.fp8 == fp8.TRANSFORMER_ENGINE:
        return (Handler(effect=Effect.STEP, stage=Stage.AUTOCAST, fn=_te_autocast,
                        label=f"precision: {_short(p.param_dtype)} inputs and default dtype; enter "
                              f"Transformer Engine fp8 autocast"),)
    if p.param_dtype != torch.float32:
        return (Handler(effect=Effect.STEP, stage=Stage.AUTOCAST, fn=_true_dtype,
                        label=f"precision: {_short(p.param_dtype)} inputs and default dtype"),)
    return ()


def _short(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def check_supported(p: Precision, device_type: str) -> None:
    """Raise ``ValueError`` for a precision the accelerator cannot run, before torch fails inside.

    Apple's MPS has no float64, and bfloat16 only from macOS 14 on; float8 needs an NVIDIA GPU (it
    is refused on XLA and MPS; on the CPU torchao's runs, slowly, for tests). (XLA runs ``16-mixed`` too,
    with torch's GradScaler, which reads its inf flag on the host at every update: ``bf16-mixed``
    is the precision TPUs are built for.)
    """
    if p.fp8 and device_type in ("xla", "mps"):
        raise ValueError(f"with_precision({p.name!r}): float8 training needs an NVIDIA GPU (Ada or Hopper and "
                         f"newer), not {device_type.upper()}; use 'bf16-mixed'")
    if device_type != "mps":
        return
    if p.param_dtype == torch.float64:
        raise ValueError(f"with_precision({p.name!r}): Apple's MPS has no float64; use '32-true' (or "
                         f"lt.use_accelerator('cpu') for float64)")
    bf16 = torch.bfloat16 in (p.param_dtype, p.autocast_dtype)
    newer = getattr(torch.backends.mps, "is_macos_or_newer", None)
    if bf16 and newer is not None and not newer(14, 0):
        raise ValueError(f"with_precision({p.name!r}): MPS computes in bfloat16 only on macOS 14 or newer; "
                         f"use '16-mixed' or '32-true'")


def _prepare(state: Any, p: Precision, recipe: Any) -> tuple[Any, _Runtime]:
    modules = list(inventory(state).models.values())
    first = next((q for m in modules for q in m.parameters()), None)
    device_type = first.device.type if first is not None else "cpu"  # (the weights' casts keep it)
    check_supported(p, device_type)
    for module in modules:  # everything that can fail first; then the models change
        _check_fp8(module, p, recipe)
        _check_shard_policy(module, p)
    for module in modules:
        _prepare_weights(module, p, recipe)
    params = [(n, q) for m in modules for n, q in m.named_parameters()]  # (as the weights are now)
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
    scaler = None
    if p.scaler:
        scaler = get_extra(state, SCALER_KEY)
        if scaler is None:
            scaler = torch.amp.GradScaler(device_type)
            state = with_extra(state, SCALER_KEY, scaler)
    autocast = fp8.te_autocast(recipe) if p.fp8 == fp8.TRANSFORMER_ENGINE else None
    return state, _Runtime(device_type, p, scaler, autocast)


def _check_fp8(module: torch.nn.Module, p: Precision, recipe: Any) -> None:
    if not p.fp8:
        return
    if fp8.converted(module, p):
        fp8.check_device(module, p, "with_precision")  # converting checks the others
        if recipe is not None and p.fp8 == fp8.TORCHAO:
            raise ValueError("with_precision: the model's layers were already converted (by "
                             "lt.to_precision), so a torchao recipe here would not apply; pass "
                             "it to lt.to_precision(model, 'torchao-float8', recipe=...)")
    elif any(wrappers.is_sharded(m) for m in module.modules()):
        raise RuntimeError(f"with_precision({p.name!r}): the model is sharded, and its layers can no "
                           f"longer be swapped for fp8 ones; convert it before lt.shard: "
                           f"lt.pipe(model, lt.to_precision({p.name!r}), lt.shard(policy=...))")


def _prepare_weights(module: torch.nn.Module, p: Precision, recipe: Any) -> None:
    """What ``lt.to_precision`` does, for a model it was not applied to: swap in the fp8 layers
    (unless they are there already) and cast to the weight dtype. Mixed modes keep float32
    weights, which ``_prepare`` checks rather than casts."""
    swap = bool(p.fp8) and not fp8.converted(module, p)
    if swap or not p.mixed:
        apply_precision(module, p, recipe=None if p.fp8 == fp8.TRANSFORMER_ENGINE else recipe,
                        swap=swap, call="with_precision")


def _check_shard_policy(module: torch.nn.Module, p: Precision) -> None:
    """FSDP2 took its ``MixedPrecisionPolicy`` when ``lt.shard`` sharded the model; it must be
    the one ``p`` implies (parameters gathered in the autocast dtype of a mixed precision, else
    left as they are). A model sharded with ``fully_shard`` directly carries no record: the
    user chose its policy."""
    decided = shard_precision(module) if wrappers.is_sharded(module) else None
    if decided is None or decided.autocast_dtype == p.autocast_dtype:
        return
    had = (f"with a {_short(decided.autocast_dtype)} mixed-precision policy" if decided.mixed
           else "without a mixed-precision policy")
    raise ValueError(
        f"with_precision({p.name!r}): the model was sharded {had} (lt.shard decided "
        f"{decided.name!r}); FSDP2 takes its MixedPrecisionPolicy when sharding: "
        f"lt.pipe(model, lt.shard(policy=..., precision={p.name!r})) or "
        f"lt.pipe(model, lt.to_precision({p.name!r}), lt.shard(policy=...))"
    )


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
        result = proceed(frame, loss)
    # autocast keeps its low-precision copies of the weights until the outermost autocast exits,
    # the end of the step: backward was their last use, so free them before the optimizer step
    torch.clear_autocast_cache()
    return result


def _unscale(ctx: _Runtime, frame, optimizer, *, proceed):
    assert ctx.scaler is not None  # this handler and _scaler_step are added only with a scaler
    ctx.scaler.unscale_(optimizer)
    return proceed(frame, optimizer)


def _scaler_step(ctx: _Runtime, frame, optimizer, *, proceed):
    # scaler.step calls optimizer.step() itself unless it found inf/NaN; a step post-hook
    # (public API) tells which, with no extra host sync beyond the scaler's own.
    assert ctx.scaler is not None
    applied = []
    handle = optimizer.register_step_post_hook(lambda *_: applied.append(True))
    try:
        ctx.scaler.step(optimizer)
    finally:
        handle.remove()
    return bool(applied)


def _te_autocast(ctx: _Runtime, frame, value, *, proceed):
    with ctx.fp8_autocast():
        return _true_dtype(ctx, frame, value, proceed=proceed)


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
