"""Checks of ``estimate_memory`` against a real training step: ``estimate_vs_cuda`` compares it
with ``torch.cuda.max_memory_allocated()``; ``first_step`` is the training both the GPU check
and the CPU tests measure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ltransform.core.precisions import resolve_precision
from ltransform.models.memory import default_loss, estimate_memory, resolve_optimizer
from ltransform.models.memory_trace import on_device


def estimate_vs_cuda(
    factory: Callable[[], torch.nn.Module],
    /,
    *,
    batch: Any,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    precision: Any = "32-true",
    optimizer: Any = "adamw",
    checkpoint: Any = None,
) -> tuple[int, int]:
    """The estimated peak and ``torch.cuda.max_memory_allocated()`` of a real training step.

    Builds the model on the current CUDA device, trains two steps with ``lt.train_step`` and
    ``lt.with_precision`` (the first creates the optimizer state) and measures the second.
    The measure is the device's whole peak: run it with nothing else held on the device.

    Args:
        factory, batch, loss_fn, precision, optimizer, checkpoint: as for :func:`estimate_memory`
            (one process; the batch is moved to the device).

    Returns:
        ``(estimated bytes, measured bytes)``.

    Raises:
        RuntimeError: CUDA is not available.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("estimate_vs_cuda: CUDA is not available; it measures torch.cuda.max_memory_allocated()")
    estimate = estimate_memory(factory, batch=batch, loss_fn=loss_fn, precision=precision, optimizer=optimizer,
                               checkpoint=checkpoint, device="cuda")
    _, _, second = first_step(factory, batch=batch, loss_fn=loss_fn, precision=precision, optimizer=optimizer,
                              checkpoint=checkpoint, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    second()
    torch.cuda.synchronize()
    return estimate.total, torch.cuda.max_memory_allocated()


def first_step(factory: Callable[[], torch.nn.Module], /, *, batch: Any, loss_fn: Any = None,
               precision: Any = "32-true", optimizer: Any = "adamw", checkpoint: Any = None,
               device: str = "cpu") -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    """Build the model on ``device`` and train one step with ``lt.train_step`` and
    ``lt.with_precision`` (which creates the optimizer state); return the model, the optimizer
    and the next step, to measure. The CPU tests measure this same code against the estimate."""
    import ltransform as lt  # the steps sit above the models: imported for the checks only

    with torch.device(device):
        model = factory()
    record = resolve_precision(precision, "estimate_memory")
    if record.autocast_dtype is None and record.name != "32-true":
        model = lt.to_precision(model, record.name)
    if checkpoint is not None:
        model = lt.checkpoint_activations(model, policy=checkpoint)
    opt = resolve_optimizer(optimizer, device)[0](list(model.parameters()))
    step = lt.pipe(lt.train_step(loss_fn or default_loss), lt.with_precision(record.name))
    batch = on_device(batch, torch.device(device))
    state, _ = step(lt.State(model=model, optimizer=opt), batch)

    def second() -> None:
        step(state, batch)

    return model, opt, second
