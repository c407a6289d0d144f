"""Precision names and the frozen records they map to."""

from __future__ import annotations

from typing import Any

import attrs
import torch


@attrs.frozen(kw_only=True)
class Precision:
    """What a precision name means.

    Args:
        name: the canonical name, e.g. ``"bf16-mixed"``.
        param_dtype: dtype of the weights (float32 for the mixed modes).
        autocast_dtype: dtype the forward autocasts to, None for the ``-true`` modes.
        scaler: whether losses are scaled with a ``torch.amp.GradScaler``.
        fp8: which library's fp8 layers run the matmuls: ``"transformer-engine"`` (its layers
            and fp8 autocast) or ``"torchao"`` (its ``Float8Linear``); None for none.
    """

    name: str
    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None = None
    scaler: bool = False
    fp8: str | None = attrs.field(default=None, validator=attrs.validators.in_((None, "transformer-engine", "torchao")))

    @property
    def mixed(self) -> bool:
        return self.autocast_dtype is not None


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision(name="16-mixed", param_dtype=torch.float32, autocast_dtype=torch.float16, scaler=True),
        Precision(name="16-true", param_dtype=torch.float16),
        Precision(name="32-true", param_dtype=torch.float32),
        Precision(name="64-true", param_dtype=torch.float64),
        Precision(name="bf16-mixed", param_dtype=torch.float32, autocast_dtype=torch.bfloat16),
        Precision(name="bf16-true", param_dtype=torch.bfloat16),
        # Transformer Engine's layers keep weights in the 16-bit dtype and cast to fp8 inside
        # their matmuls; torchao's Float8Linear does the same under bf16 autocast, with float32
        # weights (as bf16-mixed).
        Precision(name="transformer-engine", param_dtype=torch.bfloat16, fp8="transformer-engine"),
        Precision(name="transformer-engine-float16", param_dtype=torch.float16, fp8="transformer-engine"),
        Precision(name="torchao-float8", param_dtype=torch.float32, autocast_dtype=torch.bfloat16, fp8="torchao"),
    )
}

# Lightning's short spellings, so a Trainer(precision=...) value works unchanged.
ALIASES: dict[Any, str] = {
    "32": "32-true",
    "64": "64-true",
    "16": "16-mixed",
    "bf16": "bf16-mixed",
    32: "32-true",
    64: "64-true",
    16: "16-mixed",
}


def resolve_precision(name: Any, call: str = "with_precision") -> Precision:
    """The :class:`Precision` record for ``name`` (a name, an alias or a record).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
        TypeError: not a str, int or Precision.
    """
    if isinstance(name, Precision):
        return name
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        raise TypeError(
            f"{call}: precision must be a name such as 'bf16-mixed', got {type(name).__name__} {name!r}"
        )
    canonical = ALIASES.get(name, name)
    if canonical not in PRECISIONS:
        valid = ", ".join(repr(n) for n in sorted(PRECISIONS))
        aliases = ", ".join(repr(a) for a in ALIASES)
        raise ValueError(
            f"{call}: unknown precision {name!r}; expected one of: {valid} (aliases: {aliases})"
        )
    return PRECISIONS[canonical]
