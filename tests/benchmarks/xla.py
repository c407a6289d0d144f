"""Steps/s of the GPT demo model under ``distribute("xla")`` against a hand-written SPMD loop.

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 python tests/benchmarks/xla.py [--blocks 8] [--block 10]

(in the torch_xla venv that ``scripts/test-xla.sh`` builds). Both train the same model on the
same mesh with the same graph cut (``torch_xla.sync()`` after the optimizer update), in
alternating blocks of steps so that drift on a noisy machine hits both alike; the figure is the
median of the per-block ratios of time per step (target: ltransform's steps/s >= 0.98x the
hand-written loop's). Then, with ``accumulate(4)``: one graph per accumulation window (
``lt.Strategy(name="xla", graph_per_update=True)``) against a cut after every micro-step (the default).
Each case reports how many XLA programs were compiled in warm-up and after it (must be 0:
no recompilation per step), from ``torch_xla.debug.metrics``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ltransform as lt
from ltransform.examples.gpt import GPT, GPTConfig, loss_fn


def batches(cfg: GPTConfig, n: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        idx = torch.randint(0, cfg.vocab, (size, cfg.block + 1), generator=g)
        out.append((idx[:, :-1].contiguous(), idx[:, 1:].contiguous()))
    return out


def compiles() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


class HandWritten:
    """The loop a torch_xla user writes: model on the device, batch split over a ("data",) mesh
    on its way there, one graph cut per optimizer update (or per micro-step)."""

    def __init__(self, cfg: GPTConfig, every: int, cut_every_micro_step: bool) -> None:
        import numpy as np
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        self.torch_xla, self.xm = torch_xla, xm
        self.device = torch_xla.device()
        torch.manual_seed(0)
        self.model = GPT(cfg).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        count = xr.global_runtime_device_count()
        mesh = xs.Mesh(np.arange(count), (count,), ("data",))
        self.spec = xs.ShardingSpec(mesh, (("data",), None))
        self.every, self.cut_all, self.micro = every, cut_every_micro_step, 0

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = self.xm.send_cpu_data_to_device(list(batch), self.device, input_sharding=self.spec)
        loss = loss_fn(self.model, (x, y)) / self.every
        loss.backward()
        self.micro += 1
        if self.micro % self.every == 0:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.torch_xla.sync()
        elif self.cut_all:
            self.torch_xla.sync()


class Ltransform:
    def __init__(self, cfg: GPTConfig, every: int, cut_every_micro_step: bool) -> None:
        torch.manual_seed(0)
        model = GPT(cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.state = lt.State(model=model, optimizer=optimizer)
        strategy = lt.Strategy(name="xla", graph_per_update=not cut_every_micro_step)
        transforms = [lt.accumulate(every)] if every > 1 else []
        self.train = lt.pipe(lt.train_step(loss_fn), *transforms, lt.distribute(strategy))
        self.every = every

    def run(self, data: list) -> None:
        before = self.state.step
        self.state = lt.run(self.train, self.state, data, max_steps=before + len(data) // self.every,
                            progress=False, log_every=10**9, preemption=None)
        assert self.state.step == before + len(data) // self.every, (before, self.state.step)


def wait() -> None:
    import torch_xla

    torch_xla.sync(wait=True)


def timed_blocks(cases: dict, data: list, blocks: int) -> dict[str, list[float]]:
    """Seconds per step of each case, block by block, the cases alternating."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(blocks):
        for name, case in cases.items():
            wait()
            started = time.perf_counter()
            if isinstance(case, Ltransform):
                case.run(data)
            else:
                for batch in data:
                    case.step(batch)
            wait()
            times[name].append((time.perf_counter() - started) / len(data))
    return times


def compare(cfg: GPTConfig, size: int, every: int, blocks: int, block: int, cases: dict) -> None:
    data = batches(cfg, block * every, size)
    warm = compiles()
    for case in cases.values():  # warm-up: every program compiled once
        if isinstance(case, Ltransform):
            case.run(data[: 2 * every])
        else:
            for batch in data[: 2 * every]:
                case.step(batch)
    wait()
    after_warm = compiles()
    times = timed_blocks(cases, data, blocks)
    names = list(cases)
    print(f"  compiled in warm-up: {after_warm - warm} programs; after warm-up: {compiles() - after_warm}")
    for name in names:
        print(f"  {name:44s} {1 / statistics.median(times[name]):8.2f} steps/s (micro-steps)")
    base = names[0]
    for name in names[1:]:
        ratios = [b / t for b, t in zip(times[base], times[name])]
        print(f"  {name} vs {base}: steps/s ratio {statistics.median(ratios):.3f} "
              f"(median of {blocks} blocks; min {min(ratios):.3f}, max {max(ratios):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--block", type=int, default=10, help="optimizer steps per block")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--n-layer", type=int, default=3)
    parser.add_argument("--n-embd", type=int, default=128)
    args = parser.parse_args()
    lt.device()  # XLA's runtime (and SPMD) first
    cfg = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd)
    n = sum(p.numel() for p in GPT(cfg).parameters())
    print(f"GPT demo model {n / 1e6:.2f}M parameters, batch {args.batch} x {cfg.block}, "
          f"{lt.world_size()} XLA devices (torch_xla SPMD)")
    print("1. distribute('xla') against the hand-written SPMD loop, one cut per step:")
    compare(cfg, args.batch, 1, args.blocks, args.block,
            {"hand-written SPMD loop": HandWritten(cfg, 1, False),
             "lt.run + distribute('xla')": Ltransform(cfg, 1, False)})
    print("2. accumulate(4): a cut per micro-step (default) against one graph per window:")
    compare(cfg, args.batch, 4, args.blocks, args.block,
            {"cut every micro-step (default)": Ltransform(cfg, 4, True),
             "one cut per window (graph_per_update=True)": Ltransform(cfg, 4, False),
             "hand-written, one cut per window": HandWritten(cfg, 4, False),
             "hand-written, cut every micro-step": HandWritten(cfg, 4, True)})


if __name__ == "__main__":
    main()
