"""Which rank failed first, and why, in one paragraph: what ``lt.launch`` raises and ``ltransform
run`` prints when a rank fails.

torch's elastic agent reports a failure in a long block that often names the wrong rank as the
root cause: its timestamps are whole seconds, taken when the agent *noticed* an exit, and ``lt.launch``'s
function workers report only one rank. So each worker also leaves two small records in a directory
the launcher made: one when it starts (its pid, rank, local rank and node) and one when it raises
(the exception, its last frame, the time to the microsecond, and whether it is only the echo of a
peer's death, a broken collective). The launcher watches each worker's pid and notes when and how it
ended (``waitid`` with ``WNOWAIT``, which leaves the exit status to the agent). The rank that failed
*on its own* earliest is the first: an exception or a signal before a broken collective, which comes
before a rank the agent stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

DIRECTORY = "LTRANSFORM_FAILURE_DIR"  # where ``ltransform run``'s workers leave their records
_RAISED, _ECHO, _STOPPED = 0, 1, 2  # the order in which failures are blamed
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # what the agent (or torch.multiprocessing) stops ranks with


@attrs.frozen(kw_only=True)
class Failure:
    """How one rank ended: ``reason`` is ``"ValueError: bad batch (train.py:42, in step)"``,
    ``"killed by signal SIGKILL"`` or ``"exited with code 3 without a Python exception"``;
    ``exitcode`` as ``subprocess`` gives it (negative: a signal)."""

    rank: int
    local_rank: int | None
    node: int | None
    time: float
    exitcode: int | None
    reason: str
    short: str  # the reason, cut to fit a list of the other ranks
    blame: int  # _RAISED, _ECHO or _STOPPED
    traceback_file: str | None = None
    raised_code: int | None = None  # an exception's exit status: 1, or SystemExit's code
    preempted: int | None = None  # lt.Preempted's exit code, if that is how it stopped

    def exit_status(self) -> int:
        """The status a launcher exits with for this failure: 1 for an exception (the process
        itself may have ended later, stopped by the agent), else its code, or 128 + its signal."""
        if self.raised_code:
            return self.raised_code
        if self.exitcode is None or self.exitcode == 0:
            return 1
        return 128 - self.exitcode if self.exitcode < 0 else self.exitcode


# -- in each worker ----------------------------------------------------------------------------

def _identity() -> tuple[int, int, int, int]:
    """(restart attempt, rank, local rank, node) of this worker, from the agent's variables."""
    get = os.environ.get
    return (int(get("TORCHELASTIC_RESTART_COUNT", "0")), int(get("RANK", "0")), int(get("LOCAL_RANK", "0")),
            int(get("GROUP_RANK", "0")))


def started(directory: str) -> None:
    """Leave this worker's pid for the launcher, which watches for its exit."""
    attempt, rank, local_rank, node = _identity()
    _write(os.path.join(directory, f"{attempt}-{rank}.pid"),
           {"pid": os.getpid(), "local_rank": local_rank, "node": node})


def record(error: BaseException, directory: str | None) -> None:
    """Leave ``error`` for the launcher: in ``directory`` (ours) and in ``TORCHELASTIC_ERROR_FILE``
    (torch's format, which the agent reads into ``ProcessFailure``); keeps the full traceback."""
    from ltransform.distributed import env

    now = time.time()
    formatted = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    torch_file = os.environ.get("TORCHELASTIC_ERROR_FILE") or None
    if torch_file:
        _write(torch_file, {"message": {"message": f"{type(error).__name__}: {error}",
                                        "extraInfo": {"py_callstack": formatted, "timestamp": str(int(now))}}})
    if directory is None:
        return
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""
    lines = [re.sub(r"^\[[^\]]*\] ", "", line) for line in str(error).strip().splitlines()]  # gloo's "[pair.cc:553] "
    name = type(error).__name__
    if isinstance(error, SystemExit):
        blame = _STOPPED if name == "Preempted" else _RAISED
    elif isinstance(error, KeyboardInterrupt):  # SIGINT: torch.multiprocessing stops ranks with it
        blame = _STOPPED
    else:
        echo = isinstance(error, env.CollectiveError) or env.collective_error(error, "a collective") is not None
        blame = _ECHO if echo else _RAISED
    attempt, rank, _, _ = _identity()
    _write(os.path.join(directory, f"{attempt}-{rank}.json"), {
        "time": now, "type": name, "message": lines[0] if lines else "", "where": where, "blame": blame,
        "code": error.code if isinstance(error, SystemExit) else 1, "traceback_file": torch_file})


def _write(path: str, data: Mapping[str, Any]) -> None:
    """Write aside and rename: the launcher never reads half a record."""
    with contextlib.suppress(OSError):  # a record lost must not hide the error itself
        with open(f"{path}.partial", "w") as file:
            json.dump(data, file)
        os.replace(f"{path}.partial", path)


# -- in the launcher ---------------------------------------------------------------------------

class Exits:
    """Notes when and how each worker that left a pid in ``directory`` ended: ``ended[(attempt,
    rank)] = (time, exitcode)``. Only the launcher's own children can be watched (fork and spawn
    workers, and ``ltransform run``'s; not forkserver's): for others ``ended`` stays empty."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.ended: dict[tuple[int, int], tuple[float, int]] = {}
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._scanner = threading.Thread(target=self._scan, name="ltransform-exits", daemon=True)
        self._waiters: list[threading.Thread] = []

    def __enter__(self) -> Exits:
        if hasattr(os, "waitid"):
            self._scanner.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._scanner.is_alive():
            self._scanner.join()
        deadline = time.monotonic() + 1.0  # the last exits, seen by the agent a moment ago
        for waiter in self._waiters:
            waiter.join(max(0.0, deadline - time.monotonic()))

    def _scan(self) -> None:
        while not self._stop.wait(0.02):
            for name in os.listdir(self.directory):
                if name.endswith(".pid") and name not in self._seen:
                    self._seen.add(name)
                    pid = _read(self.directory, name).get("pid")
                    if pid is None:
                        continue
                    attempt, rank = map(int, name.removesuffix(".pid").split("-"))
                    waiter = threading.Thread(target=self._wait, args=((attempt, rank), pid), daemon=True,
                                              name=f"ltransform-exit-{rank}")
                    waiter.start()
                    self._waiters.append(waiter)

    def _wait(self, key: tuple[int, int], pid: int) -> None:
        try:  # WNOWAIT: the child stays waitable, for the agent that reaps it
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        except OSError:  # not our child (forkserver), or reaped already
            return
        if info is not None:
            killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
            self.ended[key] = (time.time(), -info.si_status if killed else info.si_status)


@contextlib.contextmanager
def quiet_agent(restarts: int = 0) -> Iterator[None]:
    """While the agent runs, cut its "failed (exitcode ...)" log records to their one line (not a
    traceback of torch's internals) for the ``restarts`` failures it restarts the group after, and
    drop the last one, which ends the run: our summary replaces it (for scripts it may name the
    wrong rank)."""
    logger = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    seen = [0]

    def keep(entry: logging.LogRecord) -> bool:
        if not str(entry.msg).startswith("failed (exitcode"):
            return True
        seen[0] += 1
        entry.exc_info, entry.exc_text = None, None
        return seen[0] <= restarts

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def gather(directory: str, reported: Mapping[int, Any], exits: Exits | None = None) -> list[Failure]:
    """Every failed rank of the last attempt, the first to fail first. ``reported`` is the
    agent's ``ChildFailedError.failures`` (rank to ``ProcessFailure``)."""
    names = [name for name in os.listdir(directory) if name.endswith((".pid", ".json"))]
    attempts = [int(name.split("-")[0]) for name in names]
    attempt = max(attempts, default=0)
    ranks = {int(name.split("-")[1].split(".")[0]) for name in names if name.startswith(f"{attempt}-")}
    ended = {rank: end for (tried, rank), end in (exits.ended.items() if exits else ()) if tried == attempt}
    found = []
    for rank in sorted(ranks | set(reported) | set(ended)):
        failure = _failure(rank, _read(directory, f"{attempt}-{rank}.json"), _read(directory, f"{attempt}-{rank}.pid"),
                           reported.get(rank), ended.get(rank))
        if failure is not None:
            found.append(failure)
    return sorted(found, key=lambda f: (f.blame, f.time, f.rank))


def _read(directory: str, name: str) -> dict[str, Any]:
    try:
        with open(os.path.join(directory, name)) as file:
            return json.load(file)
    except (OSError, ValueError):
        return {}


def _failure(rank: int, raised: dict[str, Any], start: dict[str, Any], reported: Any,
             ended: tuple[float, int] | None) -> Failure | None:
    exitcode = ended[1] if ended else getattr(reported, "exitcode", None)
    local_rank = start.get("local_rank", getattr(reported, "local_rank", None))
    if raised:
        exception = f"{raised['type']}: {raised['message']}".rstrip(": ")
        short = exception if len(exception) <= 80 else exception[:77] + "..."
        status = raised.get("code", 1) if isinstance(raised.get("code", 1), int) else 1
        code = status if raised["type"] == "Preempted" else None
        return Failure(rank=rank, local_rank=local_rank, node=start.get("node"), time=raised["time"],
                       exitcode=exitcode, reason=exception + ("" if code else raised["where"]), short=short,
                       blame=raised["blame"], traceback_file=raised.get("traceback_file"), raised_code=status,
                       preempted=code)
    if not exitcode:  # finished (or never seen to fail)
        return None
    when = ended[0] if ended else float(getattr(reported, "timestamp", 0) or time.time())
    if exitcode < 0:
        reason = f"killed by signal {_signal_name(-exitcode)}"
        blame = _STOPPED if -exitcode in _STOP_SIGNALS else _RAISED
    elif exitcode > 128 and exitcode - 128 in _STOP_SIGNALS:  # an lt.run stopping on the agent's signal
        reason, blame = f"exited with code {exitcode} (128 + {_signal_name(exitcode - 128)})", _STOPPED
    else:
        reason, blame = f"exited with code {exitcode} without a Python exception", _RAISED
    torch_file = getattr(reported, "error_file", None)
    return Failure(rank=rank, local_rank=local_rank, node=start.get("node"), time=when, exitcode=exitcode,
                   reason=reason, short=reason, blame=blame,
                   traceback_file=torch_file if torch_file and os.path.isfile(torch_file) else None)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def summary(found: list[Failure], who: str, node: int = 0) -> str:
    """One paragraph: the first failure, when, why and where; the others in a clause; where the
    full traceback is."""
    first, rest = found[0], found[1:]
    where = f"local rank {first.local_rank} on node {first.node if first.node is not None else node}"
    clock = time.strftime("%H:%M:%S", time.localtime(first.time)) + f".{int(first.time % 1 * 1000):03d}"
    text = f"{who}: rank {first.rank} failed first ({where}), at {clock}: {first.reason}."
    if rest:
        listed = "; ".join(f"rank {f.rank}: {f.short}" for f in rest[:4]) + (
            f"; and {len(rest) - 4} more" if len(rest) > 4 else "")
        text += (f" {len(rest)} other rank{'s' if len(rest) > 1 else ''} failed or "
                 f"{'were' if len(rest) > 1 else 'was'} stopped after it ({listed}).")
    if first.traceback_file:
        text += f" Full traceback: {first.traceback_file} (and in rank {first.rank}'s output above)."
    elif first.exitcode is not None and first.exitcode < 0:
        text += " No Python traceback: a signal ends a process without one"
        text += ("; SIGKILL is also what the kernel's out-of-memory killer sends (see dmesg)." if
                 first.exitcode == -signal.SIGKILL else f"; rank {first.rank}'s output is above.")
    else:
        text += f" No Python traceback was recorded; rank {first.rank}'s output is above."
    return text
