"""FSDP2, meta init + materialize, sharded async checkpoints and ``lt.launch``, against plain torch."""

from __future__ import annotations

import datetime
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import ltransform as lt
from ltransform.gpucheck.common import (Size, accelerator, assert_close, backend_for, batches, build_mlp, clone_params,
                                        compare, full, memory_allocated, mlp, mse, one_rank_group, run_lt, sgd, sync)
from ltransform.gpucheck.precision import autocast_loop


def _linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def check_fsdp(device: torch.device, size: Size) -> dict[str, Any]:
    """``lt.shard`` + ``lt.distribute("fsdp")`` with bf16-mixed in a one-rank group (nccl on a GPU)
    against ``fully_shard`` with the same ``MixedPrecisionPolicy`` and a hand-written autocast loop."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    data = batches(device, size)
    with accelerator(device), one_rank_group(device) as backend:
        reference = mlp(size.width).to(device)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for module in (*_linears(reference), reference):
            fully_shard(module, mp_policy=policy)
        ref_seconds = autocast_loop(reference, data, device)
        model = lt.pipe(mlp(size.width), lt.shard(policy={torch.nn.Linear}, precision="bf16-mixed"))
        assert all(hasattr(p, "device_mesh") for p in model.parameters()), "lt.shard did not shard (no DTensors)"
        mesh = next(iter(model.parameters())).device_mesh
        assert mesh.device_type == device.type, f"the mesh is on {mesh.device_type}, not {device.type}"
        step = lt.pipe(lt.train_step(mse), lt.with_precision("bf16-mixed"), lt.distribute("fsdp"))
        start = time.perf_counter()
        run_lt(step, lt.State(model=model, optimizer=sgd(model)), data)
        lt_seconds = time.perf_counter() - start
        assert {p.dtype for p in model.parameters()} == {torch.float32}, "sharded master weights must stay fp32"
        result = assert_close(list(model.parameters()), list(reference.parameters()), atol=1e-5, rtol=1e-4,
                              what="lt.shard + distribute('fsdp') vs fully_shard + autocast loop")
    return {**result, "backend": backend, "mesh_device": mesh.device_type, "steps": len(data),
            "reference_s": round(sum(ref_seconds), 4), "lt_s_including_prepare": round(lt_seconds, 4)}


def _trained_state(device: torch.device, size: Size, *, sharded: bool, seed: int = 0) -> Any:
    model = mlp(size.width, seed=seed).to(device)
    if sharded:
        model = lt.shard(model, policy={torch.nn.Linear})
    state = lt.State(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    return run_lt(lt.train_step(mse), state, batches(device, size, n=2, seed=seed + 1))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [full(v).clone() for s in optimizer.state.values() for k, v in sorted(s.items())
            if isinstance(v, torch.Tensor)]


def _async_round_trip(device: torch.device, size: Size, *, sharded: bool) -> dict[str, Any]:
    """Train, save sharded + async, train on (which waits for the save), load into another state:
    the loaded parameters and optimizer moments equal the ones saved, bit for bit. Timed: how long
    the save call blocked (``save_call_s``) against the save written and the next step taken
    (``save_done_with_next_step_s``)."""
    state = _trained_state(device, size, sharded=sharded)
    saved_params, saved_moments = clone_params(state.model), _optimizer_tensors(state.optimizer)
    batch = batches(device, size, n=1, seed=7)[0]
    with tempfile.TemporaryDirectory(prefix="ltransform-gpucheck-") as tmp:
        sync(device)
        start = time.perf_counter()
        path = lt.save(Path(tmp) / "async", state, sharded=True, async_save=True)
        sync(device)
        save_s = time.perf_counter() - start  # what the save call blocked the training for
        moved, _ = lt.train_step(mse)(state, batch)  # waits for the save before its optimizer step
        sync(device)
        done_s = time.perf_counter() - start  # the save written and one more step taken
        assert not (Path(tmp) / ".async.partial").exists() and path.is_dir(), "the async save was not published"
        assert not compare(clone_params(moved.model), saved_params)["bitwise"], "the step after the save did not train"
        other = _trained_state(device, size, sharded=sharded, seed=5)  # other weights, optimizer state to load into
        assert not compare(clone_params(other.model), saved_params)["bitwise"]
        loaded = lt.load(path, lt.State(model=other.model, optimizer=other.optimizer))
        params = compare(clone_params(loaded.model), saved_params)
        moments = compare(_optimizer_tensors(loaded.optimizer), saved_moments)
        files = sum(1 for f in path.rglob("*") if f.is_file())
    assert params["bitwise"], f"loaded parameters differ from the saved ones: {params}"
    assert moments["bitwise"], f"loaded optimizer moments differ from the saved ones: {moments}"
    on = {t.device.type for t in clone_params(loaded.model)}
    assert on == {device.type}, f"loaded parameters are on {on}"
    return {"save_call_s": round(save_s, 4), "save_done_with_next_step_s": round(done_s, 4),
            "next_step_with_wait_s": round(done_s - save_s, 4), "files": files,
            "tensors": len(saved_params) + len(saved_moments),
            "saved_bytes": sum(t.numel() * t.element_size() for t in [*saved_params, *saved_moments])}


def check_checkpoint_async(device: torch.device, size: Size) -> dict[str, Any]:
    """``lt.save(sharded=True, async_save=True)`` of a state on the device (no group), reloaded bitwise."""
    with accelerator(device):
        return _async_round_trip(device, size, sharded=False)


def check_fsdp_checkpoint(device: torch.device, size: Size) -> dict[str, Any]:
    """The same async round trip for an FSDP2-sharded model and its optimizer in a one-rank group."""
    with accelerator(device), one_rank_group(device) as backend:
        return {**_async_round_trip(device, size, sharded=True), "backend": backend}


def check_materialize(device: torch.device, size: Size) -> dict[str, Any]:
    """``lt.init_module(empty=True)`` then ``lt.materialize`` on the device equals building there with
    the same seed, bit for bit; meta init -> ``lt.shard`` -> ``lt.materialize`` gives finite shards."""
    with accelerator(device):
        torch.manual_seed(0)
        with torch.device(device):
            reference = build_mlp(size.width)
        empty = lt.init_module(build_mlp, size.width, empty=True)
        assert all(p.is_meta for p in empty.parameters()), "init_module(empty=True) did not build on meta"
        before = memory_allocated(device)
        torch.manual_seed(0)
        model = lt.materialize(empty, device=device)
        grew = memory_allocated(device)
        result = compare(list(model.parameters()), list(reference.parameters()))
        assert {p.device for p in model.parameters()} == {device}, {p.device for p in model.parameters()}
        assert result["bitwise"], f"materialize differs from building on {device}: {result}"
        with one_rank_group(device) as backend:
            sharded = lt.pipe(lt.init_module(build_mlp, size.width, empty=True), lt.shard(policy={torch.nn.Linear}))
            lt.materialize(sharded)
            assert all(hasattr(p, "device_mesh") and p.device.type == device.type for p in sharded.parameters())
            spreads = [(full(a).float().std().item(), full(b).float().std().item())
                       for a, b in zip(sharded.parameters(), reference.parameters()) if a.dim() == 2]
            assert all(abs(a - b) <= 0.25 * b for a, b in spreads), f"materialized weights' std vs built: {spreads}"
            step = lt.pipe(lt.train_step(mse), lt.distribute("fsdp"))
            state = run_lt(step, lt.State(model=sharded, optimizer=sgd(sharded)), batches(device, size, n=1))
            assert all(torch.isfinite(full(p)).all() for p in state.model.parameters())
    return {**result, "allocated_bytes": None if before is None or grew is None else grew - before,
            "parameter_bytes": sum(p.numel() * p.element_size() for p in reference.parameters()),
            "sharded_backend": backend}


def launched(device_type: str, width: int, rows: int, steps: int, out: str) -> dict[str, Any]:
    """What the ``lt.launch`` check runs in the launched rank: join the group (nccl on a GPU),
    train the MLP with ``lt.shard`` + ``distribute("fsdp")``, save its weights to ``out``."""
    import torch.distributed as dist

    device = lt.device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), device_id=device if device.type == "cuda" else None,
                            timeout=datetime.timedelta(seconds=120))
    try:
        size = Size("launched", width=width, rows=rows, steps=steps, quant_width=width, qlora_steps=0)
        model = lt.shard(mlp(width), policy={torch.nn.Linear})
        step = lt.pipe(lt.train_step(mse), lt.distribute("fsdp"))
        state = run_lt(step, lt.State(model=model, optimizer=sgd(model)), batches(device, size))
        total = lt.all_reduce(torch.ones(1, device=device) * (lt.rank() + 1), "sum").item()
        weights = [full(p).cpu() for p in state.model.parameters()]
        torch.save(weights, out)
        return {"backend": str(dist.get_backend()), "world_size": lt.world_size(), "device": str(device),
                "all_reduce_sum": total, "rank": lt.rank()}
    finally:
        dist.destroy_process_group()


def check_launch(device: torch.device, size: Size) -> dict[str, Any]:
    """``lt.launch(devices=1)``: a spawned rank joins an nccl (GPU) or gloo group and trains with FSDP2;
    its weights equal one plain process training the same steps."""
    data = batches(device, size)
    reference = mlp(size.width).to(device)
    with accelerator(device), tempfile.TemporaryDirectory(prefix="ltransform-gpucheck-") as tmp:
        run_lt(lt.train_step(mse), lt.State(model=reference, optimizer=sgd(reference)), data)
        out = str(Path(tmp) / "weights.pt")
        start = time.perf_counter()
        info = lt.launch(launched, device.type, size.width, size.rows, size.steps, out, devices=1,
                         accelerator=device.type, timeout=120)
        seconds = time.perf_counter() - start
        weights = torch.load(out, weights_only=True)
    assert info["world_size"] == 1 and info["all_reduce_sum"] == 1.0, info
    expected = "nccl" if device.type == "cuda" else "gloo"
    assert expected in info["backend"], f"the launched rank's backend is {info['backend']}, expected {expected}"
    result = assert_close([w.to(device) for w in weights], list(reference.parameters()), atol=1e-5, rtol=1e-4,
                          what="lt.launch rank vs one plain process")
    return {**result, **info, "launch_s": round(seconds, 3)}
