"""Distributed benchmarks on 2 gloo processes (CPU) or GPUs (nccl): throughput and memory.

    python tests/benchmarks/ddp.py [--blocks 30] [--block 20] [--width 512] [--devices 2]
    python tests/benchmarks/ddp.py --memory [--devices 4] [--params-m 100]

Throughput: each rank trains the same MLP twice, with a raw loop over torch's
``DistributedDataParallel`` and with ``lt.run(lt.distribute(lt.train_step(...), "ddp"))``, in
alternating blocks so drift hits both alike; the figure is the median ratio of steps/s
(target >= 0.98); a raw-vs-raw control line shows the noise floor. The same for FSDP: raw
``fully_shard`` loop vs ``lt.shard`` + ``lt.distribute``.

Memory: a model of ``--params-m`` million float32 parameters built three ways on each rank:
in full (plain ``nn.Module``), sharded after a full build, and on the meta device then sharded
and materialized (``lt.init_module(empty=True)`` → ``lt.shard`` → ``lt.materialize``). Reports the
peak RSS growth of each rank (each way in a fresh process) against the full fp32 size.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

import ltransform as lt
from ltransform.distributed.env import ensure_process_group
from overhead import loss_fn, mlp  # the same model and loss as the single-process benchmark


def _data(block: int, width: int, batch: int, device):
    gen = torch.Generator().manual_seed(lt.rank())
    return [(torch.randn(batch, width, generator=gen).to(device), torch.randn(batch, 1, generator=gen).to(device))
            for _ in range(block)]


def _raw_loop(model, optimizer, data):
    for batch in data:
        loss_fn(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def throughput(args) -> dict[str, float]:
    """Median ratio (ours / raw) of steps per second, DDP and FSDP, on this rank."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    ensure_process_group()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // lt.world_size()))
    device = lt.device()
    data = _data(args.block, args.width, args.batch, device)
    results = {}
    for name in ("control", "ddp", "fsdp"):
        raw_model = mlp(args.width, depth=4).to(device)
        if name in ("ddp", "control"):
            raw = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            for layer in raw_model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            raw = fully_shard(raw_model)
        raw_opt = torch.optim.SGD(raw.parameters(), lr=1e-3)
        ours = mlp(args.width, depth=4).to(device)
        if name == "fsdp":
            ours = lt.shard(ours, policy={torch.nn.Linear})
        elif name == "control":  # raw against raw: the noise floor of this measurement
            ours = DistributedDataParallel(ours, device_ids=[device.index] if device.type == "cuda" else None)
            control_opt = torch.optim.SGD(ours.parameters(), lr=1e-3)
        state = lt.State(model=ours, optimizer=torch.optim.SGD(ours.parameters(), lr=1e-3))
        step = lt.distribute(lt.train_step(loss_fn), name if name != "control" else "ddp")
        ratios = []
        raw_times = []
        for i in range(args.blocks + 2):
            times = {}
            for who in (("raw", "lt") if i % 2 else ("lt", "raw")):  # alternate which goes first
                lt.barrier()  # both ranks start each timed block together
                t0 = time.perf_counter()
                if who == "raw":
                    _raw_loop(raw, raw_opt, data)
                elif name == "control":
                    _raw_loop(ours, control_opt, data)
                else:
                    state = lt.run(step, state, data, max_epochs=state.epoch + 1, progress=False, log_every=None)
                _sync(device)
                times[who] = time.perf_counter() - t0
            if i >= 2:  # warm-up blocks
                ratios.append(times["raw"] / times["lt"])  # steps/s ours over raw
                raw_times.append(times["raw"])
        results[name] = statistics.median(ratios)
        results[f"{name}_raw_ms"] = 1e3 * statistics.median(raw_times) / args.block
    return results


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(way: str, params_m: int) -> dict[str, float]:
    """Peak RSS growth of one rank while building a model ``way``."""
    ensure_process_group()
    width = 2048
    layers = max(1, round(params_m * 1e6 / (width * width)))
    build = lambda: torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])  # noqa: E731
    lt.shard(torch.nn.Linear(8, 8))  # imports FSDP2/DTensor and sets up the mesh first: not the model's cost
    lt.barrier()
    before = _rss_mb()
    if way == "full":
        model = build()
    elif way == "shard-after-full-build":
        model = lt.shard(build(), policy={torch.nn.Linear})
    else:
        model = lt.materialize(lt.shard(lt.init_module(build, empty=True), policy={torch.nn.Linear}))
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters())
    full = sum(p.numel() * 4 for p in model.parameters())
    lt.barrier()
    return {"peak_growth_mb": _rss_mb() - before, "local_mb": local / 2**20, "full_mb": full / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--blocks", type=int, default=30)
    p.add_argument("--block", type=int, default=20, help="steps per timed block")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--memory", action="store_true", help="the memory benchmark instead")
    p.add_argument("--params-m", type=int, default=100, help="model size for --memory, millions of params")
    args = p.parse_args()
    if args.memory:
        print(f"{args.devices} ranks, a {args.params_m}M-parameter float32 model; peak RSS growth per rank:")
        for way in ("full", "shard-after-full-build", "meta-shard-materialize"):
            r = lt.launch(memory, way, args.params_m, devices=args.devices)
            print(f"  {way:24s} {r['peak_growth_mb']:7.0f} MB   (rank holds {r['local_mb']:.0f} MB of "
                  f"{r['full_mb']:.0f} MB; growth / full = {r['peak_growth_mb'] / r['full_mb']:.2f})")
        return
    r = lt.launch(throughput, args, devices=args.devices)
    print(f"{args.devices} ranks, MLP width {args.width}, batch {args.batch}/rank, "
          f"median of {args.blocks} alternating blocks of {args.block} steps")
    print(f"  control (raw DDP vs raw DDP, the noise floor): {r['control']:.3f}")
    for name in ("ddp", "fsdp"):
        print(f"  {name}: lt steps/s / raw steps/s = {r[name]:.3f}   (raw step {r[name + '_raw_ms']:.2f} ms)")


if __name__ == "__main__":
    main()
