"""Low-bit checks: bitsandbytes through ``lt.quantize`` (every mode), QLoRA, torchao float8."""

from __future__ import annotations

import copy
import functools
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

import ltransform as lt
from ltransform.gpucheck.common import (Size, Skip, accelerator, assert_close, batches, median_ms, memory_allocated,
                                        mlp, mse, require, timed)

BNB_PIP = "'ltransform[quant]' (or pip install bitsandbytes)"
TORCHAO_PIP = "'ltransform[torchao]' (torchao>=0.13,<0.18)"
# relative forward error against the fp32 model: 4-bit's own rounding (measured on the CPU: nf4 0.149-0.162,
# fp4 0.173-0.198 at various sizes), a loose bound that catches a gross error only
TOLERANCE = {"int8": 0.02, "int8-training": 0.02, "nf4": 0.2, "nf4-dq": 0.2, "fp4": 0.25, "fp4-dq": 0.25}
# relative forward error of a 4-bit model against the same MLP holding its dequantized weights
# (bitsandbytes.functional.dequantize_4bit): what ltransform's wiring adds (0.0 measured on the CPU)
DEQUANTIZED_TOLERANCE = 5e-3
AT_LEAST = {"int8": 1.9, "int8-training": None, "nf4": 3.4, "fp4": 3.4, "nf4-dq": 3.7, "fp4-dq": 3.7}  # x fp16


def quant_model(width: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return build_quant_model(width)


def build_quant_model(width: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.ReLU(), torch.nn.Linear(2 * width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, 64))


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the linear layers' weights, with 4-bit quantization state and int8 row scales."""
    total = 0
    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        total += weight.numel() * weight.element_size()
        state = getattr(weight, "quant_state", None)
        if state is not None:
            total += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values()
                         if isinstance(t, torch.Tensor))
        scales = getattr(weight, "SCB", None)
        if scales is None:  # after a forward, int8 layers keep their scales in their state
            scales = getattr(getattr(layer, "state", None), "SCB", None)
        total += 0 if scales is None else scales.numel() * scales.element_size()
    return total


def check_quantize(mode: str, device: torch.device, size: Size) -> dict[str, Any]:
    """``lt.quantize(model, mode)`` on the device: the layers swapped, the weights quantized there
    (memory against fp16), the forward equal to the MLP holding the dequantized weights (4-bit)
    and within tolerance of the fp32 model."""
    require("bitsandbytes", BNB_PIP)
    record = lt.QUANTIZATIONS[mode]
    with accelerator(device):
        reference = quant_model(size.quant_width).to(device)
        fp16_bytes = weight_bytes(reference) // 2
        x = torch.randn(size.rows, size.quant_width, generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            expected, fp_seconds = timed(device, lambda: reference(x))
        before = memory_allocated(device)
        quantized = lt.quantize(copy.deepcopy(reference), mode)
        grew = memory_allocated(device)
        layer = "Linear8bitLt" if record.bits == 8 else "Linear4bit"
        kinds = [type(m).__name__ for m in quantized if not isinstance(m, torch.nn.ReLU)]
        assert kinds == [layer] * 3, kinds
        on = {p.device for p in quantized.parameters()}
        assert on == {device}, f"quantized parameters are on {on}, not {device}"
        quantized_bytes = weight_bytes(quantized)
        dtypes = sorted({str(m.weight.dtype) for m in quantized if hasattr(m, "weight")})
        with torch.no_grad():
            timed(device, lambda: quantized(x))  # warm-up (int8 moves its scales into its state)
            out, q_seconds = timed(device, lambda: quantized(x))
        after_forward_bytes = weight_bytes(quantized)
        error = ((out.float() - expected).norm() / expected.norm()).item()
        wiring = None
        if record.bits == 4:
            dequantized = _dequantized(reference, quantized)
            with torch.no_grad():
                same_math = dequantized(x)
            wiring = ((out.float() - same_math).norm() / same_math.norm()).item()
            assert wiring < DEQUANTIZED_TOLERANCE, (
                f"{mode}: the quantized model's forward differs from the same MLP holding its dequantized weights "
                f"by {wiring:.3g} (relative; expected < {DEQUANTIZED_TOLERANCE}); against the fp32 model: {error:.4f}")
        assert error < TOLERANCE[mode], f"{mode}: relative forward error {error:.4f} >= {TOLERANCE[mode]}"
        ratio = fp16_bytes / quantized_bytes
        need = AT_LEAST[mode]
        assert need is None or ratio >= need, (
            f"{mode}: right after lt.quantize the weights take {quantized_bytes} bytes, {ratio:.2f}x less than "
            f"fp16 (expected >= {need}x; weight dtypes {dtypes}); after a forward: {after_forward_bytes} bytes")
        trained = _train_one_step(quantized, x) if record.trainable else None
    return {"relative_error": round(error, 6), "relative_error_vs_dequantized": wiring,
            "weight_bytes": quantized_bytes, "fp16_weight_bytes": fp16_bytes,
            "vs_fp16": round(ratio, 3), "weight_bytes_after_forward": after_forward_bytes, "weight_dtypes": dtypes,
            "allocated_bytes_of_quantized_copy": None if before is None or grew is None else grew - before,
            "forward_ms": round(q_seconds * 1e3, 4), "fp32_forward_ms": round(fp_seconds * 1e3, 4),
            "trainable_step_changed_weights": trained}


def _dequantized(reference: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """``reference`` with each 4-bit layer's weight replaced by its dequantized value
    (``bitsandbytes.functional.dequantize_4bit``): the math the quantized model should do."""
    functional = require("bitsandbytes.functional", BNB_PIP)
    out = copy.deepcopy(reference)
    for (name, layer), mine in zip(quantized.named_children(), out.children()):
        state = getattr(getattr(layer, "weight", None), "quant_state", None)
        if state is None:
            continue
        assert isinstance(mine, torch.nn.Linear), (name, type(mine))
        weight = functional.dequantize_4bit(layer.weight.data, state)
        mine.weight.data = weight.reshape(mine.weight.shape).to(mine.weight.dtype)
        bias = getattr(layer, "bias", None)
        if isinstance(bias, torch.Tensor) and mine.bias is not None:
            mine.bias.data = bias.data.to(mine.bias.dtype)
    return out


def check_quantize_from_weights(device: torch.device, size: Size) -> dict[str, Any]:
    """``lt.quantize(meta_model, mode, weights=state_dict)`` (layer by layer, onto the device) for nf4
    and int8 equals quantizing the built model there, and its weights are quantized when it returns."""
    require("bitsandbytes", BNB_PIP)
    weights = quant_model(size.quant_width).state_dict()
    x = torch.randn(size.rows, size.quant_width, generator=torch.Generator().manual_seed(1)).to(device)
    found: dict[str, Any] = {}
    with accelerator(device):
        for mode in ("nf4", "int8"):
            expected = lt.quantize(quant_model(size.quant_width).to(device), mode)
            empty = lt.init_module(build_quant_model, size.quant_width, empty=True)
            before = memory_allocated(device)
            loaded = lt.quantize(empty, mode, weights=weights)
            grew = memory_allocated(device)
            on = {p.device for p in loaded.parameters()}
            assert on == {device}, f"{mode}: the loaded model is on {on}"
            quantized_bytes = weight_bytes(loaded)
            ratio = weight_bytes(quant_model(size.quant_width)) / 2 / quantized_bytes
            with torch.no_grad():
                same = torch.equal(loaded(x), expected(x))
            found[mode] = {"weight_bytes": quantized_bytes, "vs_fp16": round(ratio, 3), "same_output": same,
                           "allocated_bytes": None if before is None or grew is None else grew - before}
            assert ratio >= (AT_LEAST[mode] or 0), (
                f"{mode}: right after lt.quantize(weights=...) the weights take {quantized_bytes} bytes, only "
                f"{ratio:.2f}x less than fp16 (expected >= {AT_LEAST[mode]}x): {found}")
            assert same, f"{mode}: quantized from weights differs from quantizing the built model: {found}"
    return found


def _train_one_step(model: torch.nn.Module, x: torch.Tensor) -> bool:
    """int8-training: one SGD step through ``lt.train_step`` changes the (trainable) weights."""
    before = [p.detach().clone() for p in model.parameters()]
    state = lt.State(model=model, optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                                            lr=0.1))
    lt.train_step(lambda m, b: m(b).float().square().mean())(state, x)
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed, "an int8-training step left every weight as it was"
    return changed


def check_qlora(device: torch.device, size: Size) -> dict[str, Any]:
    """QLoRA: ``lt.quantize("nf4")`` + ``lt.add_adapters`` trained with bf16-mixed: only the adapters
    train, the 4-bit base stays bitwise, the loss falls; the adapters alone save and reload."""
    require("bitsandbytes", BNB_PIP)
    width = size.quant_width
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(size.rows, width, generator=gen)
    low_rank = torch.randn(width, 4, generator=gen) / width**0.5 @ torch.randn(4, 64, generator=gen)
    batch = (x.to(device), (x @ low_rank).to(device))  # a target rank-8 adapters can learn
    with accelerator(device):
        model = lt.pipe(quant_model(width).to(device), lt.quantize("nf4", compute_dtype=torch.bfloat16),
                        lt.add_adapters(rank=8))
        base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".adapter." in n for n in trainable), trainable
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        step = lt.pipe(lt.train_step(mse), lt.with_precision("bf16-mixed"))
        state, losses, seconds = lt.State(model=model, optimizer=optimizer), [], []
        for _ in range(size.qlora_steps):
            (state, metrics), spent = timed(device, functools.partial(step, state, batch))
            losses.append(float(metrics["loss"]))
            seconds.append(spent)
        assert losses[-1] < 0.5 * losses[0], f"the QLoRA loss did not halve: {losses[0]:.4f} -> {losses[-1]:.4f}"
        # (bitsandbytes casts a 4-bit layer's bias to the input's dtype in its forward: rounding, not training)
        changed = [n for n, p in model.named_parameters()
                   if n in base and not torch.equal(p, base[n].to(p.dtype))]
        assert not changed, f"the frozen 4-bit base changed while training the adapters: {changed}"
        with tempfile.TemporaryDirectory(prefix="ltransform-gpucheck-") as tmp:
            path = lt.save(Path(tmp) / "adapters.pt", state, filter=lambda name, t: ".adapter." in name)
            other = lt.pipe(quant_model(width).to(device), lt.quantize("nf4", compute_dtype=torch.bfloat16),
                            lt.add_adapters(rank=8))
            lt.load(path, lt.State(model=other), strict=False)
        with torch.no_grad():
            same = torch.equal(other(batch[0]), model(batch[0]))
        assert same, "the reloaded adapters give another output"
    return {"losses": [round(v, 5) for v in losses], "trainable_parameters": sum(
        p.numel() for p in model.parameters() if p.requires_grad), "ms_per_step": median_ms(seconds[2:])}


def check_torchao_float8(device: torch.device, size: Size, *, emulate: bool = False) -> dict[str, Any]:
    """``with_precision("torchao-float8")`` against torchao's own hand-written loop
    (``convert_to_float8_training`` + bf16 autocast) and against bf16-mixed (loss within 5%).
    Needs a GPU of compute capability 8.9+; ``emulate=True`` lets it run on the CPU (torch emulates fp8)."""
    if device.type != "cuda" and not emulate:
        raise Skip("fp8 training needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper); torchao's CPU "
                   "emulation is covered by tests/test_fp8.py")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise Skip(f"fp8 needs compute capability 8.9+, this GPU ({torch.cuda.get_device_name(device)}) has "
                   f"{torch.cuda.get_device_capability(device)}")
    float8 = require("torchao.float8", TORCHAO_PIP)
    data = batches(device, size)
    reference = mlp(size.width).to(device)
    float8.convert_to_float8_training(reference)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    for batch in data:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = mse(reference, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with accelerator(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp8_losses, fp8_model, fp8_ms = _train(device, data, "torchao-float8", size)
        bf16_losses, _, bf16_ms = _train(device, data, "bf16-mixed", size)
    kinds = sorted({type(m).__name__ for m in fp8_model.modules() if "Linear" in type(m).__name__})
    assert kinds == ["Float8Linear"], f"the linear layers are {kinds}"
    result = assert_close(list(fp8_model.parameters()), list(reference.parameters()), atol=1e-5, rtol=1e-4,
                          what="torchao-float8 vs torchao's hand-written loop")
    gap = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(fp8_losses, bf16_losses))
    assert gap < 0.05, f"fp8 losses {fp8_losses} differ from bf16-mixed's {bf16_losses} by {gap:.3%}"
    return {**result, "max_relative_loss_gap_to_bf16": round(gap, 6), "fp8_losses": fp8_losses,
            "bf16_losses": bf16_losses, "fp8_ms_per_step": fp8_ms, "bf16_ms_per_step": bf16_ms,
            "emulated": device.type != "cuda"}


def _train(device: torch.device, data: list[Any], precision: str, size: Size) -> tuple[list[float], Any, float]:
    model = mlp(size.width).to(device)
    step = lt.pipe(lt.train_step(mse), lt.with_precision(precision))
    state = lt.State(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    losses, seconds = [], []
    for batch in data:
        (state, metrics), spent = timed(device, functools.partial(step, state, batch))
        losses.append(float(metrics["loss"]))
        seconds.append(spent)
    return [round(v, 6) for v in losses], state.model, median_ms(seconds[1:])
