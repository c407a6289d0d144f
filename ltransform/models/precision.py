"""``to_precision``: cast a model's weights to a precision's weight dtype."""

from __future__ import annotations

from typing import Any

import torch

from ltransform.core.compose import MISSING, Partial
from ltransform.core.precisions import resolve_precision


def to_precision(model: Any = MISSING, /, precision: Any = MISSING) -> Any:
    """Cast ``model``'s floating parameters and buffers to ``precision``'s weight dtype.

    ``-true`` modes cast to that dtype; ``-mixed`` and ``32-true`` keep float32 weights.
    Apply it before building the optimizer.

    Args:
        model: a ``torch.nn.Module``; omit it for the partial form.
        precision: a precision name (see ``with_precision``).

    Returns:
        The same module, cast in place.

    Example:
        >>> import torch, ltransform as lt
        >>> lt.pipe(torch.nn.Linear(2, 2), lt.to_precision("bf16-true")).weight.dtype
        torch.bfloat16
    """
    if precision is MISSING and not isinstance(model, torch.nn.Module):
        model, precision = MISSING, model
    record = resolve_precision(precision, "to_precision")
    if model is MISSING:
        return Partial(lambda m: to_precision(m, record), f"to_precision({record.name!r})")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"to_precision: expected a torch.nn.Module, got {type(model).__name__}")
    return model.to(record.param_dtype)
