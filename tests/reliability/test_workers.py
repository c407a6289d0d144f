"""lt.run over a ``DataLoader(num_workers=2)`` with the default preemption watch: an error in the step,
a worker or a hook comes out at once (the forked workers once held the watch's wakeup socket open, so
ending its thread hung for ever), a SIGTERM still stops, saves and exits 143, and a signal a worker gets
never reaches the run's watch.

Each case runs ``workers_train.py`` in its own process with a hard timeout, so a hang fails the test
instead of hanging the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ltransform as lt

SCRIPT = Path(__file__).with_name("workers_train.py")
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
HARD_TIMEOUT = 90  # seconds: a hang becomes a failure (a run here takes a few seconds)


def start(out: Path, mode: str, *args: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stderr.txt", "w") as err:  # its own session: the test may signal its process group
        return subprocess.Popen([sys.executable, str(SCRIPT), str(out), mode, *args], stdout=subprocess.DEVNULL,
                                stderr=err, env=ENV, start_new_session=True)


def finish(proc: subprocess.Popen, out: Path, timeout: float = HARD_TIMEOUT) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers
        proc.wait()
        pytest.fail(f"still running after {timeout} s (hung):\n{(out / 'stderr.txt').read_text()[-3000:]}")
    return proc.returncode, (out / "stderr.txt").read_text()


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (out / "stderr.txt").read_text()[-3000:]
        try:
            if int((out / "progress").read_text() or 0) >= step:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step} in {timeout} s")


def exited(pid: int) -> bool:
    """Gone, or a zombie (Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):
        return True


def workers(out: Path) -> list[int]:
    return [int((out / f"worker-{w}").read_text()) for w in (0, 1)]


def assert_workers_end(out: Path, timeout: float = 20) -> None:
    pids = workers(out)
    deadline = time.monotonic() + timeout
    while not all(exited(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in pids if not exited(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"DataLoader workers {left} still running {timeout} s after the run ended"


@pytest.mark.timeout(2 * HARD_TIMEOUT)
@pytest.mark.parametrize("where, message", [
    ("step", "ValueError: step failed at batch 3"),
    ("worker", "ValueError: corrupt sample 8"),  # DataLoader re-raises a worker's error in the run's process
    ("hook", "ValueError: hook failed at step 3"),
])
def test_an_error_during_a_run_over_dataloader_workers_comes_out_at_once(tmp_path, where, message):
    code, err = finish(start(tmp_path, where), tmp_path)
    assert code == 1, err[-3000:]
    assert message in err, err[-3000:]
    took = float((tmp_path / "raised").read_text()) - float((tmp_path / "raised-at").read_text())
    assert took < 10, f"lt.run let the error out {took:.1f} s after it was raised"
    assert_workers_end(tmp_path)


def stopped_at(err: str) -> int:
    line = next(line for line in err.splitlines() if "lt.run: stopped after step" in line)
    return int(line.split("stopped after step ")[1].split()[0])


@pytest.mark.timeout(2 * HARD_TIMEOUT)
def test_sigterm_to_a_run_over_dataloader_workers_saves_and_exits_143(tmp_path):
    proc = start(tmp_path, "signal")
    wait_for_step(tmp_path, 5, proc)
    os.kill(proc.pid, signal.SIGTERM)
    code, err = finish(proc, tmp_path)
    assert code == 143, err[-3000:]
    step = stopped_at(err)
    assert 5 <= step < 300 and "on SIGTERM (preemption); saved" in err, err[-3000:]
    assert lt.latest_checkpoint(tmp_path / "ckpt").name == f"step-{step:08d}"
    assert_workers_end(tmp_path)


@pytest.mark.timeout(2 * HARD_TIMEOUT)
def test_a_signal_to_the_run_and_its_workers_stops_saves_and_the_workers_ignore_it(tmp_path):
    """SLURM's --signal=USR1@N reaches every process of the job step: the workers, which inherited the
    run's handler, ignore it (they neither print nor feed the run's watch), and the run stops and saves."""
    proc = start(tmp_path, "signal", "--signals", "SIGTERM,SIGUSR1")
    wait_for_step(tmp_path, 5, proc)
    os.killpg(proc.pid, signal.SIGUSR1)
    code, err = finish(proc, tmp_path)
    assert code == 128 + signal.SIGUSR1, err[-3000:]
    step = stopped_at(err)
    assert lt.latest_checkpoint(tmp_path / "ckpt").name == f"step-{step:08d}"
    assert err.count("lt.run: received SIGUSR1") == 1, err[-3000:]  # the run's own message, no worker's
    assert_workers_end(tmp_path)


@pytest.mark.timeout(2 * HARD_TIMEOUT)
def test_a_signal_to_a_worker_alone_does_not_reach_the_runs_watch(tmp_path):
    """A worker once kept the run's wakeup fd: its signal started the run's stop_within limit, and the
    run exited without a checkpoint stop_within seconds later, though it never got the signal."""
    proc = start(tmp_path, "signal", "--signals", "SIGTERM,SIGUSR1", "--stop-within", "1")
    wait_for_step(tmp_path, 5, proc)
    os.kill(workers(tmp_path)[0], signal.SIGUSR1)
    code, err = finish(proc, tmp_path)
    assert code == 0, err[-3000:]
    assert int((tmp_path / "finished").read_text()) == 300
    assert "received SIGUSR1" not in err and "did not reach the end of its step" not in err, err[-3000:]


@pytest.mark.timeout(2 * HARD_TIMEOUT)
def test_sigterm_to_the_workers_and_the_run_saves_and_exits_143(tmp_path):
    """A job's end signals every process of it (SLURM's scancel, a preemption): torch's workers died
    of a SIGTERM their parent did not send, and the run then failed with "worker killed" instead of
    stopping and saving. While lt.run runs, its workers outlive the run's preemption signals."""
    proc = start(tmp_path, "signal")
    wait_for_step(tmp_path, 5, proc)
    for pid in workers(tmp_path):
        os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)  # a worker killed by it would have made the loader raise by now
    assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
    os.kill(proc.pid, signal.SIGTERM)
    code, err = finish(proc, tmp_path)
    assert code == 143, err[-3000:]
    step = stopped_at(err)
    assert lt.latest_checkpoint(tmp_path / "ckpt").name == f"step-{step:08d}"
    assert_workers_end(tmp_path)


def _mark(worker_id: int) -> None:
    import torch

    info = torch.utils.data.get_worker_info()
    assert info is not None and info.id == worker_id


def test_the_loaders_own_worker_init_fn_still_runs_and_is_put_back():
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(torch.randn(8, 4), batch_size=4, num_workers=1, worker_init_fn=_mark)
    model = torch.nn.Linear(4, 1)
    state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    state = lt.run(lt.train_step(lambda m, b: m(b).pow(2).mean()), state, loader, progress=False)
    assert state.step == 2 and loader.worker_init_fn is _mark
