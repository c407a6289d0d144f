"""The GPU benchmark: a GPT (~124M and ~350M parameters, sequence 1024, SDPA attention) trained
in bf16-mixed with AdamW and a regional ``torch.compile`` by a hand-written PyTorch loop, by
``lt.run`` and by Lightning Fabric, interleaved on the same data from the same weights.

Reported per model and loop: tokens/s, TFLOP/s and MFU against the bf16 matmul peak measured
in the same run, peak memory, the compile/warm-up time (excluded from the figures), and the
ratios ltransform/raw and ltransform/Fabric; then the fp8 block and the nf4 QLoRA step
(:mod:`ltransform.gpucheck.bench_lowbit`). ``smoke=True`` runs the same code on tiny models on
the CPU in well under a minute (compiling with the ``aot_eager`` backend: dynamo and
autograd's tracing without generating code).

    from ltransform.gpucheck.bench import run_benchmark, to_markdown
    print(to_markdown(run_benchmark()))
"""

from __future__ import annotations

import gc
import platform
import time
from collections.abc import Callable
from typing import Any

import attrs
import torch

from ltransform.gpucheck.bench_lowbit import fp8_block, qlora_block
from ltransform.gpucheck.bench_markdown import to_markdown
from ltransform.gpucheck.bench_models import (LOOPS, PRESETS, SMOKE_PRESETS, Loop, Preset, Settings, Skipped,
                                              build, counted_flops, failure, flops_per_step, make_data,
                                              matmul_peak, measure)

__all__ = ["run_benchmark", "to_markdown"]

# The least time left (seconds) to start a part: a cold inductor compile of a GPT part on a fresh
# GPU machine takes 60-90 s before its ~20 s of measuring, the fp8 part 60-130 s (its float8
# graphs compile anew), the eager QLoRA part ~20 s. A part that does not fit is skipped, with why.
FULL_PART_S = {"model": 100.0, "qlora": 30.0, "fp8": 130.0}
FULL = Settings(warmup=3, rounds=3, steps=15, compile=True, compile_options={"dynamic": False}, peak_size=8192,
                part_s=FULL_PART_S)
SMOKE = Settings(warmup=2, rounds=2, steps=2, compile=True, compile_options={"dynamic": False, "backend": "aot_eager"},
                 peak_size=256, part_s={})
TARGETS = {"lt_over_raw": 0.99, "lt_over_fabric": 1.0, "mfu_350m": 0.45}
Progress = Callable[[dict[str, Any], "str | None"], None]


def run_benchmark(*, smoke: bool = False, device: str | None = None, budget_s: float | None = None,
                  deadline: float | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Run the benchmark and return its results as plain data (JSON-ready).

    Args:
        smoke: tiny models, a few steps, on the CPU unless ``device`` says otherwise.
        device: where to run (default: CUDA if available, else the CPU; the CPU for smoke).
        budget_s: seconds from now after which the parts not started yet are skipped, with that
            reason (default, without ``deadline``: 270 in full, 120 in smoke).
        deadline: the same as a wall-clock time (``time.time()``), e.g. when a supervisor kills
            this process; the earlier of the two counts. A part starts only with its minimum
            time left (``settings.part_s``: a GPT model 100 s, QLoRA 30 s, fp8 130 s in full);
            one already running is not cut short here.
        progress: called as ``progress(result_so_far, running)`` before each part (``running``:
            its name) and after it (``None``), with the result in the returned shape, parts not
            run yet holding ``{"pending": ...}`` and the running one ``{"running": ...}``: a
            caller that may be killed keeps what finished (the GPU check's worker emits these).

    Returns:
        ``{"mode", "device", "settings", "peak_tflops", "models": [...], "fp8", "qlora",
        "targets", "targets_apply", "elapsed_s"}``; a part that could not run holds
        ``{"skipped": reason}`` and one that failed ``{"error": message}``.
    """
    started = time.perf_counter()
    where = torch.device(device or ("cuda" if torch.cuda.is_available() and not smoke else "cpu"))
    if where.type == "cuda" and where.index is None:
        where = torch.device("cuda", torch.cuda.current_device())
    settings, presets = (SMOKE, SMOKE_PRESETS) if smoke else (FULL, PRESETS)
    if budget_s is None and deadline is None:
        budget_s = 120.0 if smoke else 270.0
    ends = [t for t in (deadline, None if budget_s is None else time.time() + budget_s) if t is not None]
    end = min(ends)
    budget = end - time.time()
    if settings.compile:  # graphs compiled earlier in this process must not use up dynamo's recompile limit
        torch.compiler.reset()
    peak = matmul_peak(where, settings.peak_size)
    models: list[dict[str, Any]] = [{"name": p.name, "pending": "not started"} for p in presets]
    blocks: dict[str, dict[str, Any]] = {"fp8": {"pending": "not started"}, "qlora": {"pending": "not started"}}

    def result() -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": "smoke" if smoke else "full",
            "device": _describe(where),
            "settings": {"warmup_steps": settings.warmup, "rounds": settings.rounds,
                         "steps_per_round": settings.steps, "compile": settings.compile,
                         "compile_options": dict(settings.compile_options),
                         "peak_matmul": f"bf16 {settings.peak_size}x{settings.peak_size}x{settings.peak_size}",
                         "budget_s": round(budget, 1), "part_min_s": dict(settings.part_s)},
            "peak_tflops": peak / 1e12,
            "models": [dict(m) for m in models],
            "fp8": dict(blocks["fp8"]),
            "qlora": dict(blocks["qlora"]),
        }
        out["targets"] = _targets(out["models"], presets[-1].name)
        out["targets_apply"] = not smoke and where.type == "cuda"
        out["elapsed_s"] = time.perf_counter() - started
        return out

    def part(label: str, kind: str, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        left, need = end - time.time(), settings.part_s.get(kind, 0.0)
        if left < need or left <= 0:
            return {"skipped": f"time budget: {max(left, 0):.0f} s left of {budget:.0f} s, {label} needs about "
                               f"{need:.0f} s"}
        spent = time.perf_counter()
        try:
            return {**fn(*args), "elapsed_s": time.perf_counter() - spent}
        except Exception as error:  # noqa: BLE001  (one failed part must not cost the GPU run the others)
            return failure(error)
        finally:
            gc.collect()
            if where.type == "cuda":
                torch.cuda.empty_cache()

    def run_part(label: str, kind: str, put: Callable[[dict[str, Any]], None], fn: Callable[..., dict[str, Any]],
                 *args: Any) -> None:
        if progress is not None:
            put({"running": f"started {time.perf_counter() - started:.0f} s into the benchmark"})
            progress(result(), label)
        put(part(label, kind, fn, *args))
        if progress is not None:
            progress(result(), None)

    def model_part(i: int) -> None:
        def put_model(value: dict[str, Any]) -> None:
            models[i] = {"name": presets[i].name, **value}

        run_part(presets[i].name, "model", put_model, _gpt_block, presets[i], where, settings, peak)

    # the parts the targets need first, in case the budget runs out: the big model (MFU
    # target, raw / lt / Fabric), then the fp8 and QLoRA lines, then the smaller models
    model_part(len(presets) - 1)
    run_part("fp8", "fp8", lambda value: blocks.__setitem__("fp8", value), fp8_block, presets[-1], where, settings)
    run_part("qlora", "qlora", lambda value: blocks.__setitem__("qlora", value), qlora_block, presets[-1], where,
             attrs.evolve(settings, steps=max(2, settings.steps // 3)))
    for i in range(len(presets) - 1):
        model_part(i)
    return result()


def _gpt_block(preset: Preset, device: torch.device, settings: Settings, peak: float) -> dict[str, Any]:
    cfg = preset.config
    base = build(cfg, device, seed=0)
    data = make_data(cfg, preset.batch, max(settings.warmup, settings.steps), device, seed=1)
    flops = flops_per_step(cfg, preset.batch)
    counted = counted_flops(base, data[0], preset.batch, device)
    loops: list[Loop] = []
    variants: dict[str, dict[str, Any]] = {}
    for name, make in LOOPS.items():
        try:
            loops.append(make(base, device, settings))
        except Skipped as reason:
            variants[name] = {"skipped": str(reason)}
        except Exception as error:  # noqa: BLE001  (e.g. Fabric failing to start: the other loops still run)
            variants[name] = failure(error)
    params = sum(p.numel() for p in base.parameters())
    del base
    tokens = preset.batch * cfg.block
    for name, row in measure(loops, data, settings, device, tokens).items():
        if "tokens_per_s" not in row:
            variants[name] = row
            continue
        steps_per_s = row["tokens_per_s"] / tokens
        row["tflops"] = flops * steps_per_s / 1e12
        row["mfu"] = flops * steps_per_s / peak
        variants[name] = row
    return {"params": params, "layers": cfg.n_layer, "heads": cfg.n_head, "width": cfg.n_embd,
            "vocab": cfg.vocab, "seq": cfg.block, "batch": preset.batch, "tokens_per_step": tokens,
            "flops_per_step": flops, "flops_counted": counted,
            "variants": {name: variants[name] for name in LOOPS},
            "ratios": _ratios(variants), "loss_rel_diff": _loss_agreement(variants)}


def _ratios(variants: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def speed(name: str) -> float | None:
        return variants.get(name, {}).get("tokens_per_s")

    ours, raw, fabric = speed("ltransform"), speed("raw"), speed("fabric")
    return {"lt_over_raw": ours / raw if ours and raw else None,
            "lt_over_fabric": ours / fabric if ours and fabric else None,
            "fabric_over_raw": fabric / raw if fabric and raw else None}


def _loss_agreement(variants: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The largest relative difference to the raw loop's loss, over the warm-up and every round."""
    raw = variants.get("raw", {})
    if "losses" not in raw:
        return {}
    reference = [raw["warmup_loss"], *raw["losses"]]
    out = {}
    for name, row in variants.items():
        if name != "raw" and "losses" in row:
            mine = [row["warmup_loss"], *row["losses"]]
            out[name] = max(abs(a - b) / abs(b) for a, b in zip(mine, reference))
    return out


def _targets(models: list[dict[str, Any]], big: str) -> list[dict[str, Any]]:
    out = []
    for model in models:
        for key in ("lt_over_raw", "lt_over_fabric"):
            value = model.get("ratios", {}).get(key)
            met = None if value is None else value >= TARGETS[key]
            out.append({"what": f"{model['name']}: ltransform tokens/s / {key.split('_over_')[1]}",
                        "value": value, "target": TARGETS[key], "met": met})
        if model["name"] == big:
            mfu = model.get("variants", {}).get("ltransform", {}).get("mfu")
            out.append({"what": f"{big}: ltransform MFU (bf16, compile)", "value": mfu,
                        "target": TARGETS["mfu_350m"], "met": None if mfu is None else mfu >= TARGETS["mfu_350m"]})
    return out


def _describe(device: torch.device) -> dict[str, Any]:
    import importlib.metadata

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {"type": device.type, "name": platform.processor() or platform.machine(),
                            "torch": torch.__version__, "cuda": torch.version.cuda,
                            **{name: version(name) for name in ("lightning", "torchao", "bitsandbytes",
                                                                 "transformer_engine", "triton")}}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info["name"], info["capability"] = torch.cuda.get_device_name(device), f"{major}.{minor}"
    return info
