"""The supervisor: runs the jobs in a worker process, times each out, survives crashes, keeps the budget.

A job that hangs (a collective that never completes) is killed at its timeout; one that kills
the worker (a segfault or abort in a kernel, a CUDA error that poisons the context) is recorded
as failed with the tail of the worker's log. Either way a fresh worker runs the jobs left.

The benchmark is told the wall-clock time at which it will be killed (``--bench-deadline``: the
end of the budget less ``REPORT_RESERVE_S``), so the worker's start and the checks before it
count, and it emits its result after each part. Killed at the deadline, it keeps the parts that
finished: its record is "pass" if they passed (the budget cut it short, not a defect: the reason
says during which part), "fail" if one of them failed, "skip" if none finished. A benchmark
that crashes the worker is a "fail", with the parts that finished.
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
BENCHMARK = "benchmark"  # the job that reports partial results
REPORT_RESERVE_S = 10.0  # kept for writing the report at the end of the budget
MIN_JOB_S = 5.0  # a job is not started with less than this left


class Supervisor:
    """Runs ``jobs`` (name -> timeout in seconds) in workers until done or ``deadline`` (a
    ``time.monotonic()`` time); ``on_result`` receives each job's record as it arrives. A job's
    time limit is its timeout or the budget left, whichever is less (``float("inf")``: the budget)."""

    def __init__(self, *, device: str, size: str, out_dir: Path, deadline: float,
                 on_result: Callable[[dict[str, Any]], None]) -> None:
        self.device, self.size, self.out_dir, self.deadline = device, size, out_dir, deadline
        self.on_result = on_result
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
                   "--bench-deadline", f"{time.time() + self.left():.3f}"]  # when _watch kills it, wall clock
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
        current: str | None = None
        started, offset, timeout = time.monotonic(), 0, STARTUP_S
        partial: dict[str, Any] | None = None  # the benchmark's latest results, while it runs

        def handle(event: dict[str, Any]) -> None:
            nonlocal current, started, timeout, partial
            kind = event.pop("event")
            if kind == "start":
                current, started, partial = event["name"], time.monotonic(), None
                timeout = jobs[current]
            elif kind == "result":
                self.on_result(event)
                done.append(event["name"])
                current, started, partial = None, time.monotonic(), None  # the next start is due within STARTUP_S
            elif kind == "partial":
                partial = event
            elif kind == "ready":
                started, timeout = time.monotonic(), STARTUP_S

        while True:
            for event in _read(events, offset):
                offset = event.pop("_offset")
                handle(event)
            code = process.poll()
            if code is not None:
                for event in _read(events, offset):  # written just before it exited
                    offset = event.pop("_offset")
                    handle(event)
                if current is not None:
                    self._failed(current, started, f"the worker process died during this check ({_exit(code)})",
                                 partial)
                    done.append(current)
                return done
            elapsed = time.monotonic() - started
            over_time = elapsed > (timeout if current is not None else STARTUP_S)
            over_budget = current is not None and self.left() < 0  # (a job is given the budget's end at most)
            if over_time or over_budget:
                _kill(process)
                if current is None:
                    return done
                if over_budget and not over_time and (current == BENCHMARK or partial is not None):
                    self._cut_short(current, started, partial)
                else:
                    why = "its timeout" if over_time else "the end of the global time budget (--budget)"
                    reason = (f"timed out after {elapsed:.0f} s ({why}; its own limit: {jobs[current]:.0f} s) "
                              f"and was killed")
                    self._failed(current, started, reason, partial)
                done.append(current)
                return done
            time.sleep(0.2)

    def _cut_short(self, name: str, started: float, partial: dict[str, Any] | None) -> None:
        """The benchmark killed at the budget's end: what finished is its result."""
        running = (partial or {}).get("running")
        why = f"killed at the deadline (--budget) during {running}" if running else "killed at the deadline (--budget)"
        results = {**partial["results"], "cut_short": why} if partial is not None else None
        failed = bench_errors(results)
        finished = _finished(results or {})
        if failed:
            status, reason = "fail", f"{why}; before that {len(failed)} part(s) failed: " + "; ".join(failed)
        elif finished:
            status, reason = "pass", f"{why}; {len(finished)} part(s) finished: {', '.join(finished)}"
        else:
            status, reason = "skip", f"{why}, before any part finished"
        self.on_result({"name": name, "status": status, "reason": reason[:2000], "cut_short": why,
                        "results": results, "duration_s": round(time.monotonic() - started, 3)})

    def _failed(self, name: str, started: float, reason: str, partial: dict[str, Any] | None = None) -> None:
        record = {"name": name, "status": "fail", "reason": reason,
                  "duration_s": round(time.monotonic() - started, 3), "log_tail": _tail(self._log())}
        if partial is not None:  # the benchmark's parts that finished before
            running = partial.get("running")
            record["results"] = {**partial["results"], "cut_short": reason + (f" during {running}" if running else "")}
        self.on_result(record)


def bench_errors(part: Any, path: str = "") -> list[str]:
    """``"where: message"`` of every ``{"error": ...}`` in the benchmark's results."""
    found = []
    if isinstance(part, dict):
        if "error" in part:
            found.append(f"{path or 'results'}: {str(part['error'])[:300]}")
        for key, value in part.items():
            if key != "error":
                found += bench_errors(value, f"{path}.{key}" if path else str(key))
    elif isinstance(part, list):
        for i, value in enumerate(part):
            found += bench_errors(value, f"{path}[{i}]")
    return found


def _finished(results: dict[str, Any]) -> list[str]:
    """The benchmark's parts that finished (neither pending, running nor skipped)."""
    parts = [(m.get("name", "model"), m) for m in results.get("models", [])]
    parts += [(key, results[key]) for key in ("qlora", "fp8") if isinstance(results.get(key), dict)]
    return [name for name, part in parts if not {"pending", "running", "skipped"} & set(part)]


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
