"""``clip_gradients``: gradient clipping by norm and/or by value, on unscaled gradients."""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from ltransform.core.compose import MISSING, describe_options
from ltransform.core.effects import Effect, Handler, Stage, When
from ltransform.core.step import StepTransform, apply_step_transform


@attrs.frozen(kw_only=True)
class _Clip:
    max_norm: float | None
    max_value: float | None
    norm_type: float
    foreach: bool | None


def clip_gradients(
    step: Any = MISSING,
    /,
    *,
    max_norm: float | None = None,
    max_value: float | None = None,
    norm_type: float = 2.0,
    foreach: bool | None = None,
) -> Any:
    """Clip each optimizer's gradients before its update.

    Runs after a grad scaler has unscaled the gradients and before the update, whatever the
    composition order. With both limits, values are clipped first, then the norm. The total
    norm before clipping is returned in the step's metrics as ``grad_norm`` (a tensor).

    Args:
        step: the step to transform; omit it for the partial form.
        max_norm: clip the total gradient norm to this (``torch.nn.utils.clip_grad_norm_``).
        max_value: clamp each gradient element to ``[-max_value, max_value]``.
        norm_type: the p of the p-norm; ``float("inf")`` for the max norm.
        foreach: passed to torch's clipping functions.

    Raises:
        ValueError: neither limit given, or a limit that is not a positive number.

    Example:
        >>> import torch, ltransform as lt
        >>> step = lt.pipe(lt.train_step(lambda m, b: m(b).sum() * 100), lt.clip_gradients(max_norm=1.0))
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters()))
        >>> _, metrics = step(state, torch.ones(1, 2))
        >>> bool(metrics["grad_norm"] > 1)
        True
    """
    name = describe_options("clip_gradients", max_norm=max_norm, max_value=max_value)
    if max_norm is None and max_value is None:
        raise ValueError("clip_gradients: give max_norm=..., max_value=... or both")
    for option, value in (("max_norm", max_norm), ("max_value", max_value)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value > 0 or math.isinf(value)):
            raise ValueError(f"clip_gradients: {option} must be a positive finite number, got {value!r}")
    config = _Clip(max_norm=max_norm, max_value=max_value, norm_type=float(norm_type), foreach=foreach)
    what = " then ".join(
        part for part, on in (("clip_grad_value_", max_value), ("clip_grad_norm_", max_norm)) if on
    )
    transform = StepTransform(
        name=name,
        kind="clip",
        handlers=(Handler(effect=Effect.OPTIMIZER_STEP, stage=Stage.CLIP, fn=_clip,
                          label=f"clip_gradients: {what}", when=When.BOUNDARY),),
        prepare=lambda state: (state, config),
    )
    return apply_step_transform(step, transform, "clip_gradients")


def _clip(config: _Clip, frame, optimizer, *, proceed):
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if config.max_value is not None:
        torch.nn.utils.clip_grad_value_(params, config.max_value, foreach=config.foreach)
    if config.max_norm is not None:
        frame.report("grad_norm", _clip_norm(params, config))
    return proceed(frame, optimizer)


def _clip_norm(params: list[torch.Tensor], config: _Clip) -> torch.Tensor:
    """Clip to the global norm, returned. Gradients on different device meshes, or DTensors beside plain
    tensors (a tensor-parallel model's split layers beside its replicated ones), cannot meet in one torch
    call: each group's norm is taken alone, made whole, and combined."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for param in params:
        groups.setdefault(getattr(param.grad, "device_mesh", None), []).append(param)
    if len(groups) <= 1:
        norm = torch.nn.utils.clip_grad_norm_(params, config.max_norm,  # type: ignore[arg-type]
                                              norm_type=config.norm_type, foreach=config.foreach)
        return _whole(norm)
    norms = [_whole(torch.nn.utils.get_total_norm([p.grad for p in group if p.grad is not None],
                                                  config.norm_type, foreach=config.foreach))
             for group in groups.values()]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), config.norm_type)
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, config.max_norm,  # type: ignore[arg-type]
                                             total, foreach=config.foreach)
    return total


def _whole(norm: torch.Tensor) -> torch.Tensor:
    full = getattr(norm, "full_tensor", None)  # sharded (DTensor) gradients: the global norm, replicated
    return full() if callable(full) else norm
