"""SLURM: the environment is read right (unit tests on env dicts), and under a real single-node
SLURM (scripts/setup-clusters.sh) ``srun -n 2`` trains what ``lt.launch(devices=2)`` trains,
bitwise, and a preempted batch job checkpoints, is requeued, resumes and finishes bitwise equal.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

import ltransform as lt
from cluster_train import as_launched_by, assert_bitwise, assert_trained_alike, child_env, reference
from ltransform.distributed import clusters, env

SCRIPT = Path(__file__).with_name("cluster_train.py")

STEP = {  # what srun -n 4 over two nodes sets for the task of rank 3 (SLURM 22.05)
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NAME": "bash",
}


# -- unit tests of the parsers, on env dicts ---------------------------------------------------

@pytest.mark.parametrize("text, hosts", [
    ("vm", ["vm"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("x-1,y[3]", ["x-1", "y3"]),
])
def test_expand_hostlist(text, hosts):
    assert clusters.expand_hostlist(text) == hosts


@pytest.mark.parametrize("text, match", [("", "no host"), ("n[1-2", "unbalanced"), ("n1-2]", "unbalanced"),
                                         ("n[3-1]", "bad range '3-1'"), ("n[a-b]", "bad range 'a-b'")])
def test_expand_hostlist_rejects_bad_lists(text, match):
    with pytest.raises(ValueError, match=match):
        clusters.expand_hostlist(text)


def test_a_job_step_task_gets_torchrun_variables():
    assert clusters.name(STEP) == "slurm"
    assert clusters.environment(STEP) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                          "MASTER_ADDR": "gpu07", "MASTER_PORT": str(15000 + 3456)}
    given = {**STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    assert clusters.environment(given)["MASTER_ADDR"] == "10.0.0.1"
    assert clusters.environment(given)["MASTER_PORT"] == "29400"


def test_an_sbatch_shell_is_not_rank_0_of_a_group():
    batch = {"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
             "SLURM_JOB_NODELIST": "vm", "SLURM_JOB_NAME": "train.sh"}  # no SLURM_STEP_ID: not a step
    assert clusters.name(batch) is None
    assert clusters.environment(batch) == {}


def test_torchrun_inside_slurm_and_mpirun_inside_slurm_win():
    assert clusters.name({**STEP, "TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "0"}) == "torchrun"
    assert clusters.environment({**STEP, "TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "0"}) == {}
    mpi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert clusters.name({**STEP, **mpi}) == "mpi"
    joined = {**STEP, **clusters.environment(STEP)}  # what ensure_process_group sets in the task
    assert clusters.name(joined) == "slurm" and clusters.environment(joined) == clusters.environment(STEP)
    assert clusters.name({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}) == "torchrun"


def test_a_bad_slurm_variable_is_named():
    with pytest.raises(ValueError, match="SLURM_PROCID='x'"):
        clusters.environment({**STEP, "SLURM_PROCID": "x"})
    with pytest.raises(ValueError, match="tasks per node '2x'"):
        clusters.environment({**STEP, "SLURM_STEP_TASKS_PER_NODE": "2x"})


def test_rank_world_size_and_local_rank_read_the_slurm_step(monkeypatch):
    as_launched_by(monkeypatch, STEP)
    assert (env.rank(), env.world_size(), env.local_rank()) == (3, 4, 1)
    assert lt.cluster() == "slurm"
    assert "MASTER_ADDR" not in os.environ  # nothing is written before a group is made
    with pytest.raises(ValueError, match="WORLD_SIZE is 4"):  # a task of srun -n 4 is launched already
        lt.launch(lt.world_size, devices=2)


def test_requeue_outside_slurm_is_false_and_a_missing_scontrol_is_named(monkeypatch, tmp_path):
    assert clusters.requeue({}) is False
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="could not run 'scontrol requeue 42'"):
        clusters.requeue({"SLURM_JOB_ID": "42"})


# -- a real single-node SLURM ------------------------------------------------------------------

def _slurm_down() -> str | None:
    if not shutil.which("srun") or not shutil.which("sinfo"):
        return "SLURM is not installed (no srun/sinfo on PATH); run scripts/setup-clusters.sh as root"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "SLURM's slurmctld does not answer (sinfo timed out); run scripts/setup-clusters.sh as root"
    if out.returncode != 0 or not {"idle", "mix", "alloc"} & set(out.stdout.split()):
        return f"SLURM has no usable node (sinfo: {(out.stdout + out.stderr).strip()!r}); run scripts/setup-clusters.sh"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = _slurm_down()
    if reason:
        pytest.skip(reason)


@pytest.mark.timeout(400)
def test_srun_trains_equal_to_launch(slurm, tmp_path):
    ref = reference(tmp_path, steps=12)
    name = f"lt-test-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run(["srun", "-n", "2", "--time=3", "--immediate=120", f"--job-name={name}", "--kill-on-bad-exit=1",
                        f"--chdir={tmp_path}", sys.executable, str(SCRIPT), str(tmp_path / "srun.pt"), "--steps", "12"],
                       env=child_env(), check=True, timeout=180)
    finally:
        subprocess.run(["scancel", f"--name={name}"], timeout=30)
    got = torch.load(tmp_path / "srun.pt")
    assert [v["cluster"] for v in got["views"]] == ["slurm", "slurm"]
    assert [(v["rank"], v["world"], v["local"]) for v in got["views"]] == [(0, 2, 0), (1, 2, 1)]
    assert [v["cluster"] for v in ref["views"]] == ["torchrun", "torchrun"]
    assert_trained_alike(got, ref, 12)


def test_a_refused_requeue_is_named(slurm):
    with pytest.raises(RuntimeError, match=r"'scontrol requeue 99999999' failed with code 1: .*sbatch --requeue"):
        clusters.requeue({"SLURM_JOB_ID": "99999999"})


@pytest.mark.timeout(300)
def test_the_sbatch_shell_itself_is_not_a_rank(slurm, tmp_path):
    """``sbatch -n 2`` whose script runs ``python train.py`` without srun: the shell has
    SLURM_PROCID=0 and SLURM_NTASKS=2 but is no job step, so lt.launch starts its 2 processes
    (had it taken itself for rank 0 of 2, it would wait for a rank 1 that never comes)."""
    out, log = tmp_path / "shell.pt", tmp_path / "job.log"
    batch = tmp_path / "job.sh"
    batch.write_text(f"#!/bin/bash\n{sys.executable} {SCRIPT} {out} --steps 4\n")
    name = f"lt-test-{uuid.uuid4().hex[:8]}"
    try:
        done = subprocess.run(["sbatch", "--wait", "-n", "2", "--time=3", f"--job-name={name}", f"--output={log}",
                               f"--chdir={tmp_path}", str(batch)], env=child_env(), capture_output=True, text=True,
                              timeout=180)
    finally:
        subprocess.run(["scancel", f"--name={name}"], timeout=30)
    assert done.returncode == 0, log.read_text() if log.exists() else done.stderr
    got = torch.load(out)
    assert [(v["cluster"], v["rank"], v["world"]) for v in got["views"]] == [("torchrun", 0, 2), ("torchrun", 1, 2)]
    assert got["step"] == 4


def _squeue(job: str) -> str:
    """The job's state and reason (``"PENDING BeginTime"``), or "" once it has left the queue."""
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def _wait(what: str, done, seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}; job log:\n"
                                 f"{log.read_text() if log.exists() else '(none)'}")
        time.sleep(0.3)


@pytest.mark.timeout(400)
def test_preempted_job_checkpoints_requeues_and_resumes_bitwise(slurm, tmp_path):
    """sbatch --requeue; scancel --signal=USR1 mid-run (what --signal=USR1@N sends before the
    time limit) -> every rank stops after the same step and saves, rank 0 runs scontrol
    requeue -> the job runs again (SLURM_RESTART_COUNT=1), resumes from that checkpoint and
    ends bitwise equal to an uninterrupted lt.launch run."""
    steps = 40
    ref = reference(tmp_path, steps=steps)
    out, ckpt, log = tmp_path / "slurm.pt", tmp_path / "ckpt", tmp_path / "job.log"
    batch = tmp_path / "job.sh"
    batch.write_text(f"#!/bin/bash\necho \"run $((SLURM_RESTART_COUNT + 0))\"\n"
                     f"srun -n 2 {sys.executable} {SCRIPT} {out} --steps {steps} --ckpt {ckpt} --slow 0.25 --preempt\n")
    name = f"lt-test-{uuid.uuid4().hex[:8]}"
    job = subprocess.run(["sbatch", "--parsable", "--requeue", "-n", "2", "--time=5", f"--job-name={name}",
                          f"--output={log}", "--open-mode=append", f"--chdir={tmp_path}", str(batch)],
                         env=child_env(), capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    try:
        _wait("the first checkpoint (step 5)", lambda: (ckpt / "step-00000005").is_dir(), 120, log)
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)

        def finished() -> bool:  # a requeued job waits cred_expire (10 s in setup-clusters.sh)
            return not _squeue(job) and out.exists()

        _wait("the requeued job to finish", finished, 200, log)
    finally:
        subprocess.run(["scancel", job], timeout=30)
    text = log.read_text()
    assert "run 0" in text and "run 1" in text, text
    stopped = [line for line in text.splitlines() if "on SIGUSR1 (preemption)" in line]
    assert len(stopped) == 1 and "requeued the SLURM job" in stopped[0], text
    at = int(stopped[0].split("stopped after step ")[1].split(" ")[0])
    assert 5 <= at < steps and (ckpt / f"step-{at:08d}").is_dir(), text
    got = torch.load(out)
    assert got["step"] == ref["step"] == steps
    assert [v["cluster"] for v in got["views"]] == ["slurm", "slurm"]
    assert_bitwise(got["params"], ref["params"])
