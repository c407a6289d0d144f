"""A small training script the reliability tests run in real processes, with faults injected.

    python faulty_train.py OUT [--devices N] [--max-restarts R] [--steps S] [--kill-at K] ...

With ``--devices N`` it launches itself on N ranks through ``lt.launch``; run by torchrun
(``ltransform run``) it trains on the ranks it is in. Each rank writes its pid, its progress
and, at the end, its parameters to OUT, so a test can signal or kill a rank and compare the
result with an uninterrupted run. Faults happen on the first attempt only
(``TORCHELASTIC_RESTART_COUNT`` is 0), so a restarted group trains cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ltransform as lt


def options(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=0, help="launch on N ranks with lt.launch (0: as started)")
    parser.add_argument("--max-restarts", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None, help="lt.launch(timeout=...)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ckpt-every", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step (time for a signal)")
    parser.add_argument("--kill-at", type=int, default=None, help="rank 1 SIGKILLs itself after this step")
    parser.add_argument("--hang-at", type=int, default=None, help="rank 1 sleeps forever after this step")
    parser.add_argument("--pause-at", type=int, default=None, help="rank 0 sleeps 3 s after this step")
    parser.add_argument("--stop-within", type=float, default=30.0, help="lt.Preemption(stop_within=...)")
    return parser.parse_args(argv)


def attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def train(out: str, args: argparse.Namespace) -> None:
    out_dir, rank = Path(out), lt.rank()
    (out_dir / f"pid-rank{rank}-attempt{attempt()}").write_text(str(os.getpid()))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = lt.State(model=model, optimizer=optimizer)
    gen = torch.Generator().manual_seed(1 + rank)
    data = [(torch.randn(4, 4, generator=gen), torch.randn(4, 1, generator=gen)) for _ in range(args.steps)]
    step = lt.train_step(lambda m, b: F.mse_loss(m(b[0]), b[1]))
    if lt.world_size() > 1:
        step = lt.distribute(step, "ddp")

    def faults(state):
        now = state.step
        (out_dir / f"progress-rank{rank}").write_text(str(now))
        if attempt() == 0 and rank == 1 and now == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if attempt() == 0 and rank == 1 and now == args.hang_at:
            time.sleep(3600)
        if attempt() == 0 and rank == 0 and now == args.pause_at:
            (out_dir / "paused").write_text(str(time.time()))
            time.sleep(3)
        time.sleep(args.sleep)

    preemption = lt.Preemption(stop_within=args.stop_within)
    try:
        state = lt.run(step, state, data, max_steps=args.steps, log_every=None, progress=False,
                       hooks=[lt.every(args.ckpt_every, lt.checkpoint_sharded(dir=out_dir / "ckpt")), faults],
                       resume="latest", preemption=preemption)
    except BaseException as error:  # when and why, for the test
        (out_dir / f"error-rank{rank}").write_text(f"{time.time()} {type(error).__name__}: {error}")
        raise
    torch.save([p.detach() for p in model.parameters()], out_dir / f"final-rank{rank}.pt")


if __name__ == "__main__":
    args = options(sys.argv[1:])
    if args.devices:
        kwargs = {} if args.timeout is None else {"timeout": args.timeout}
        lt.launch(train, args.out, args, devices=args.devices, max_restarts=args.max_restarts, **kwargs)
    else:
        train(args.out, args)
