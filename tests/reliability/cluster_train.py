"""One unchanged training script for ``python`` (lt.launch), ``srun -n 2`` and ``mpirun -np 2``.

    python cluster_train.py OUT [--steps N] [--ckpt DIR] [--slow SECONDS] [--preempt]

Rank 0 writes ``OUT``: the final parameters, and every rank's view of its launcher (cluster
name, rank, world size, local rank). With ``--ckpt`` it checkpoints every 5 steps into DIR and
resumes from the latest there, so a preempted and requeued job continues where it stopped;
``--preempt`` makes SIGUSR1 (SLURM's ``--signal``) stop, save and requeue the job.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import ltransform as lt
from ltransform.distributed.env import all_gather_objects


def batches(rank: int, world: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the same global batches on any world size."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        out.append((x[rank::world], x[rank::world].sum(1, keepdim=True).sin()))
    return out


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def main(out: str, steps: int, ckpt: str | None, slow: float, run_options: dict) -> None:
    model = make_model()
    state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    step = lt.pipe(lt.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])), lt.distribute("ddp"))
    hooks = [lt.every(5, lt.checkpoint_sharded(dir=ckpt))] if ckpt else []
    if slow:  # so that a signal sent mid-run lands mid-run
        hooks.append(lambda state: time.sleep(slow))
    state = lt.run(step, state, batches(lt.rank(), lt.world_size(), steps), max_steps=steps, progress=False,
                   log_every=None, hooks=hooks, resume="latest" if ckpt else None, **run_options)
    view = {"cluster": lt.cluster(), "rank": lt.rank(), "world": lt.world_size(), "local": lt.local_rank()}
    views = all_gather_objects(view)
    if lt.rank() == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    "views": views, "step": state.step}, out)


# -- for the tests (test_slurm.py, test_mpi.py) ------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                      "MASTER_ADDR", "MASTER_PORT")


def child_env() -> dict[str, str]:
    """This environment less any launcher's variables, with this checkout importable."""
    out = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARIABLES and not k.startswith(("SLURM_", "OMPI_COMM_WORLD_", "PMIX_"))}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return out


def reference(tmp_path: Path, steps: int) -> dict:
    """The same script under ``lt.launch(devices=2)`` (plain ``python``)."""
    out = tmp_path / "launch.pt"
    subprocess.run([sys.executable, __file__, str(out), "--steps", str(steps)], env=child_env(), cwd=tmp_path,
                   check=True, timeout=180)
    return torch.load(out)


def as_launched_by(monkeypatch, variables: dict[str, str]) -> None:
    """This process's environment as a launcher sets it: no torchrun variables, ``variables`` set."""
    for key in LAUNCHER_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)


def assert_trained_alike(got: dict, ref: dict, steps: int) -> None:
    """A cluster run equals the ``lt.launch`` reference bitwise, and a plain one-process loop
    up to rounding."""
    assert got["step"] == ref["step"] == steps
    assert_bitwise(got["params"], ref["params"])
    for key, value in plain_pytorch(steps).items():
        torch.testing.assert_close(got["params"][key], value, rtol=0, atol=1e-6)


def assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def plain_pytorch(steps: int) -> dict:
    """One process, the whole batch, a hand-written loop: what 2 DDP ranks must match (up to
    float rounding: the mean over 2 ranks of 4 sums in another order than 1 mean of 8)."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches(0, 1, steps):
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--ckpt")
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--preempt", action="store_true")
    args = parser.parse_args()
    slurm = {"preemption": lt.Preemption(signals=["SIGTERM", "SIGUSR1"], requeue=["SIGUSR1"])}
    lt.launch(main, args.out, args.steps, args.ckpt, args.slow, slurm if args.preempt else {}, devices=2)
