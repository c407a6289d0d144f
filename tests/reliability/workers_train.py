"""lt.run over a ``DataLoader(num_workers=2)`` with the default preemption watch, for test_workers.py.

    python workers_train.py OUT {step,worker,hook,signal} [--stop-within S] [--signals SIGTERM,SIGUSR1]

``step``, ``worker``, ``hook``: the step, the dataset's ``__getitem__`` (in a worker) or a hook
raises at batch 3; the script writes to OUT/raised when it raised and when lt.run let the error
out, then lets it end the process (code 1). ``signal``: a slow run (a step every ~20 ms) that
writes its progress and its workers' pids to OUT, for a test to signal; it checkpoints at its
stop on a preemption (exit 143) and writes OUT/finished if it ran to its end.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import ltransform as lt

RAISE_AT = 3  # the batch (1-based) that raises


class Samples(Dataset):
    def __init__(self, out: Path, size: int, fail: bool) -> None:
        self.out, self.size, self.fail = out, size, fail

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fail and index == 4 * (RAISE_AT - 1):  # the first sample of batch 3
            (self.out / "raised-at").write_text(str(time.time()))
            raise ValueError(f"corrupt sample {index}")
        gen = torch.Generator().manual_seed(index)
        return torch.randn(4, generator=gen), torch.randn(1, generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("mode", choices=["step", "worker", "hook", "signal"])
    parser.add_argument("--stop-within", type=float, default=30.0)
    parser.add_argument("--signals", default="SIGTERM", help="lt.Preemption(signals=...), comma-separated")
    args = parser.parse_args()
    out, mode = args.out, args.mode
    out.mkdir(parents=True, exist_ok=True)
    (out / "pid").write_text(str(os.getpid()))

    def started(worker: int) -> None:
        (out / f"worker-{worker}").write_text(str(os.getpid()))

    size = 1200 if mode == "signal" else 40
    loader = DataLoader(Samples(out, size, fail=mode == "worker"), batch_size=4, num_workers=2,
                        worker_init_fn=started)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
    batches = [0]

    def loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batches[0] += 1
        if mode == "step" and batches[0] == RAISE_AT:
            (out / "raised-at").write_text(str(time.time()))
            raise ValueError(f"step failed at batch {RAISE_AT}")
        return F.mse_loss(model(batch[0]), batch[1])

    def hook(state: lt.State) -> None:
        if mode == "hook" and state.step == RAISE_AT:
            (out / "raised-at").write_text(str(time.time()))
            raise ValueError(f"hook failed at step {RAISE_AT}")
        if mode == "signal":
            (out / "progress").write_text(str(state.step))
            time.sleep(0.02)

    try:
        state = lt.run(lt.train_step(loss), state, loader, progress=False, log_every=None,
               preemption=lt.Preemption(signals=args.signals.split(","), stop_within=args.stop_within),
               hooks=[hook, lt.every(1000, lt.checkpoint_sharded(dir=out / "ckpt"))])
    except ValueError:
        (out / "raised").write_text(str(time.time()))
        raise
    (out / "finished").write_text(str(state.step))


if __name__ == "__main__":
    main()
