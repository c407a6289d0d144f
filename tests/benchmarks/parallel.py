"""Tensor parallel (and TP x FSDP) steps/s against hand-written DTensor loops; QLoRA-FSDP memory per rank.

    python tests/benchmarks/parallel.py [--blocks 12] [--block 4] [--cases tp tp+sp "tp x fsdp"] [--json out.json]
    python tests/benchmarks/parallel.py --quick        # tiny sizes, about a minute: checks the code, not speed

Throughput (gloo, CPU, one thread per rank): the demo GPT (``ltransform.examples.gpt``) trains on random
tokens in three arms, from the same weights (seed 0), on the same batches, with AdamW:

- ``raw``: the mesh from ``init_device_mesh``, torch's ``parallelize_module`` with the plan written out by
  hand (``ColwiseParallel`` / ``RowwiseParallel``; for ``tp+sp`` also ``SequenceParallel`` and the
  input/output layouts around it), on a 2-D mesh ``fully_shard(block, mesh=mesh["dp"])`` for every block
  and the root with torch's defaults; a plain loop (forward, loss, backward, ``optimizer.step()``,
  ``zero_grad()``).
- ``lt``: ``lt.parallelize(model, lt.plans.gpt)`` (``mesh=2`` on 4 ranks, then ``lt.shard(model,
  policy={Block})``, which shards over that mesh's "dp" dimension), trained by
  ``lt.run(lt.pipe(lt.train_step(loss), lt.distribute("auto")), ...)``, one ``lt.run`` per block (its
  set-up counts).
- ``control``: a second ``raw`` copy: raw against raw, the noise floor.

Cases: ``tp`` and ``tp+sp`` on 2 ranks (1-D "tp" mesh, every rank the same batch), ``tp x fsdp`` on 4
ranks (2 x 2 ("dp", "tp") mesh; the two dp groups draw different batches). The arms run in rotating order,
``--block`` steps at a time; each block's time is the slowest rank's. The figure is the median over the
blocks of raw time / lt time, i.e. lt steps/s over raw steps/s (target >= 0.98), with its quartiles. The
lt and raw models must end with the same parameters, laid out alike (the same work was timed). ``--vocab``
sets the GPT's vocabulary (default the demo's 256 bytes); a large one makes the root FSDP unit (embeddings,
head) heavy, so what the root unit costs in ``tp x fsdp`` shows.

Memory: a GPT quantized to NF4 by torchao (``lt.quantize(model, "nf4", backend="torchao")``) with rank-8
adapters (``lt.add_adapters``), trained a few steps in one process, and sharded (``lt.shard(policy={Block})``)
on 2 ranks with the same per-rank batch; each built two ways: in float32, then quantized; and on the meta
device, quantized layer by layer from a saved state dict (``lt.quantize(..., weights=path)``). Fresh
processes for each. Per rank: the bytes of its parameters (local shards; an NF4 weight counted as its inner
tensors), VmRSS after set-up, the peak RSS (``VmHWM`` of ``/proc/self/status``) over the whole process,
the peak anonymous RSS (``RssAnon`` read every millisecond by a thread: VmHWM also counts the file pages of
the memory-mapped state dict the meta build reads), and the peak RSS while training (VmHWM reset through
``/proc/self/clear_refs`` after set-up; growth over the set-up RSS in brackets). The ranks run with
``MALLOC_MMAP_THRESHOLD_=65536`` (unless set already), so glibc hands freed blocks back at once and the RSS
follows the live tensors, not what malloc keeps for reuse (without it, a 100M-parameter trial's single
process grew by 480 MiB while training instead of 180 MiB: the dequantized 16 MiB weights, freed, were kept).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import statistics
import tempfile
import threading
import time

import torch

import ltransform as lt
from ltransform.distributed.env import ensure_process_group
from ltransform.examples.gpt import GPT, Block, GPTConfig
from ltransform.examples.gpt import loss_fn as gpt_loss

CASES = {"tp": (2, 2, False), "tp+sp": (2, 2, True), "tp x fsdp": (4, 2, False)}  # ranks, tp size, sequence parallel
ARMS = ("raw", "lt", "control")


def gpt(cfg: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(cfg)


def hand_plan(model: GPT, sequence: bool) -> dict:
    """What ``lt.plans.gpt`` gives, written with torch's styles."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                                   RowwiseParallel, SequenceParallel)

    plan: dict = {}
    for i in range(len(model.blocks)):
        b = f"blocks.{i}"
        if not sequence:
            plan |= {f"{b}.attn.qkv": ColwiseParallel(), f"{b}.attn.proj": RowwiseParallel(),
                     f"{b}.mlp.0": ColwiseParallel(), f"{b}.mlp.2": RowwiseParallel()}
            continue
        gather = dict(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)
        plan |= {
            b: PrepareModuleInputOutput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                        output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),),
                                        use_local_input=False, use_local_output=True),
            f"{b}.ln1": SequenceParallel(), f"{b}.ln2": SequenceParallel(),
            f"{b}.attn": PrepareModuleInput(**gather), f"{b}.mlp": PrepareModuleInput(**gather),
            f"{b}.attn.qkv": ColwiseParallel(), f"{b}.mlp.0": ColwiseParallel(),
            f"{b}.attn.proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            f"{b}.mlp.2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        }
    return plan


def _raw_model(cfg: GPTConfig, mesh, sequence: bool) -> GPT:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    model = gpt(cfg)
    parallelize_module(model, mesh["tp"] if mesh.ndim == 2 else mesh, hand_plan(model, sequence))
    if mesh.ndim == 2:
        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


def _lt_model(cfg: GPTConfig, tp: int, sequence: bool) -> GPT:
    """``lt.parallelize`` with the ready plan; on a 2-D mesh ``lt.shard``, which shards over its "dp" dimension."""
    plan = (lambda m: lt.plans.gpt(m, sequence=True)) if sequence else lt.plans.gpt
    if tp == lt.world_size():
        return lt.parallelize(gpt(cfg), plan)  # its own 1-D "tp" mesh over every rank
    return lt.pipe(gpt(cfg), lt.parallelize(plan=plan, mesh=tp), lt.shard(policy={Block}))


def _raw_loop(model, optimizer, data) -> None:
    for batch in data:
        loss = gpt_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _same_layout_difference(ours: GPT, raw: GPT) -> float:
    """The largest difference between the two models' parameters, on every rank's shards, after checking that
    they are laid out alike (the same mesh shape and placements): the two arms did the same work."""
    import torch.distributed as dist

    worst = 0.0
    for (name, p), q in zip(ours.named_parameters(), raw.parameters()):
        layout = [(tuple(t.device_mesh.shape), tuple(t.placements)) if hasattr(t, "placements") else None
                  for t in (p, q)]
        if layout[0] != layout[1]:
            raise RuntimeError(f"{name}: lt lays it out as {layout[0]}, the hand-written loop as {layout[1]}")
        local = [t.to_local() if hasattr(t, "to_local") else t for t in (p, q)]
        worst = max(worst, (local[0] - local[1]).abs().max().item())
    worst_everywhere = torch.tensor([worst], dtype=torch.float64)
    dist.all_reduce(worst_everywhere, op=dist.ReduceOp.MAX)
    return worst_everywhere.item()


def throughput(cases: list[str], cfg: GPTConfig, batch: int, block: int, blocks: int, warm: int) -> list[dict]:
    """On each rank, case after case (the same processes); rank 0's summaries."""
    ensure_process_group()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // lt.world_size()))
    return [_case(case, cfg, batch, block, blocks, warm) for case in cases]


def _case(case: str, cfg: GPTConfig, batch: int, block: int, blocks: int, warm: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    world, (_, tp, sequence) = lt.world_size(), CASES[case]
    shape, names = ((world,), ("tp",)) if tp == world else ((world // tp, tp), ("dp", "tp"))
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    dp_rank = mesh["dp"].get_local_rank() if mesh.ndim == 2 else 0
    gen = torch.Generator().manual_seed(1 + dp_rank)  # one batch per tp group, different across dp
    windows = [torch.randint(0, cfg.vocab, (batch, cfg.block + 1), generator=gen) for _ in range(block)]
    data = [(w[:, :-1], w[:, 1:]) for w in windows]

    raw, control, ours = _raw_model(cfg, mesh, sequence), _raw_model(cfg, mesh, sequence), _lt_model(cfg, tp, sequence)
    raw_opt, control_opt = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (raw, control))
    state = lt.State(model=ours, optimizer=torch.optim.AdamW(ours.parameters(), lr=1e-3))
    step = lt.pipe(lt.train_step(gpt_loss), lt.distribute("auto"))

    def run(arm: str) -> None:
        nonlocal state
        if arm == "lt":
            state = lt.run(step, state, data, max_epochs=state.epoch + 1, progress=False, log_every=None)
        else:
            _raw_loop(*((raw, raw_opt) if arm == "raw" else (control, control_opt)), data)

    times = _interleaved(run, blocks, warm)
    ratios = [t["raw"] / t["lt"] for t in times]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return dict(case=case, ranks=world, ratio=statistics.median(ratios), q1=quartiles[0], q3=quartiles[2],
                control=statistics.median(t["raw"] / t["control"] for t in times),
                raw_ms=1e3 * statistics.median(t["raw"] for t in times) / block,
                lt_ms=1e3 * statistics.median(t["lt"] for t in times) / block,
                steps=state.step, max_param_diff=_same_layout_difference(ours, raw))


def _interleaved(run, blocks: int, warm: int) -> list[dict[str, float]]:
    """Each arm's time per block, rotating which goes first; each the slowest rank's (they start together)."""
    import torch.distributed as dist

    times = []
    for i in range(warm + blocks):
        spent = {}
        for arm in ARMS[i % 3:] + ARMS[:i % 3]:
            lt.barrier()
            start = time.perf_counter()
            run(arm)
            spent[arm] = time.perf_counter() - start
        slowest = torch.tensor([spent[a] for a in ARMS], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if i >= warm:
            times.append(dict(zip(ARMS, slowest.tolist())))
    return times


def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _tensor_bytes(t: torch.Tensor) -> int:
    """Local bytes: a DTensor's shard; a wrapper subclass (torchao's NF4Tensor) as the sum of its inner tensors."""
    local = getattr(t, "to_local", None)
    t = local() if callable(local) else t
    flatten = getattr(t, "__tensor_flatten__", None)
    if callable(flatten) and type(t) not in (torch.Tensor, torch.nn.Parameter):
        return sum(_tensor_bytes(getattr(t, name)) for name in flatten()[0])
    return t.numel() * t.element_size()


class _AnonPeak:
    """The largest ``RssAnon`` (resident anonymous memory: not file pages, such as a memory-mapped state dict's)
    that a thread reading ``/proc/self/status`` every millisecond sees while the block runs."""

    def __init__(self) -> None:
        self.kb = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> _AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()

    def _poll(self) -> None:
        while True:
            self.kb = max(self.kb, _proc_kb("RssAnon"))
            if self._done.wait(0.001):
                return


def _qlora_model(cfg: GPTConfig, shard: bool, weights: str | None) -> GPT:
    """Built in float32 then quantized, or on meta and quantized layer by layer from ``weights``; adapters; sharded."""
    if weights is None:
        model = lt.quantize(gpt(cfg), "nf4", backend="torchao")
    else:
        model = lt.quantize(lt.init_module(GPT, cfg, empty=True), "nf4", backend="torchao", weights=weights)
    model = lt.add_adapters(model, rank=8)
    return lt.shard(model, policy={Block}) if shard else model


def qlora_memory(cfg: GPTConfig, batch: int, steps: int, shard: bool, weights: str | None) -> list[dict]:
    """On each rank: build the QLoRA model (NF4 by torchao, adapters, optionally sharded), train; every rank's
    figures."""
    import torch.distributed as dist

    ensure_process_group()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // lt.world_size()))
    gen = torch.Generator().manual_seed(1 + lt.rank())
    windows = [torch.randint(0, cfg.vocab, (batch, cfg.block + 1), generator=gen) for _ in range(steps)]
    with _AnonPeak() as anon:
        model = _qlora_model(cfg, shard, weights)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        state = lt.State(model=model, optimizer=optimizer)
        step = lt.pipe(lt.train_step(gpt_loss), lt.distribute("auto"))
        gc.collect()
        setup_rss, build_peak = _proc_kb("VmRSS"), _proc_kb("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        state = lt.run(step, state, [(w[:, :-1], w[:, 1:]) for w in windows], progress=False, log_every=None)
        train_peak = _proc_kb("VmHWM")
    mine = dict(rank=lt.rank(), param_mb=sum(_tensor_bytes(p) for p in model.parameters()) / 2**20,
                trainable_mb=sum(_tensor_bytes(p) for p in model.parameters() if p.requires_grad) / 2**20,
                setup_rss_mb=setup_rss / 1024, peak_mb=max(build_peak, train_peak) / 1024, anon_peak_mb=anon.kb / 1024,
                train_peak_mb=train_peak / 1024, train_growth_mb=(train_peak - setup_rss) / 1024, steps=state.step)
    if lt.world_size() == 1:
        return [mine]
    every: list = [None] * lt.world_size()
    dist.all_gather_object(every, mine)
    return every


def _throughput_table(args, cfg: GPTConfig) -> list[dict]:
    print(f"\n## Throughput: lt steps/s / raw steps/s (gloo, CPU; median of {args.blocks} rotating blocks of "
          f"{args.block} steps, slowest rank)\n")
    print(f"GPT n_layer={cfg.n_layer} n_embd={cfg.n_embd} n_head={cfg.n_head} block={cfg.block} vocab={cfg.vocab}, "
          f"batch {args.batch} per tp group, AdamW, 1 thread per rank on {os.cpu_count()} cores\n")
    print("| case | ranks | raw ms/step | lt ms/step | lt/raw (median) | quartiles | control raw/raw | "
          "max param diff |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for ranks in sorted({CASES[c][0] for c in args.cases}):  # one launch per number of ranks
        cases = [c for c in args.cases if CASES[c][0] == ranks]
        for r in lt.launch(throughput, cases, cfg, args.batch, args.block, args.blocks, args.warm, devices=ranks):
            results.append(r)
            print(f"| {r['case']} | {r['ranks']} | {r['raw_ms']:.1f} | {r['lt_ms']:.1f} | {r['ratio']:.3f} | "
                  f"{r['q1']:.3f}-{r['q3']:.3f} | {r['control']:.3f} | {r['max_param_diff']:.1e} |", flush=True)
    return results


def _memory_table(args, cfg: GPTConfig) -> dict:
    print(f"\n## QLoRA memory per rank (NF4 by torchao, rank-8 adapters; GPT n_layer={cfg.n_layer} "
          f"n_embd={cfg.n_embd} block={cfg.block}, batch {args.memory_batch} per rank, {args.memory_steps} steps)\n")
    if "backend" not in inspect.signature(lt.quantize).parameters:
        reason = "lt.quantize takes no backend= (the torchao backend is not in this checkout yet)"
        print(f"skipped: {reason}")
        return dict(skipped=reason)
    print("| run | build | rank | params MiB (local) | trainable MiB | RSS after set-up MiB | "
          "peak RSS (VmHWM) MiB | peak anon RSS (sampled) MiB | peak RSS while training MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    # glibc keeps freed blocks under its (growing) mmap threshold for reuse, and the RSS with them; a fixed
    # 64 KiB threshold in the ranks returns them at once, so the RSS follows the live tensors
    malloc = os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    with tempfile.TemporaryDirectory(prefix="lt-parallel-") as folder:
        weights = os.path.join(folder, "gpt.pt")
        torch.save(gpt(cfg).state_dict(), weights)
        for name, devices, shard in (("single process", 1, False), ("lt.shard, 2 ranks", 2, True)):
            for build, source in (("float32", None), ("meta + file", weights)):
                try:
                    rows = lt.launch(qlora_memory, cfg, args.memory_batch, args.memory_steps, shard, source,
                                     devices=devices)
                except lt.LaunchError as error:  # a rank failed: reported, as lowbit.py reports what it cannot run
                    rows = [dict(error=str(error).splitlines()[0][:300])]
                    print(f"| {name} | {build} | - | failed: {rows[0]['error']} | | | | | |")
                results[f"{name}, {build}"] = rows
                for r in rows if "error" not in rows[0] else ():
                    print(f"| {name} | {build} | {r['rank']} | {r['param_mb']:.1f} | {r['trainable_mb']:.2f} | "
                          f"{r['setup_rss_mb']:.0f} | {r['peak_mb']:.0f} | {r['anon_peak_mb']:.0f} | "
                          f"{r['train_peak_mb']:.0f} (+{r['train_growth_mb']:.0f}) |", flush=True)
    print(f"\n(MALLOC_MMAP_THRESHOLD_={malloc} in the ranks. Build: 'float32' builds the whole model, then quantizes; "
          f"'meta + file' builds it on the meta device and quantizes it layer by layer from a saved state dict, "
          f"lt.quantize(..., weights=path))")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few blocks: proves the script runs")
    p.add_argument("--blocks", type=int, default=None, help="timed blocks per case (default 12; --quick 2)")
    p.add_argument("--block", type=int, default=None, help="steps per block (default 4; --quick 2)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch, throughput (default 8)")
    p.add_argument("--vocab", type=int, default=256, help="the throughput GPT's vocabulary (the demo's: bytes)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--memory-batch", type=int, default=None, help="sequences per batch and rank (default 2)")
    p.add_argument("--memory-steps", type=int, default=None, help="training steps of the memory runs (default 3)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    quick = args.quick
    args.warm = 1 if quick else 2
    args.blocks = args.blocks or (2 if quick else 12)
    args.block = args.block or (2 if quick else 4)
    args.batch = args.batch or (4 if quick else 8)
    args.memory_batch = args.memory_batch or 2
    args.memory_steps = args.memory_steps or (2 if quick else 3)
    tp_cfg = (GPTConfig(vocab=args.vocab, block=32, n_layer=2, n_head=4, n_embd=64) if quick
              else GPTConfig(vocab=args.vocab, block=64, n_layer=4, n_head=4, n_embd=128))
    mem_cfg = (GPTConfig(vocab=256, block=32, n_layer=2, n_head=4, n_embd=256) if quick
               else GPTConfig(vocab=256, block=64, n_layer=4, n_head=16, n_embd=1024))
    print(f"torch {torch.__version__}; timings on a shared CPU are noisy: read the ratios and the control column")
    started = time.perf_counter()
    out = dict(throughput=_throughput_table(args, tp_cfg))
    print(f"\n(throughput: {time.perf_counter() - started:.0f} s)")
    if not args.skip_memory:
        out["memory"] = _memory_table(args, mem_cfg)
        print(f"(in all: {time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
