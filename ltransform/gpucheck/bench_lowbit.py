"""The GPU benchmark's low-bit blocks: one GPT step in bf16 against fp8 (torchao's float8
training, Transformer Engine), and a QLoRA step (frozen nf4 base + rank-16 LoRA) against a bf16
full finetune. Each row that cannot run here carries the reason instead of figures."""

from __future__ import annotations

import copy
import gc
import importlib.util
import statistics
import time
from typing import Any

import attrs
import torch
from torch import nn

import ltransform as lt
from ltransform.examples.gpt import loss_fn
from ltransform.gpucheck.bench_models import (Loop, Preset, Settings, Skipped, StepClock, build, failure, importable,
                                              lt_loop, make_data, measure, sync)

FP8_ROWS = ("bf16-mixed", "torchao-float8", "transformer-engine")
QLORA_RANK = 16


def fp8_block(preset: Preset, device: torch.device, settings: Settings) -> dict[str, Any]:
    """bf16-mixed, torchao float8 (both compiled per block) and Transformer Engine (eager: its
    layers bring their own fused kernels), all through ``lt.with_precision``, interleaved on the
    same data from the same weights: tokens/s, and the loss after the same steps."""
    cfg = preset.config
    base = build(cfg, device, seed=0)
    data = make_data(cfg, preset.batch, max(settings.warmup, settings.steps), device, seed=1)
    rows: dict[str, dict[str, Any]] = {}
    loops: list[Loop] = []
    for precision in FP8_ROWS:
        try:
            loops.append(_fp8_loop(precision, base, device, settings))
        except Skipped as reason:
            rows[precision] = {"skipped": str(reason)}
        except Exception as error:  # noqa: BLE001  (e.g. a layer swap failing: the other rows still run)
            rows[precision] = failure(error)
    del base
    measured = measure(loops, data, settings, device, preset.batch * cfg.block)
    reference = measured.get("bf16-mixed", {})
    for name, row in measured.items():
        if "tokens_per_s" in row and "tokens_per_s" in reference:
            row["speedup_vs_bf16"] = row["tokens_per_s"] / reference["tokens_per_s"]
            ref_loss = reference["final_loss"]
            row["loss_rel_diff_vs_bf16"] = abs(row["final_loss"] - ref_loss) / abs(ref_loss)
        rows[name] = row
    return {"model": preset.name, "steps": settings.warmup + settings.rounds * settings.steps,
            "rows": {name: rows[name] for name in FP8_ROWS}}


def _fp8_loop(precision: str, base: nn.Module, device: torch.device, settings: Settings) -> Loop:
    if precision == "bf16-mixed":
        return lt_loop(base, device, settings, name=precision)
    module = "torchao" if precision == "torchao-float8" else "transformer_engine"
    if importlib.util.find_spec(module) is None:
        raise Skipped(f"{module} is not importable here")
    importable("torchao.float8" if module == "torchao" else "transformer_engine.pytorch", module)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise Skipped(f"fp8 needs compute capability 8.9+; this GPU has {major}.{minor}")
    if precision == "torchao-float8":  # swapped before compiling (the order rule); the LM head stays bf16,
        model = lt.to_precision(copy.deepcopy(base), precision, skip={"head"})  # as torchtitan's float8 leaves it
        loop = lt_loop(base, device, settings, precision=precision, model=model, name=precision)
        loop.note += ", head in bf16" + ("" if device.type == "cuda" else ", fp8 emulated on the CPU")
        return loop
    if device.type != "cuda":
        raise Skipped("Transformer Engine needs a CUDA GPU")
    loop = lt_loop(base, device, attrs.evolve(settings, compile=False), precision=precision, name=precision)
    loop.note += " (Transformer Engine's fused layers; eager against the compiled bf16 row: not like for like)"
    return loop


def qlora_block(preset: Preset, device: torch.device, settings: Settings) -> dict[str, Any]:
    """A bf16-mixed full finetune against nf4 QLoRA (``lt.quantize("nf4")`` of the blocks, then
    ``lt.add_adapters(rank=16)``), one model at a time so each peak memory is its own; eager
    (bitsandbytes' layers are not compiled)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"model": preset.name, "skipped": "bitsandbytes is not installed (pip install bitsandbytes)"}
    try:
        importable("bitsandbytes", "bitsandbytes")
    except Skipped as reason:
        return {"model": preset.name, "skipped": str(reason)}
    cfg = preset.config
    data = make_data(cfg, preset.batch, max(settings.warmup, settings.steps), device, seed=1)
    rows = {}
    for name, quantized in (("bf16 full finetune", False), (f"nf4 QLoRA r{QLORA_RANK}", True)):
        model = build(cfg, device, seed=0)
        if quantized:  # the head stays in full precision and frozen, as QLoRA leaves the LM head
            model = lt.pipe(model, lt.quantize("nf4", skip={"head"}, compute_dtype=torch.bfloat16),
                            lt.add_adapters(rank=QLORA_RANK, targets={"blocks.*"}))
        rows[name] = _alone(model, data, settings, device, preset.batch * cfg.block)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    full, qlora = rows.values()
    qlora["time_vs_full"] = qlora["step_ms"] / full["step_ms"]
    if full["peak_gib"] is not None:
        qlora["memory_vs_full"] = qlora["peak_gib"] / full["peak_gib"]
    return {"model": preset.name, "rows": rows}


def _alone(model: nn.Module, data: list[Any], settings: Settings, device: torch.device, tokens: int) -> dict[str, Any]:
    """Warm-up, then ``rounds`` timed ``lt.run`` calls of ``steps`` steps; the peak memory is
    the whole process's on the device while this model trains alone."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = settings.optimizer(trainable, device)
    step = lt.pipe(lt.train_step(loss_fn), lt.with_precision("bf16-mixed"))
    state = lt.State(model=model, optimizer=optimizer)
    seen: list[float] = []
    clock = StepClock(device)  # the steps timed, lt.run's set-up per call left out (as in measure)

    def train(batches: list[Any]) -> float:
        nonlocal state
        end = state.step + len(batches)
        state = lt.run(step, state, clock.data(batches, end), max_steps=end, progress=False, hooks=[clock.hook],
                       loggers=[lambda metrics, at: seen.append(metrics["loss"])])
        return seen[-1]

    train(data[:settings.warmup])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(settings.rounds):
        sync(device)
        start = time.perf_counter()
        train(data[:settings.steps])
        sync(device)
        seconds.append(clock.seconds if clock.seconds is not None else time.perf_counter() - start)
    median = statistics.median(seconds)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return {"step_ms": 1e3 * median / settings.steps, "tokens_per_s": tokens * settings.steps / median,
            "peak_gib": peak, "final_loss": seen[-1],
            "trainable_params": sum(p.numel() for p in trainable)}
