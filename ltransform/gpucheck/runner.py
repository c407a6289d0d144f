"""The supervisor: runs the jobs in a worker process, times each out, survives crashes, keeps the budget.

A job that hangs (a collective that never completes) is killed at its timeout; one that kills
the worker (a segfault or abort in a kernel, a CUDA error that poisons the context) is recorded
as failed with the tail of the worker's log. Either way a fresh worker runs the jobs left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STARTUP_S = 120.0  # imports (torch, ltransform, bitsandbytes) and CUDA initialisation
REPORT_RESERVE_S = 10.0  # kept for writing the report at the end of the budget
MIN_JOB_S = 5.0  # a job is not started with less than this left


class Supervisor:
    """Runs ``jobs`` (name -> timeout in seconds) in workers until done or ``deadline``;
    ``on_result`` receives each job's record as it arrives."""

    def __init__(self, *, device: str, size: str, out_dir: Path, deadline: float,
                 on_result: Callable[[dict[str, Any]], None], bench_budget: Callable[[], float]) -> None:
        self.device, self.size, self.out_dir, self.deadline = device, size, out_dir, deadline
        self.on_result, self.bench_budget = on_result, bench_budget
        self.workers = 0

    def left(self) -> float:
        return self.deadline - time.monotonic() - REPORT_RESERVE_S

    def run(self, jobs: dict[str, float]) -> None:
        pending = list(jobs)
        while pending:
            if self.left() < MIN_JOB_S:
                for name in pending:
                    self.on_result({"name": name, "status": "skip", "duration_s": 0.0,
                                    "reason": "the global time budget (--budget) was spent before it could start"})
                return
            done = self._one_worker(pending, jobs)
            if not done:  # the worker died before starting any job: do not loop forever
                for name in pending:
                    self.on_result({"name": name, "status": "fail", "duration_s": 0.0,
                                    "reason": f"the worker process could not start; see {self._log().name}"})
                return
            pending = [name for name in pending if name not in done]

    def _log(self) -> Path:
        return self.out_dir / "worker.log"

    def _one_worker(self, pending: list[str], jobs: dict[str, float]) -> list[str]:
        """Run ``pending`` in one worker; return the jobs it finished (or that failed by killing it)."""
        self.workers += 1
        events = self.out_dir / f"worker-{self.workers}.events.jsonl"
        events.unlink(missing_ok=True)
        command = [sys.executable, "-m", "ltransform.gpucheck.worker", "--device", self.device, "--size", self.size,
                   "--events", str(events), "--jobs", ",".join(pending),
                   "--bench-budget", f"{max(self.bench_budget(), 0.0):.0f}"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self._log().open("a") as log:
            log.write(f"\n=== worker {self.workers}: {' '.join(command)}\n")
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)  # its own group: killed with its children
        try:
            return self._watch(process, events, jobs)
        finally:
            if process.poll() is None:  # the supervisor is stopping (Ctrl-C, SIGTERM): so does the worker
                _kill(process)

    def _watch(self, process: subprocess.Popen, events: Path, jobs: dict[str, float]) -> list[str]:
        done: list[str] = []
        current, started, offset = None, time.monotonic(), 0
        timeout = STARTUP_S
        while True:
            for event in _read(events, offset):
                offset = event.pop("_offset")
                if event["event"] == "start":
                    current, started = event["name"], time.monotonic()
                    timeout = jobs[current]
                elif event["event"] == "result":
                    event.pop("event")
                    self.on_result(event)
                    done.append(event["name"])
                    current = None
                elif event["event"] == "ready":
                    started, timeout = time.monotonic(), STARTUP_S
            code = process.poll()
            if code is not None:
                for event in _read(events, offset):  # written just before it exited
                    offset = event.pop("_offset")
                    if event["event"] == "result":
                        event.pop("event")
                        self.on_result(event)
                        done.append(event["name"])
                        current = None
                if current is not None:
                    self._failed(current, started, f"the worker process died during this check ({_exit(code)})")
                    done.append(current)
                return done
            limit = min(timeout, self.left()) if current is not None else STARTUP_S
            if time.monotonic() - started > limit:
                _kill(process)
                if current is None:
                    return done
                reason = (f"timed out after {limit:.0f} s (its limit: {jobs[current]:.0f} s, the budget left: "
                          f"{max(self.left(), 0):.0f} s) and was killed")
                self._failed(current, started, reason)
                done.append(current)
                return done
            time.sleep(0.2)

    def _failed(self, name: str, started: float, reason: str) -> None:
        self.on_result({"name": name, "status": "fail", "reason": reason,
                        "duration_s": round(time.monotonic() - started, 3), "log_tail": _tail(self._log())})


def _read(path: Path, offset: int) -> list[dict[str, Any]]:
    """Complete lines of the events file after byte ``offset``, each with the offset after it."""
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    events = []
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # still being written
        offset += len(line)
        events.append({**json.loads(line), "_offset": offset})
    return events


def _exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _kill(process: subprocess.Popen) -> None:
    """End the worker and what it started (its own process group): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            if sig == signal.SIGKILL:
                return
        except subprocess.TimeoutExpired:
            continue
    try:  # a child left in the group after the worker itself ended
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
