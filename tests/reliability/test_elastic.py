"""Elastic restart: rank 1 SIGKILLs itself mid-run on the first attempt; the agent restarts the
group, which meets again (under its own store prefix), resumes from the latest checkpoint and
ends bitwise equal to an uninterrupted run. Under lt.launch, ``ltransform run`` and plain torchrun.

Without the per-attempt prefix, lt.launch's and torchrun's static rendezvous (a given master port)
restart into the previous attempt's peer addresses: "Connection refused" or a wait of > 600 s.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltransform.distributed.launch import _free_port

SCRIPT = Path(__file__).with_name("faulty_train.py")
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
STEPS = ["--steps", "30", "--ckpt-every", "5"]
LAUNCHERS = {
    "lt.launch": lambda out: [sys.executable, str(SCRIPT), str(out), "--devices", "2", "--max-restarts", "1"],
    "ltransform run": lambda out: [sys.executable, "-m", "ltransform", "run", "--devices", "2", "--max-restarts", "1",
                                   str(SCRIPT), str(out)],
    # a static rendezvous (a given master port, as on several nodes): the agent's store outlives restarts
    "torchrun": lambda out: [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--node-rank=0",
                             "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
                             "--max-restarts=1", "--monitor-interval=0.1", str(SCRIPT), str(out)],
}


def run(command: list[str], out: Path) -> subprocess.CompletedProcess:
    out.mkdir(exist_ok=True)
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=200)


def final(out: Path, rank: int) -> list[torch.Tensor]:
    return torch.load(out / f"final-rank{rank}.pt")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = run(LAUNCHERS["lt.launch"](out) + STEPS, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return [final(out, 0), final(out, 1)]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_rank_killed_mid_run_restarts_the_group_which_resumes_bitwise(tmp_path, uninterrupted, launcher):
    done = run(LAUNCHERS[launcher](tmp_path) + STEPS + ["--kill-at", "12"], tmp_path)
    (tmp_path / "stderr.txt").write_text(done.stderr)
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(r"SIGKILL|exitcode: -9", done.stderr)  # the agent saw rank 1 die ...
    for rank in (0, 1):  # ... and started both ranks again
        assert (tmp_path / f"pid-rank{rank}-attempt1").exists()
        pids = [(tmp_path / f"pid-rank{rank}-attempt{a}").read_text() for a in (0, 1)]
        assert pids[0] != pids[1]
    assert (tmp_path / "ckpt" / "step-00000030").is_dir()
    for rank in (0, 1):
        for ours, reference in zip(final(tmp_path, rank), uninterrupted[rank]):
            assert torch.equal(ours, reference)


@pytest.mark.timeout(300)
def test_a_survivor_sigterm_by_the_agent_mid_hook_does_not_wait_for_the_dead_rank(tmp_path, uninterrupted):
    """Rank 0 is in Python (a slow hook), not in a collective, when rank 1 dies: the agent's SIGTERM
    reads as a preemption, but rank 0's next collective with the dead rank (the step's all-reduce,
    or the preemption check) fails at once, so it exits without a checkpoint long before the
    agent's 30 s kill, and the restarted group still ends bitwise equal."""
    done = run(LAUNCHERS["lt.launch"](tmp_path) + STEPS + ["--kill-at", "12", "--pause-at", "12"], tmp_path)
    (tmp_path / "stderr.txt").write_text(done.stderr)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "lt.run: received SIGTERM on rank 0" in done.stderr
    paused = float((tmp_path / "paused").read_text())
    restarted = (tmp_path / "pid-rank0-attempt1").stat().st_mtime
    assert restarted - paused < 25, restarted - paused  # not the agent's 30 s grace before SIGKILL
    for rank in (0, 1):
        for ours, reference in zip(final(tmp_path, rank), uninterrupted[rank]):
            assert torch.equal(ours, reference)
