"""Precision checks: ``with_precision`` against hand-written autocast / GradScaler loops."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.nn.utils import clip_grad_norm_

import ltransform as lt
from ltransform.gpucheck.common import (Size, accelerator, assert_close, batches, clone_params, median_ms, mlp, mse,
                                        run_lt, sgd, sync, timed)


def autocast_loop(model: torch.nn.Module, data: list[Any], device: torch.device) -> list[float]:
    """bf16-mixed by hand: the forward and the loss under autocast, SGD with momentum; step seconds."""
    optimizer, seconds = sgd(model), []
    for batch in data:
        def one(batch: Any = batch) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = mse(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds.append(timed(device, one)[1])
    return seconds


def _lt_steps(step: Any, state: Any, data: list[Any], device: torch.device) -> tuple[Any, list[dict], list[float]]:
    """Call ``step`` batch by batch (the way a user's loop would), keeping metrics and times."""
    metrics, seconds = [], []
    for batch in data:
        (state, m), spent = timed(device, functools.partial(step, state, batch))
        metrics.append(m)
        seconds.append(spent)
    return state, metrics, seconds


def check_bf16_mixed(device: torch.device, size: Size) -> dict[str, Any]:
    """lt's bf16-mixed (``lt.run``) against a hand-written autocast loop: same parameters."""
    data = batches(device, size)
    reference = mlp(size.width).to(device)
    ref_seconds = autocast_loop(reference, data, device)
    model = mlp(size.width).to(device)
    seen: list[torch.dtype] = []

    def loss_fn(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        seen.append(m(batch[0]).dtype)
        return mse(m, batch)

    with accelerator(device):
        run_lt(lt.with_precision(lt.train_step(mse), "bf16-mixed"), lt.State(model=model, optimizer=sgd(model)), data)
        probe = mlp(size.width).to(device)
        lt.with_precision(lt.train_step(loss_fn), "bf16-mixed")(lt.State(model=probe, optimizer=sgd(probe)), data[0])
        assert seen == [torch.bfloat16], f"the forward ran in {seen}, not bfloat16"
        assert {p.dtype for p in model.parameters()} == {torch.float32}, "bf16-mixed must keep float32 weights"
        assert next(model.parameters()).device == device, next(model.parameters()).device
        lt_model = mlp(size.width).to(device)  # timed separately: the same steps, called directly
        step = lt.with_precision(lt.train_step(mse), "bf16-mixed")
        _, _, lt_seconds = _lt_steps(step, lt.State(model=lt_model, optimizer=sgd(lt_model)), data, device)
    result = assert_close(list(model.parameters()), list(reference.parameters()), atol=1e-5, rtol=1e-4,
                          what="bf16-mixed vs hand-written autocast loop")
    return {**result, "steps": len(data), "reference_ms_per_step": median_ms(ref_seconds[1:]),
            "lt_ms_per_step": median_ms(lt_seconds[1:])}


POISON = 1  # the batch whose loss is multiplied by inf: its update must be skipped


def _scaler_loop(model: torch.nn.Module, data: list[Any], device: torch.device) -> dict[str, Any]:
    """16-mixed by hand: autocast to float16, torch's GradScaler, clipping on unscaled gradients."""
    optimizer = sgd(model)
    scaler = torch.amp.GradScaler(device.type)
    norms, scales = [], []
    for i, batch in enumerate(data):
        with torch.autocast(device.type, dtype=torch.float16):
            loss = mse(model, batch) * (float("inf") if i == POISON else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norms.append(float(clip_grad_norm_(model.parameters(), 1.0)))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scales.append(scaler.get_scale())
    return {"grad_norms": norms, "scales": scales}


def check_16_mixed(device: torch.device, size: Size) -> dict[str, Any]:
    """lt's 16-mixed with the grad scaler (and a step whose loss is inf, which must be skipped)
    against a hand-written GradScaler loop."""
    data = batches(device, size, n=max(size.steps, 3))
    reference = mlp(size.width).to(device)
    ref = _scaler_loop(reference, data, device)
    calls: list[int] = []

    def loss_fn(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        calls.append(1)
        return mse(m, batch) * (float("inf") if len(calls) - 1 == POISON else 1.0)

    model = mlp(size.width).to(device)
    with accelerator(device):
        step = lt.pipe(lt.train_step(loss_fn), lt.with_precision("16-mixed"), lt.clip_gradients(max_norm=1.0))
        state = lt.State(model=model, optimizer=sgd(model))
        norms, scales, before, after_poison = [], [], None, None
        for i, batch in enumerate(data):
            if i == POISON:
                before = clone_params(model)
            state, metrics = step(state, batch)
            sync(device)
            if i == POISON:
                after_poison = clone_params(model)
            norms.append(float(metrics["grad_norm"]))
            scales.append(state.extra["grad_scaler"].get_scale())
    assert before is not None and after_poison is not None
    assert all(torch.equal(a, b) for a, b in zip(before, after_poison)), "the inf step changed the parameters"
    assert scales[POISON] == scales[POISON - 1] / 2, f"the scale did not halve on the inf step: {scales}"
    assert scales == ref["scales"], f"scales {scales} differ from the hand-written loop's {ref['scales']}"
    halved = sum(1 for a, b in zip([2.0**16, *scales], scales) if b < a)  # GradScaler starts at 2**16
    assert state.step == len(data) - halved, f"{state.step} updates counted, {halved} steps skipped"
    finite = [(a, b) for a, b in zip(norms, ref["grad_norms"]) if a == a and b == b and abs(b) != float("inf")]
    assert all(abs(a - b) <= 1e-3 * max(abs(b), 1e-6) for a, b in finite), (norms, ref["grad_norms"])
    result = assert_close(list(model.parameters()), list(reference.parameters()), atol=1e-5, rtol=1e-4,
                          what="16-mixed vs hand-written GradScaler loop")
    return {**result, "scales": scales, "skipped_steps": len(data) - state.step, "grad_norms": norms,
            "scaler_device": device.type}


def check_bf16_true(device: torch.device, size: Size) -> dict[str, Any]:
    """lt's bf16-true (bf16 weights, inputs cast) against a hand-written bf16 loop."""
    data = batches(device, size)
    reference = mlp(size.width).to(device=device, dtype=torch.bfloat16)
    optimizer = sgd(reference)
    for x, y in data:
        loss = mse(reference, (x.to(torch.bfloat16), y.to(torch.bfloat16)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model = mlp(size.width).to(device)
    with accelerator(device):
        state = run_lt(lt.with_precision(lt.train_step(mse), "bf16-true"),
                       lt.State(model=model, optimizer=sgd(model)), data)
    dtypes = {p.dtype for p in state.model.parameters()}
    assert dtypes == {torch.bfloat16}, f"bf16-true left parameters in {dtypes}"
    result = assert_close(list(state.model.parameters()), list(reference.parameters()), atol=1e-2, rtol=1e-2,
                          what="bf16-true vs hand-written bf16 loop")
    return {**result, "steps": len(data)}
