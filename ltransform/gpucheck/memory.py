"""``lt.estimate_memory`` against a real training step: ``estimate_vs_cuda`` compares it with
``torch.cuda.max_memory_allocated()`` (the ``memory-estimate`` check); ``first_step`` is the
training both this check and the CPU tests (``tests/test_memory.py``) measure."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from ltransform.core.precisions import resolve_precision
from ltransform.models.memory import default_loss, estimate_memory, resolve_optimizer
from ltransform.models.memory_inputs import on_device


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
    import ltransform as lt

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


def check_memory_estimate(device: torch.device, size: Any) -> dict[str, Any]:
    """lt.estimate_memory within 20% of torch.cuda.max_memory_allocated for GPTs in several
    precisions, with and without activation checkpointing (on the CPU: the estimate and the step
    run; tests/test_memory.py measures the CPU peak)."""
    from ltransform.examples.gpt import GPT, Block, GPTConfig, loss_fn, preset

    small = GPTConfig(vocab=50304, block=1024, n_layer=4, n_head=8, n_embd=512)
    configs: dict[str, tuple[GPTConfig, int, dict[str, Any]]] = {
        "gpt 4x512 fp32 adamw": (small, 8, {}),
        "gpt 4x512 bf16-mixed": (small, 8, {"precision": "bf16-mixed"}),
        "gpt 4x512 bf16-mixed checkpoint": (small, 8, {"precision": "bf16-mixed", "checkpoint": {Block}}),
        "gpt 4x512 bf16-true": (small, 8, {"precision": "bf16-true"}),
        "gpt-124m bf16-mixed": (preset("gpt-124m"), 8, {"precision": "bf16-mixed"}),
    }
    if device.type != "cuda":  # the smoke run: the same calls on a tiny model, the estimate only
        tiny = GPTConfig(n_layer=1, n_embd=32, n_head=2, block=16)
        configs = {"tiny gpt bf16-mixed": (tiny, 2, {"precision": "bf16-mixed"})}
    rows: dict[str, Any] = {}
    for name, (cfg, rows_per_batch, options) in configs.items():
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.vocab, (rows_per_batch, cfg.block), generator=gen)
        batch = (x, x.roll(1, 1))
        factory = lambda cfg=cfg: GPT(cfg)  # noqa: E731
        if device.type == "cuda":
            gc.collect()  # the previous configuration's model and optimizer are gone before measuring
            torch.cuda.empty_cache()
            with torch.cuda.device(device):
                estimate, measured = estimate_vs_cuda(factory, batch=batch, loss_fn=loss_fn, **options)
            rows[name] = {"estimate_mib": round(estimate / 2**20, 1), "measured_mib": round(measured / 2**20, 1),
                          "error": round((estimate - measured) / measured, 4)}
        else:
            total = estimate_memory(factory, batch=batch, loss_fn=loss_fn, device="cpu", **options).total
            first_step(factory, batch=batch, loss_fn=loss_fn, device="cpu", **options)[2]()
            rows[name] = {"estimate_mib": round(total / 2**20, 2), "measured_mib": None}
    worst = [f"{n}: {r['estimate_mib']} vs {r['measured_mib']} MiB" for n, r in rows.items()
             if r["measured_mib"] is not None and abs(r["error"]) > 0.2]
    assert not worst, f"estimate off by more than 20%: {'; '.join(worst)} (all: {rows})"
    return rows
