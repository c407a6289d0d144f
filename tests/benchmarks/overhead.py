"""Per-step overhead of lt.run against a raw PyTorch loop doing the same training.

    python tests/benchmarks/overhead.py [--blocks 60] [--block 100]

Each case trains the same model twice, with a raw loop and through
``lt.run(lt.train_step(...))``, in alternating short blocks so drift on a noisy machine hits
both alike; the figure is the median of the per-block ratios of per-step time. Targets (the core v2 issue): <= 1.02x
with no transforms on the tiny MLP, <= 1.03x with precision + accumulate + clip; (issue 14) <= 1.02x
with a CSV logger, the progress bar and the throughput and learning-rate monitors at
``log_every=50``. Last, the set-up and teardown cost of an ``lt.run`` over no batches.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

import ltransform as lt

ACCUMULATE = 2
MAX_NORM = 1.0


def mlp(width: int, depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def raw_plain(model, optimizer, data):
    for batch in data:
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def raw_transformed(model, optimizer, data):
    """What bf16-mixed + accumulate + clip look like written by hand."""
    for i, batch in enumerate(data):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, batch)
        (loss / ACCUMULATE).backward()
        if (i + 1) % ACCUMULATE == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def lt_plain(progress: bool = False):
    step = lt.train_step(loss_fn)
    return lambda state, data: lt.run(step, state, data, max_epochs=state.epoch + 1, progress=progress)


def lt_monitored(csv: bool = True, log_every: int = 50, log_reduce: str = "last"):
    """A logger (CSV, or a list in memory), the progress bar (to /dev/null) and the throughput and
    lr monitors: one logger and one set of hooks for every block, as one long run has (the FLOPs
    are counted once)."""
    step = lt.train_step(loss_fn)
    kept: list[tuple[int, dict[str, float]]] = []
    logger = lt.CSVLogger(tempfile.mkdtemp(prefix="lt-overhead-")) if csv else lambda v, at: kept.append((at, v))
    hooks = [lt.throughput(), lt.lr_monitor()]
    devnull = open(os.devnull, "w")  # (open while the benchmark runs)

    def go(state, data):
        with contextlib.redirect_stderr(devnull):  # tqdm writes to sys.stderr as it is when the bar is made
            return lt.run(step, state, data, max_epochs=state.epoch + 1, log_every=log_every, loggers=[logger],
                          hooks=hooks, progress=True, log_reduce=log_reduce)

    return go


def lt_transformed():
    step = lt.pipe(lt.train_step(loss_fn), lt.with_precision("bf16-mixed"), lt.accumulate(ACCUMULATE),
                   lt.clip_gradients(max_norm=MAX_NORM))
    return lambda state, data: lt.run(step, state, data, max_epochs=state.epoch + 1, progress=False)


def _block_time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, raw, ours, width: int, batch: int, block: int, blocks: int) -> float:
    """Alternate blocks of ``block`` steps, raw and lt (which goes first alternates too).

    Both keep training their own copy of the same model across blocks; lt.run is called
    once per block, so its set-up (prepare, the loop's start) is counted in.
    """
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, width, generator=gen), torch.randn(batch, 1, generator=gen))
            for _ in range(block)]
    raw_model, our_model = mlp(width), mlp(width)
    raw_opt = torch.optim.SGD(raw_model.parameters(), lr=1e-4)
    state = lt.State(model=our_model, optimizer=torch.optim.SGD(our_model.parameters(), lr=1e-4))
    run_ours = ours()

    def ours_block():
        nonlocal state
        state = run_ours(state, data)

    def raw_block():
        raw(raw_model, raw_opt, data)

    raw_block(), ours_block()  # warm up kernels and the allocator
    raw_times, our_times = [], []
    for i in range(blocks):
        pair = (raw_block, ours_block) if i % 2 == 0 else (ours_block, raw_block)
        first, second = (_block_time(f) for f in pair)
        raw_t, our_t = (first, second) if i % 2 == 0 else (second, first)
        raw_times.append(raw_t / block)
        our_times.append(our_t / block)
    ratio = statistics.median(o / r for o, r in zip(our_times, raw_times))
    raw_us = statistics.median(raw_times) * 1e6
    extra_us = statistics.median(o - r for o, r in zip(our_times, raw_times)) * 1e6
    print(f"{name:<44} raw {raw_us:9.1f} us/step   ratio {ratio:.3f}   overhead {extra_us:+7.1f} us/step",
          flush=True)
    return ratio


def setup_cost(repeats: int = 300) -> None:
    """``lt.run`` over no batches: its set-up and teardown (bind, loop start, finish), median."""
    for name, make in (("no transforms", lambda: lt.train_step(loss_fn)),
                       ("bf16-mixed + accumulate + clip", lambda: lt.pipe(
                           lt.train_step(loss_fn), lt.with_precision("bf16-mixed"), lt.accumulate(ACCUMULATE),
                           lt.clip_gradients(max_norm=MAX_NORM)))):
        model = mlp(32)
        state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-4))
        step = make()
        times = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "data yielded no batches"
            for i in range(repeats + 20):
                start = time.perf_counter()
                lt.run(step, state, [], progress=False)
                if i >= 20:
                    times.append(time.perf_counter() - start)
        print(f"lt.run set-up + teardown, 0 batches, {name:<32} {statistics.median(times) * 1e6:7.1f} us", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=40, help="interleaved blocks per case")
    parser.add_argument("--block", type=int, default=200, help="steps per block (tiny MLP)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; median over {args.blocks} interleaved blocks")
    tiny = dict(width=32, batch=32, block=args.block, blocks=args.blocks)
    medium = dict(width=1024, batch=128, block=max(args.block // 20, 4), blocks=max(args.blocks // 4, 8))
    compare("tiny MLP, no transforms", raw_plain, lt_plain, **tiny)
    compare("tiny MLP, bf16-mixed + accumulate + clip", raw_transformed, lt_transformed, **tiny)
    compare("tiny MLP, no transforms, progress bar on", raw_plain, lambda: lt_plain(progress=True), **tiny)
    compare("tiny MLP, CSV logger + bar + throughput + lr monitors", raw_plain, lt_monitored, **tiny)
    compare("tiny MLP, list logger + bar + throughput + lr monitors", raw_plain,
            lambda: lt_monitored(csv=False), **tiny)
    compare("tiny MLP, list logger + bar + monitors, log_reduce='mean'", raw_plain,
            lambda: lt_monitored(csv=False, log_reduce="mean"), **tiny)
    compare("medium MLP, no transforms", raw_plain, lt_plain, **medium)
    compare("medium MLP, bf16-mixed + accumulate + clip", raw_transformed, lt_transformed, **medium)
    setup_cost()


if __name__ == "__main__":
    main()
