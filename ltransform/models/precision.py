"""``to_precision``: cast a model's weights to a precision's weight dtype (and swap in fp8 layers)."""

from __future__ import annotations

from typing import Any

import torch

from ltransform.core.compose import MISSING, Partial
from ltransform.core.precisions import resolve_precision
from ltransform.models import fp8
from ltransform.models.order import check_order


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
        RuntimeError: an fp8 name after ``torch.compile`` or ``shard``; a Transformer Engine
            name on a model that is not on a GPU of compute capability 8.9+.

    Example:
        >>> import torch, ltransform as lt
        >>> lt.pipe(torch.nn.Linear(2, 2), lt.to_precision("bf16-true")).weight.dtype
        torch.bfloat16

    Note:
        fp8 swaps come before ``torch.compile`` and ``lt.shard``:
        ``lt.pipe(model, lt.to_precision("torchao-float8"), lt.shard(policy={Block}))``.
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
    if record.fp8 is not None:
        check_order(model, "to_precision")
        fp8.convert(model, record, recipe=recipe, skip=skip, call="to_precision")  # casts, then swaps
        return model
    return model.to(record.param_dtype)
