"""``to_precision``: cast a model's weights to a precision's weight dtype (and swap in fp8 layers)."""

from __future__ import annotations

from typing import Any

import torch

from ltransform.core.compose import MISSING, Partial
from ltransform.core.precisions import Precision, resolve_precision
from ltransform.models import fp8
from ltransform.models.order import check_order

# Plain attributes on the root module (set with object.__setattr__, so neither submodules nor
# state), read by lt.shard and with_precision: FSDP2 takes its mixed-precision policy when
# sharding, so the precision chosen before lt.shard has to travel with the model.
PRECISION = "_ltransform_precision"  # the name lt.to_precision was given
SHARD_PRECISION = "_ltransform_shard_precision"  # the name lt.shard decided its policy from


def to_precision(model: Any = MISSING, /, precision: Any = MISSING, *, recipe: Any = None,
                 skip: Any = None) -> Any:
    """Cast ``model``'s floating parameters and buffers to ``precision``'s weight dtype.

    ``-true`` modes cast to that dtype; ``-mixed`` and ``32-true`` keep float32 weights. The
    fp8 names also swap layers: ``"transformer-engine"`` / ``"transformer-engine-float16"``
    put Transformer Engine's ``Linear``, ``LayerNorm`` and ``RMSNorm`` in place of torch's
    (weights in bf16 / fp16); ``"torchao-float8"`` puts torchao's ``Float8Linear`` in place of
    ``nn.Linear`` (float32 weights; on several ranks its weights all-gather in fp8 once
    sharded). Linear layers with a dimension that is not a multiple of 16 keep their precision,
    with a warning. The swap keeps the parameter objects.

    The model keeps the precision's name, so a later ``lt.shard`` gives FSDP2 the matching
    ``MixedPrecisionPolicy``: ``"bf16-mixed"``, ``"16-mixed"`` and ``"torchao-float8"`` gather
    parameters in their autocast dtype and reduce gradients in float32.

    Args:
        model: a ``torch.nn.Module``; omit it for the partial form.
        precision: a precision name (see ``with_precision``).
        recipe: ``"torchao-float8"`` only: a torchao recipe name (``"tensorwise"``, the default,
            ``"rowwise"``, ``"rowwise_with_gw_hp"``) or a ``Float8LinearConfig``.
        skip: fp8 names only: layers to leave alone, as names, glob patterns or a predicate
            ``(name, module) -> bool`` (e.g. ``{"lm_head"}``).

    Returns:
        The same module, cast (and converted) in place.

    Raises:
        ImportError: the fp8 library is not installed (names the pip command).
        ValueError: an unknown precision name (lists the valid ones).
        RuntimeError: an fp8 name after ``torch.compile`` or ``shard``, a mixed name after
            ``shard``; a Transformer Engine name on a model that is not on a GPU of compute
            capability 8.9+.

    Example:
        >>> import torch, ltransform as lt
        >>> lt.pipe(torch.nn.Linear(2, 2), lt.to_precision("bf16-true")).weight.dtype
        torch.bfloat16

    Note:
        fp8 swaps come before ``torch.compile`` and ``lt.shard``, and mixed precisions before
        ``lt.shard`` (FSDP2 takes its policy when sharding):
        ``lt.pipe(model, lt.to_precision("bf16-mixed"), lt.shard(policy={Block}))``.
    """
    if precision is MISSING and not isinstance(model, torch.nn.Module):
        model, precision = MISSING, model
    record = resolve_precision(precision, "to_precision")
    if record.fp8 is None and (recipe is not None or skip is not None):
        raise ValueError(f"to_precision: recipe and skip apply to the fp8 precisions only, not {record.name!r}")
    fp8.check_installed(record, "to_precision")
    if model is MISSING:
        return Partial(lambda m: to_precision(m, record, recipe=recipe, skip=skip), f"to_precision({record.name!r})")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"to_precision: expected a torch.nn.Module, got {type(model).__name__}")
    if record.mixed:
        check_order(model, "to_precision", later=("shard",))  # FSDP2's policy is decided by then
    apply_precision(model, record, recipe=recipe, skip=skip, call="to_precision")
    object.__setattr__(model, PRECISION, record.name)  # a plain attribute: not a submodule or buffer
    return model


def apply_precision(model: torch.nn.Module, record: Precision, *, recipe: Any = None, skip: Any = None,
                    swap: bool = True, call: str) -> None:
    """What ``to_precision`` does to a model, with ``call`` naming the caller in messages (so
    ``with_precision`` converts a model that was not converted with the same code): swap in
    ``record``'s fp8 layers (which casts first), or only cast to its weight dtype (for a model
    whose layers were swapped already, ``swap=False``)."""
    if record.fp8 is not None and swap:
        check_order(model, "to_precision")
        fp8.convert(model, record, recipe=recipe, skip=skip, call=call)  # casts, then swaps
    else:
        model.to(record.param_dtype)


def recorded_precision(model: torch.nn.Module) -> Precision | None:
    """The precision ``lt.to_precision`` gave ``model``, if any."""
    name = getattr(model, PRECISION, None)
    return None if name is None else resolve_precision(name)


def shard_precision(model: torch.nn.Module) -> Precision | None:
    """The precision ``lt.shard`` sharded ``model`` with (None: not sharded by ``lt.shard``)."""
    name = getattr(model, SHARD_PRECISION, None)
    return None if name is None else resolve_precision(name)


def record_shard_precision(model: torch.nn.Module, record: Precision) -> None:
    """Keep on ``model`` the precision ``lt.shard`` took its policy from."""
    object.__setattr__(model, SHARD_PRECISION, record.name)
