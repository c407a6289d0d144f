"""``lt.autocast``: the autocast of ``with_precision``, for a loop outside a step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ltransform.core.precisions import resolve_precision
from ltransform.distributed import env
from ltransform.steps.precision import check_supported


@contextlib.contextmanager
def autocast(precision: Any, /, *, device_type: str | None = None) -> Iterator[None]:
    """The autocast a step under ``lt.with_precision(precision)`` runs its forward in, for a
    custom evaluation or generation loop (Lightning's ``fabric.autocast()``).

    The mixed precisions (``"bf16-mixed"``, ``"16-mixed"``, ``"torchao-float8"``) enter
    ``torch.autocast`` to their dtype, as the step does, so a forward inside equals the step's
    bit for bit. ``"32-true"`` is a no-op (the step adds nothing either). The other ``-true``
    precisions (and Transformer Engine's fp8) have no autocast: they mean the *model's* dtype,
    set once with ``lt.to_precision(model, name)``, with inputs of that dtype; they are
    refused here rather than silently ignored.

    Args:
        precision: a precision name (or Lightning alias, or ``lt.Precision`` record).
        device_type: the device type of the model (``"cuda"``, ``"cpu"``, ...); default that of
            ``lt.device()``, where the runner puts models.

    Raises:
        ValueError: an unknown name (lists the valid ones); a ``-true`` or Transformer Engine
            precision (says what to do instead); a precision the device cannot run.
        TypeError: ``precision`` is not a name.

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 2)
        >>> with lt.autocast("bf16-mixed", device_type="cpu"):
        ...     out = model(torch.ones(1, 2))
        >>> out.dtype
        torch.bfloat16
    """
    record = resolve_precision(precision, "lt.autocast")
    if record.name == "32-true":
        yield
        return
    if not record.mixed:
        raise ValueError(
            f"lt.autocast({record.name!r}): {record.name!r} has no autocast: it is the model's dtype "
            f"({str(record.param_dtype).removeprefix('torch.')}), not an autocast of the forward; convert the "
            f"model once with lt.to_precision(model, {record.name!r}) and feed inputs of that dtype, or use "
            f"a mixed precision ('bf16-mixed', '16-mixed')")
    kind = device_type or env.device().type
    check_supported(record, kind)
    with torch.autocast(kind, dtype=record.autocast_dtype):
        yield
