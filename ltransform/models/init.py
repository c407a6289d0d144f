"""``init_module`` and ``materialize``: build a model where and how it will live."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ltransform.core.compose import MISSING, Partial
from ltransform.core.precisions import resolve_precision


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def init_module(
    build: Any = MISSING,
    /,
    *args: Any,
    device: str | torch.device | None = None,
    precision: Any = "32-true",
    empty: bool = False,
) -> Any:
    """Build a model directly on ``device`` in ``precision``'s weight dtype, or on ``meta``.

    Building in place avoids materializing a float32 copy on the CPU first. With
    ``empty=True`` the model is built on the meta device (no memory at all); call
    :func:`materialize` (after sharding, for a model too big for one device) to allocate it.

    Args:
        build: a function returning the module (e.g. the class); omit for the partial form.
        *args: passed to ``build``.
        device: where to allocate (default: ``lt.device()``, this rank's accelerator, else the CPU).
        precision: a precision name; ``-true`` modes build in their dtype directly.
        empty: build on the meta device, allocating nothing.

    Example:
        >>> import torch, ltransform as lt
        >>> model = lt.init_module(torch.nn.Linear, 4, 4, precision="bf16-true")
        >>> model.weight.dtype
        torch.bfloat16
    """
    record = resolve_precision(precision, "init_module")
    if build is MISSING:
        return Partial(
            lambda b: init_module(b, device=device, precision=record, empty=empty),
            f"init_module(device={device!r}, precision={record.name!r}, empty={empty})",
        )
    if not callable(build):
        raise TypeError(f"init_module: expected a function that builds the model, got {build!r}")
    if empty:
        target = torch.device("meta")
    else:
        from ltransform.distributed import env

        target = device if device is not None else env.device()
    with _default_dtype(record.param_dtype), torch.device(target):
        return build(*args)


def materialize(
    model: Any = MISSING,
    /,
    *,
    device: str | torch.device | None = None,
    init: Callable[[torch.nn.Module], None] | None = None,
) -> Any:
    """Allocate a model built with ``init_module(..., empty=True)`` and initialise it.

    Each submodule's ``reset_parameters()`` runs unless ``init(module)`` is given, in which
    case it is called on every submodule instead. A model sharded with ``lt.shard`` allocates
    and initialises only this rank's shard.

    Args:
        model: the module on the meta device; omit it for the partial form.
        device: where to allocate; default ``lt.device()`` (this rank's GPU, else the CPU).
        init: an initialiser called on every submodule instead of ``reset_parameters``.

    Example:
        >>> import torch, ltransform as lt
        >>> model = lt.init_module(torch.nn.Linear, 2, 2, empty=True)
        >>> lt.materialize(model).weight.device.type
        'cpu'
    """
    if model is MISSING:
        return Partial(lambda m: materialize(m, device=device, init=init), f"materialize(device={device!r})")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"materialize: expected a torch.nn.Module, got {type(model).__name__}")
    if device is None:
        from ltransform.distributed.env import device as this_device

        device = this_device()
    model.to_empty(device=device)
    for module in model.modules():
        if init is not None:
            init(module)
        elif callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
    return model
