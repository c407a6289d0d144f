"""Preemption: a signal during lt.run finishes the step, saves on every rank, exits with 128 + signum,
and ``resume="latest"`` then ends bitwise equal to an uninterrupted run.

The process tests run ``faulty_train.py`` in real processes (one, or two ranks under lt.launch) and
send SIGTERM to the ranks' pids, as SLURM or Kubernetes do: to every rank, or to one only.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ltransform as lt

SCRIPT = Path(__file__).with_name("faulty_train.py")
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
SLOW = ["--steps", "300", "--sleep", "0.02"]  # a step every ~20 ms: time to send a signal mid-run


def start(out: Path, *args: str) -> subprocess.Popen:
    out.mkdir(exist_ok=True)
    with open(out / "stderr.txt", "a") as err:
        return subprocess.Popen([sys.executable, str(SCRIPT), str(out), *args], stdout=subprocess.DEVNULL,
                                stderr=err, env=ENV)


def finish(proc: subprocess.Popen, out: Path, timeout: float = 150) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, (out / "stderr.txt").read_text()


def run_script(out: Path, *args: str) -> tuple[int, str]:
    return finish(start(out, *args), out)


def wait_for_step(out: Path, ranks: int, step: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (out / "stderr.txt").read_text()[-3000:]
        try:
            if all(int((out / f"progress-rank{r}").read_text() or 0) >= step for r in range(ranks)):
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no rank reached step {step} in {timeout} s")


def final(out: Path, rank: int) -> list[torch.Tensor]:
    return torch.load(out / f"final-rank{rank}.pt")


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same script, never signalled: one process, and two ranks."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    procs = [start(one, "--steps", "300"), start(two, "--devices", "2", "--steps", "300")]
    for proc, out in zip(procs, (one, two)):
        code, err = finish(proc, out)
        assert code == 0, err[-3000:]
    return {1: [final(one, 0)], 2: [final(two, 0), final(two, 1)]}


def stopped_at(err: str) -> int:
    line = next(line for line in err.splitlines() if "lt.run: stopped after step" in line)
    return int(line.split("stopped after step ")[1].split()[0])


@pytest.mark.timeout(300)
def test_sigterm_on_one_process_saves_the_stop_step_exits_143_and_resumes_bitwise(tmp_path, uninterrupted):
    proc = start(tmp_path, *SLOW)
    wait_for_step(tmp_path, 1, 8, proc)
    os.kill(int((tmp_path / "pid-rank0-attempt0").read_text()), signal.SIGTERM)
    code, err = finish(proc, tmp_path)
    assert code == 143, err[-3000:]
    step = stopped_at(err)
    assert 8 <= step < 300
    assert "on SIGTERM (preemption); saved" in err and "exiting with code 143" in err
    assert lt.latest_checkpoint(tmp_path / "ckpt").name == f"step-{step:08d}"
    assert not (tmp_path / "final-rank0.pt").exists()

    code, err = run_script(tmp_path, "--steps", "300")  # the restarted job
    assert code == 0, err[-3000:]
    assert_bitwise(final(tmp_path, 0), uninterrupted[1][0])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signalled", [(0, 1), (1,), "launcher"], ids=["every-rank", "rank-1-only", "the-launcher"])
def test_sigterm_on_two_ranks_stops_both_at_one_step_saves_and_resumes_bitwise(tmp_path, uninterrupted, signalled):
    proc = start(tmp_path, "--devices", "2", *SLOW)
    wait_for_step(tmp_path, 2, 8, proc)
    if signalled == "launcher":  # as Kubernetes does: to the container's first process, which passes it on
        os.kill(proc.pid, signal.SIGTERM)
    for rank in () if signalled == "launcher" else signalled:  # as SLURM does: to the ranks
        os.kill(int((tmp_path / f"pid-rank{rank}-attempt0").read_text()), signal.SIGTERM)
    code, err = finish(proc, tmp_path)
    assert code == 143, err[-3000:]  # lt.launch exits as its preempted ranks did
    step = stopped_at(err)
    assert 8 <= step < 300
    # both ranks stopped after the same step, whichever got the signal
    assert [int((tmp_path / f"progress-rank{r}").read_text()) for r in (0, 1)] == [step, step]
    for rank in (0, 1):
        assert "Preempted: lt.run: stopped after step" in (tmp_path / f"error-rank{rank}").read_text()
    assert lt.latest_checkpoint(tmp_path / "ckpt").name == f"step-{step:08d}"

    code, err = run_script(tmp_path, "--devices", "2", "--steps", "300")
    assert code == 0, err[-3000:]
    for rank in (0, 1):
        assert_bitwise(final(tmp_path, rank), uninterrupted[2][rank])


@pytest.mark.timeout(200)
@pytest.mark.parametrize("target", ["ranks", "launcher"])
def test_ltransform_run_exits_143_when_its_ranks_or_it_get_sigterm(tmp_path, target):
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ltransform", "run", "--devices", "2", str(SCRIPT),
                                 str(tmp_path), *SLOW], stdout=subprocess.DEVNULL, stderr=err, env=ENV)
    wait_for_step(tmp_path, 2, 8, proc)
    ranks = [int((tmp_path / f"pid-rank{r}-attempt0").read_text()) for r in (0, 1)]
    pids = [proc.pid] if target == "launcher" else ranks
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    code, err = finish(proc, tmp_path)
    assert code == 143, err[-3000:]
    step = stopped_at(err)
    assert lt.latest_checkpoint(tmp_path / "ckpt").name == f"step-{step:08d}"


# --- in one process: the API ------------------------------------------------------------


def _setup(steps: int = 400):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 4, generator=gen), torch.randn(4, 1, generator=gen)) for _ in range(steps)]
    return lt.train_step(lambda m, b: F.mse_loss(m(b[0]), b[1])), state, data


def _signal_at(step: int, sig: signal.Signals = signal.SIGTERM):
    def hook(state):
        if state.step == step:
            os.kill(os.getpid(), sig)
    return hook


@pytest.mark.timeout(60)
def test_a_signal_in_process_stops_saves_raises_preempted_and_resume_is_bitwise(tmp_path, capsys):
    step, state, data = _setup()
    saver = lt.every(50, lt.checkpoint_sharded(dir=tmp_path))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(lt.Preempted) as info:
        lt.run(step, state, data, progress=False, log_every=None, hooks=[saver, _signal_at(7)])
    assert signal.getsignal(signal.SIGTERM) is before  # restored
    stopped = info.value
    assert isinstance(stopped, SystemExit) and stopped.code == 143 and stopped.signal is signal.SIGTERM
    assert 7 <= stopped.step < 400 and stopped.checkpoint == tmp_path / f"step-{stopped.step:08d}"
    assert lt.latest_checkpoint(tmp_path) == stopped.checkpoint
    assert f"lt.run: stopped after step {stopped.step} on SIGTERM" in capsys.readouterr().err

    _, resumed, _ = _setup()
    resumed = lt.run(step, resumed, data, progress=False, log_every=None, hooks=[saver], resume="latest")
    _, reference, _ = _setup()
    reference = lt.run(step, reference, data, progress=False, log_every=None)
    assert resumed.step == reference.step == 400
    assert_bitwise(list(resumed.model.parameters()), list(reference.model.parameters()))


def test_checks_are_spaced_in_time_not_made_every_step(monkeypatch):
    from ltransform.distributed import preemption

    checks = []
    original = preemption.Watch.check
    monkeypatch.setattr(preemption.Watch, "check", lambda self, now: checks.append(now) or original(self, now))
    step, state, data = _setup(3000)
    lt.run(step, state, data, progress=False, log_every=None)
    assert 3 <= len(checks) < 60, checks  # ~0.2 s apart, growing at most twofold from one step


def test_a_configured_signal_with_requeue_outside_slurm_says_it_did_not_requeue(tmp_path, capsys, monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    step, state, data = _setup()
    preemption = lt.Preemption(signals=["SIGTERM", "SIGUSR1"], requeue=["USR1"])
    with pytest.raises(lt.Preempted) as info:
        lt.run(step, state, data, progress=False, log_every=None, preemption=preemption,
               hooks=[lt.checkpoint_sharded(dir=tmp_path), _signal_at(3, signal.SIGUSR1)])
    assert info.value.code == 128 + signal.SIGUSR1
    assert "not in a SLURM job, not requeued" in capsys.readouterr().err


def test_without_a_checkpoint_hook_it_still_stops_and_says_nothing_was_saved(capsys):
    step, state, data = _setup()
    with pytest.raises(lt.Preempted, match="no checkpoint hook, nothing saved") as info:
        lt.run(step, state, data, progress=False, log_every=None, hooks=[_signal_at(2)])
    assert info.value.checkpoint is None


def test_a_signal_after_the_last_step_still_saves_the_final_state(tmp_path):
    step, state, data = _setup(10)
    with pytest.raises(lt.Preempted) as info:
        lt.run(step, state, data, progress=False, log_every=None,
               hooks=[lt.every(4, lt.checkpoint_sharded(dir=tmp_path)), _signal_at(10)])
    assert info.value.step == 10 and lt.latest_checkpoint(tmp_path).name == "step-00000010"


def test_none_leaves_the_handlers_alone_and_a_thread_installs_none():
    step, state, data = _setup(5)
    seen = []
    look = lambda s: seen.append(signal.getsignal(signal.SIGTERM))  # noqa: E731
    lt.run(step, state, data, progress=False, log_every=None, preemption=None, hooks=[look])
    assert seen[0] is signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=lambda: lt.run(step, state, data, progress=False, log_every=None, hooks=[look]))
    thread.start()
    thread.join(30)
    assert seen[-1] is signal.getsignal(signal.SIGTERM)  # signal handlers can only be set in the main thread


@pytest.mark.parametrize("options, error, message", [
    (dict(signals=["SIGNOPE"]), ValueError, r"unknown signal 'SIGNOPE'; give a name such as 'SIGTERM'"),
    (dict(signals=[signal.SIGKILL]), ValueError, r"SIGKILL cannot be caught by a process"),
    (dict(requeue=["SIGUSR1"]), ValueError, r"requeue names SIGUSR1, which is not among signals \['SIGTERM'\]"),
    (dict(stop_within=0), ValueError, r"'stop_within' must be > 0"),
])
def test_bad_preemption_options_are_named(options, error, message):
    with pytest.raises(error, match=message):
        lt.Preemption(**options)


def test_run_rejects_a_preemption_that_is_not_one():
    step, state, data = _setup(2)
    with pytest.raises(TypeError, match=r"preemption must be an lt.Preemption\(...\) or None, got 'SIGTERM'"):
        lt.run(step, state, data, progress=False, preemption="SIGTERM")


def _rank_1_vanishes(directory: str) -> None:
    """Rank 1 exits between two checks; then rank 0 gets SIGTERM (as from an agent restarting)."""
    import warnings

    step, state, data = _setup(2000)

    def hook(state):
        if state.step == 2 and lt.rank() == 1:
            os._exit(0)
        if state.step == 2 and lt.rank() == 0:
            time.sleep(1)  # rank 1 is gone by now
            os.kill(os.getpid(), signal.SIGTERM)

    warnings.simplefilter("ignore")  # "each rank trains its own copy": no collective in the step
    lt.run(step, state, data, progress=False, log_every=None,
           hooks=[hook, lt.every(1000, lt.checkpoint_sharded(dir=directory))])


@pytest.mark.timeout(120)
def test_a_signalled_rank_whose_peer_is_gone_exits_at_once_without_a_checkpoint(tmp_path):
    start = time.monotonic()
    with pytest.raises(lt.Preempted, match=r"SIGTERM received on rank 0, but the ranks could not agree on a step "
                                           r"to stop at \(RuntimeError: .*Connection (closed|reset) by peer") as info:
        lt.launch(_rank_1_vanishes, str(tmp_path), devices=2)
    assert info.value.code == 143
    assert time.monotonic() - start < 60  # not a wait for the dead rank


# --- a rank blocked in a collective: the signal handler cannot run, stop_within still applies ---


def _exited(pid: int) -> bool:
    """Gone, or a zombie its parent has not reaped yet (Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.timeout(120)
def test_a_rank_blocked_in_a_collective_exits_143_within_stop_within_of_sigterm(tmp_path):
    """Rank 1 sleeps in a hook after step 5, so rank 0 waits in step 6's all-reduce, in C++, where
    Python never runs its SIGTERM handler; the stop_within limit starts from the wakeup fd's
    thread all the same (it waited for the collective's 30 s timeout, by default 30 min)."""
    proc = start(tmp_path, "--devices", "2", "--steps", "300", "--hang-at", "5", "--stop-within", "2",
                 "--timeout", "30")
    try:
        wait_for_step(tmp_path, 2, 5, proc)
        time.sleep(0.5)  # rank 0 is in step 6's all-reduce by now
        rank0 = int((tmp_path / "pid-rank0-attempt0").read_text())
        signalled = time.monotonic()
        os.kill(rank0, signal.SIGTERM)
        while not _exited(rank0) and time.monotonic() - signalled < 15:
            time.sleep(0.02)
        took = time.monotonic() - signalled
        assert 1.9 <= took < 8, f"rank 0 still running {took:.1f} s after SIGTERM with stop_within=2"
        code, err = finish(proc, tmp_path, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code != 0
    assert ("lt.run: rank 0 did not reach the end of its step within 2 s of SIGTERM (stuck, or waiting for a "
            "rank that is gone); exiting with code 143 without a checkpoint") in err, err[-3000:]
    assert "rank 0 failed first (local rank 0 on node 0), at " in err, err[-3000:]  # the launcher's report
    assert "exited with code 143 (128 + SIGTERM)" in err, err[-3000:]
    assert lt.latest_checkpoint(tmp_path / "ckpt").name == "step-00000005"  # the last hook's, none at the stop


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_many_runs_leave_no_thread_or_fd_and_restore_and_feed_the_previous_wakeup_fd():
    step, state, data = _setup(3)
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    reader.settimeout(5)
    previous = signal.set_wakeup_fd(writer.fileno())
    try:
        gc.collect()  # close what earlier tests left for the collector, so that it is not closed mid-comparison
        threads, fds = set(threading.enumerate()), _open_fds()
        for _ in range(30):
            lt.run(step, state, data, progress=False, log_every=None)
        assert set(threading.enumerate()) == threads
        assert _open_fds() <= fds  # none opened and left open (one an earlier test left may be closed meanwhile)
        assert signal.set_wakeup_fd(writer.fileno()) == writer.fileno()  # put back each time

        with pytest.raises(lt.Preempted):  # a signal during the run still reaches the previous wakeup fd
            lt.run(step, state, data, progress=False, log_every=None, hooks=[_signal_at(2)])
        assert reader.recv(16) == bytes([signal.SIGTERM])
        assert set(threading.enumerate()) == threads and _open_fds() <= fds
    finally:
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()


def test_a_gloo_group_for_the_check_is_made_once_per_default_group(one_rank_group):
    """With an NCCL-only default group the check needs a gloo group: one, not one per lt.run."""
    import torch.distributed as dist

    from ltransform.distributed.preemption import _gloo_group

    first = _gloo_group(dist.group.WORLD)
    assert _gloo_group(dist.group.WORLD) is first and dist.get_world_size(first) == 1


def _in_a_forked_child(results) -> None:
    """What a child forked mid-run (as a DataLoader worker is) inherited: its wakeup fd and handler."""
    wakeup = signal.set_wakeup_fd(-1)
    results.put((wakeup, getattr(signal.getsignal(signal.SIGTERM), "__name__", None)))


@pytest.mark.timeout(60)  # it hung for ever before the fix
def test_a_child_forked_mid_run_forgets_the_watch_and_the_run_ends_at_once_on_an_error():
    """A forked child closes its copy of the watch's socket, gets back the wakeup fd the watch replaced
    and ignores the preemption signals; an error then ends the run at once although the child lives on
    (ending the watch's thread once waited for every copy of its socket to be closed)."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    results, release = fork.Queue(), fork.Event()
    children = []
    previous = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(previous)

    def hook(state):
        if state.step == 2:
            child = fork.Process(target=lambda: (_in_a_forked_child(results), release.wait(60)), daemon=True)
            child.start()
            children.append(child)
            raise ValueError("boom at step 2")

    step, state, data = _setup(5)
    threads = set(threading.enumerate())
    try:
        started = time.monotonic()
        with pytest.raises(ValueError, match="boom at step 2"):
            lt.run(step, state, data, progress=False, log_every=None, hooks=[hook])
        assert time.monotonic() - started < 10
        wakeup, handler = results.get(timeout=30)
        assert wakeup == previous and handler == "_ignore"
        assert set(threading.enumerate()) == threads
    finally:
        release.set()
        for child in children:
            child.join(30)
