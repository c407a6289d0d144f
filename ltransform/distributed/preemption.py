"""Preemption: a signal (SIGTERM, SLURM's ``--signal=USR1@N``) ends ``lt.run`` after a step
every rank agrees on; ``lt.run`` then saves and exits with code 128 + the signal's number.

The signal handler only records the signal. Python runs it only when the main thread is back
in the interpreter, which a rank blocked in a collective never is; so the signal also wakes a
thread (through ``signal.set_wakeup_fd``, written by the C-level handler at once) that starts the
``stop_within`` limit. The runner checks at a cadence of about
``_PERIOD`` seconds (an event like a log point, so a step between checks costs nothing); on
several ranks each check is one asynchronous all-reduce of a few ints, started at one check
and read at the next (it completes while the steps in between run), so every rank reads the
same answer at the same step: a rank that got the signal and one that did not stop together.

The same checks carry ``lt.run(max_time=...)``'s decision: only rank 0 reads its :data:`clock`
against the deadline and sends a flag, which the all-reduce (a maximum) hands to every rank, so
rank 0's clock decides for all and every rank stops after the same step, however skewed the
other ranks' clocks are.

A process forked while the watch is installed (a ``DataLoader(num_workers>0)`` worker) forgets it
at once (``os.register_at_fork``): it closes its copy of the wakeup socket and puts back the
wakeup fd the watch replaced, so a signal it gets never reaches the parent's watch; and it ignores
the preemption signals (as it did with the watch's handler it inherited, minus the message and the
wakeup byte), so SLURM's ``--signal=USR1@N``, sent to every process of the job step, does not kill a
worker the run still reads from while it finishes its step and saves; the run ends its workers as it
stops. (A DataLoader worker then sets its own SIGTERM handler, in C: it exits on a SIGTERM not sent by
its parent, as without ``lt.run``.)
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import attrs

_PERIOD = 0.2  # seconds between checks; a check costs one small asynchronous all-reduce
clock = time.monotonic  # what the checks' pacing and lt.run's max_time read (a test may replace it)
_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}
_JOIN_TIMEOUT = 10.0  # seconds uninstall waits for the watch thread (which ends at once when woken)
# the installed watches, innermost last: what a forked child must forget (read only at a fork)
_installed: list[Watch] = []


def _signals(value: Any) -> tuple[signal.Signals, ...]:
    """Signal names (``"SIGTERM"``, ``"USR1"``), numbers or ``signal.Signals`` -> a tuple of Signals."""
    values = [value] if isinstance(value, (str, int)) else list(value)
    out = []
    for item in values:
        try:
            if isinstance(item, str):
                name = item.upper()
                sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
            else:
                sig = signal.Signals(item)
        except (KeyError, ValueError):
            raise ValueError(f"lt.Preemption: unknown signal {item!r}; give a name such as 'SIGTERM' or "
                             f"'SIGUSR1', or a signal.Signals") from None
        if sig in _UNCATCHABLE:
            raise ValueError(f"lt.Preemption: {sig.name} cannot be caught by a process; use SIGTERM or "
                             f"SIGUSR1 (e.g. SLURM's --signal=USR1@90)")
        if sig not in out:
            out.append(sig)
    return tuple(out)


@attrs.frozen(kw_only=True)
class Preemption:
    """What ``lt.run`` does on a preemption signal: finish the step, save, exit.

    On one of ``signals`` every rank stops after the same optimizer step (the first check
    after the signal, within about half a second), the run's checkpoint hook (the
    ``lt.checkpoint_sharded(dir=...)`` among ``hooks``) saves the state at that step on every
    rank, and ``lt.run`` raises :class:`Preempted`, a ``SystemExit`` with code 128 + the
    signal's number (143 for SIGTERM), so the process exits as a preempted one conventionally
    does and ``lt.run(..., resume="latest")`` continues bitwise where it stopped. The handlers
    are installed while ``lt.run`` runs (in the main thread only) and the previous ones restored,
    with the process's ``signal.set_wakeup_fd``, which a thread watches to enforce ``stop_within``
    (Python runs a handler only once the main thread leaves a blocking call, e.g. a collective).

    Args:
        signals: the signals that mean "stop and save" (names, numbers or ``signal.Signals``).
        requeue: those of ``signals`` after which rank 0 puts the SLURM job back in the queue
            (``scontrol requeue``, as Lightning's ``auto_requeue``), once the checkpoint is
            written: SLURM sends ``--signal=USR1@N`` N seconds before the time limit, while a
            SIGTERM may be a ``scancel`` that must not requeue.
        stop_within: seconds a rank may take from the signal to the step the ranks stop after
            (the next check: within about half a second, or two steps where a step takes
            longer). A rank that does not get there in time (stuck, e.g. in a hook, or in a
            collective waiting for a peer that died or hangs) exits then with the same code,
            without a checkpoint; torch's elastic agent, which also sends SIGTERM to the
            surviving ranks when it restarts a group, kills them after 30 s anyway. The save
            itself is not limited.

    Raises:
        ValueError: an unknown or uncatchable signal, or a ``requeue`` signal not in ``signals``.

    Example:
        >>> import ltransform as lt
        >>> slurm = lt.Preemption(signals=["SIGTERM", "SIGUSR1"], requeue=["SIGUSR1"])
        >>> [s.name for s in slurm.signals], slurm.stop_within
        (['SIGTERM', 'SIGUSR1'], 30.0)

    Note:
        Under SLURM, submit with ``sbatch --signal=B:USR1@90 --requeue`` (``B:`` signals the
        batch shell too) or ``srun --signal=USR1@90``; under Kubernetes, SIGTERM arrives
        ``terminationGracePeriodSeconds`` (30 s by default) before the kill.
    """

    signals: tuple[signal.Signals, ...] = attrs.field(default=("SIGTERM",), converter=_signals)
    requeue: tuple[signal.Signals, ...] = attrs.field(default=(), converter=_signals)
    stop_within: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))

    @requeue.validator
    def _check_requeue(self, _: Any, value: tuple[signal.Signals, ...]) -> None:
        missing = [s.name for s in value if s not in self.signals]
        if missing:
            raise ValueError(f"lt.Preemption: requeue names {', '.join(missing)}, which is not among "
                             f"signals {[s.name for s in self.signals]}; add it to signals")


class Preempted(SystemExit):
    """``lt.run`` stopped on a preemption signal; the exit status is 128 + the signal's number.

    Attributes:
        signal: the signal (``signal.Signals``).
        step: the optimizer step the ranks stopped after (None if they could not agree).
        checkpoint: the checkpoint written at that step, or None.
    """

    def __init__(self, message: str, sig: signal.Signals, step: int | None = None,
                 checkpoint: Any = None) -> None:
        super().__init__(128 + int(sig))
        self.message, self.signal, self.step, self.checkpoint = message, sig, step, checkpoint

    def __str__(self) -> str:
        return self.message


class Watch:
    """One ``lt.run``'s signal handlers and the agreement on when to stop.

    ``check(step)`` is called at ``next_check`` (the runner makes it one of its events) and
    returns the signals received on any rank, in the order of ``signals`` (empty: go on);
    ``final()`` is the last, blocking agreement at the end of the run. Between checks nothing
    runs, whatever the number of ranks. With a ``deadline`` (a :data:`clock` reading), ``time_up``
    becomes True at the check where every rank learns that rank 0's clock passed it: at once on
    one process, one check later (the all-reduce's answer) on several.
    """

    def __init__(self, preemption: Preemption, start: int, *, deadline: float | None = None) -> None:
        import torch.distributed as dist

        self.preemption = preemption
        self.deadline = deadline
        self.time_up = False
        self.received: list[signal.Signals] = []
        self.next_check = start + 1
        self.interval = 1
        self._last = (clock(), start)
        self._pending: Any = None  # (work, tensor) of the all-reduce started at the last check
        self._previous: dict[signal.Signals, Any] = {}
        self._stopped = threading.Event()  # set by disarm: stop_within no longer applies
        self._thread: threading.Thread | None = None  # waits for a signal's byte (see install)
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self._previous_wakeup = -1
        self._ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self._group = _cpu_group() if self._ranks > 1 else None

    def install(self) -> None:
        """Replace the handlers of the preemption signals and start the thread that enforces
        ``stop_within`` (main thread only: Python allows no other to set handlers); nothing
        without signals (a watch for ``max_time`` alone)."""
        if threading.current_thread() is not threading.main_thread() or not self.preemption.signals:
            return
        reader, writer = socket.socketpair()
        writer.setblocking(False)  # set_wakeup_fd requires it: a signal never blocks on a full buffer
        self._previous_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._sockets = (reader, writer)
        self._thread = threading.Thread(target=self._watch, args=(reader,), daemon=True,
                                        name="lt.run preemption stop_within")
        self._thread.start()
        _installed.append(self)
        try:
            for sig in self.preemption.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        except BaseException:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        """Put back the handlers and wakeup fd ``install`` replaced; end the ``stop_within`` thread."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self.disarm()
        if self._thread is None or self._sockets is None:  # (install sets both)
            return
        if self in _installed:
            _installed.remove(self)
        signal.set_wakeup_fd(self._previous_wakeup)  # (its warn_on_full_buffer cannot be read back)
        reader, writer = self._sockets
        # the thread's recv returns b"": it ends. Not by closing the writer: a forked child that
        # skipped the at-fork forgetting (a fork from C) may still hold a copy of it open
        try:
            reader.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(_JOIN_TIMEOUT)
        writer.close()
        reader.close()
        self._thread, self._sockets = None, None

    def _forget_in_child(self) -> None:
        """In a child forked while installed: close the child's copy of the wakeup socket, put back
        the wakeup fd it replaced and ignore the preemption signals (see the module's docstring)."""
        if self._sockets is not None:
            try:
                signal.set_wakeup_fd(self._previous_wakeup)
            except (ValueError, OSError):  # a fork from a thread other than the main one
                pass
            for end in self._sockets:
                end.close()
        for sig in self._previous:
            try:
                signal.signal(sig, _ignore)  # a Python handler, not SIG_IGN: an exec resets it
            except (ValueError, OSError):
                pass
        self._previous.clear()
        self._thread, self._sockets = None, None

    def disarm(self) -> None:
        """The run has reached its stop: the ``stop_within`` limit no longer applies."""
        self._stopped.set()

    def _on_signal(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if sig in self.received:
            return
        self.received.append(sig)
        if len(self.received) == 1:
            print(f"lt.run: received {sig.name} on rank {_rank()}; stopping after the current step",
                  file=sys.stderr, flush=True)

    def _watch(self, reader: socket.socket) -> None:
        """The thread: wait for a preemption signal's byte on the wakeup socket (passing every byte
        on to the wakeup fd this one replaced), then give the run ``stop_within`` seconds to
        reach its stop; ends at ``uninstall``."""
        wanted = {int(s) for s in self.preemption.signals}
        while True:
            data = reader.recv(512)
            if not data:
                return
            if self._previous_wakeup >= 0:
                try:
                    os.write(self._previous_wakeup, data)
                except OSError:
                    pass
            first = next((signal.Signals(n) for n in data if n in wanted), None)
            if first is not None:
                if not self._stopped.wait(self.preemption.stop_within):
                    self._too_late(first)
                return

    def _too_late(self, sig: signal.Signals) -> None:
        print(f"lt.run: rank {_rank()} did not reach the end of its step within "
              f"{self.preemption.stop_within:g} s of {sig.name} (stuck, or waiting for a rank that is "
              f"gone); exiting with code {128 + int(sig)} without a checkpoint. Raise "
              f"lt.Preemption(stop_within=...) if a step takes longer.", file=sys.stderr, flush=True)
        os._exit(128 + int(sig))

    def check(self, step: int) -> tuple[signal.Signals, ...]:
        """At ``next_check``: the signals every rank stops on now (empty: go on, and ``next_check``
        is set)."""
        proposal = self._proposal(step)
        if self._ranks == 1:
            self.interval = proposal
            self.next_check = step + proposal
            self.time_up = self._past_deadline()
            return self._agreed(self.received)
        agreed = self._finish()
        if agreed is not None:
            stop, self.interval, self.time_up = agreed
            if stop:
                return stop
        self._start(proposal)
        self.next_check = step + self.interval
        return ()

    def final(self) -> tuple[signal.Signals, ...]:
        """At the end of the run: the signals any rank received, agreed by all (blocking)."""
        if self._ranks == 1:
            return self._agreed(self.received)
        earlier = self._finish()
        self._start(1)
        finished = self._finish()
        assert finished is not None  # _start has just started one
        now = finished[0]
        return self._agreed([*now, *(earlier[0] if earlier else ())])

    def _proposal(self, step: int) -> int:
        """Steps until the next check, about ``_PERIOD`` seconds at the recent pace (growing at
        most twofold, so a slow first step does not space the checks out)."""
        now, (then, last) = clock(), self._last
        self._last = (now, step)
        if step <= last:
            return self.interval
        per_step = max((now - then) / (step - last), 1e-9)
        return max(1, min(int(_PERIOD / per_step), 2 * self.interval))

    def _start(self, proposal: int) -> None:
        import torch
        import torch.distributed as dist

        # [a flag per signal, rank 0's "time is up", -proposal]: the maximum over the ranks is any
        # rank's signal, rank 0's clock alone, and the smallest proposal
        flags = torch.tensor([int(s in self.received) for s in self.preemption.signals]
                             + [int(self._past_deadline() and _rank() == 0), -proposal])
        self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flags)

    def _past_deadline(self) -> bool:
        return self.deadline is not None and clock() >= self.deadline

    def _finish(self) -> tuple[tuple[signal.Signals, ...], int, bool] | None:
        """Wait for the all-reduce started at the last check: (signals received, next interval,
        whether rank 0's clock had passed the deadline)."""
        if self._pending is None:
            return None
        work, flags = self._pending
        self._pending = None
        try:
            work.wait()
        except RuntimeError as error:
            if not self.received:
                raise
            sig = self.received[0]
            raise Preempted(
                f"lt.run: {sig.name} received on rank {_rank()}, but the ranks could not agree on a step "
                f"to stop at ({_first_line(error)}); another rank is gone (torch's elastic agent "
                f"also sends SIGTERM when it restarts a group). Exiting with code {128 + int(sig)} "
                f"without a checkpoint; resume='latest' continues from the last one.", sig) from error
        values = flags.tolist()
        got = [s for s, flag in zip(self.preemption.signals, values) if flag]
        return self._agreed(got), max(1, -values[-1]), bool(values[-2])

    def _agreed(self, received: Iterable[signal.Signals]) -> tuple[signal.Signals, ...]:
        """``received`` in the order of ``signals``: the first is the one the run stops on."""
        received = set(received)
        return tuple(s for s in self.preemption.signals if s in received)


def _ignore(signum: int, frame: Any) -> None:
    """A forked child's handler of the preemption signals while the run that forked it lasts."""


def _forget_in_child() -> None:
    for watch in reversed(_installed):  # innermost first: the outermost's wakeup fd is the one left
        watch._forget_in_child()
    _installed.clear()


if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(after_in_child=_forget_in_child)


def _cpu_group() -> Any:
    """The group for the check's CPU tensor: the default one if it has a CPU backend (gloo,
    or ``cpu:gloo,cuda:nccl``), else a gloo group of the same ranks, made once per default
    group (by the first ``lt.run``, on every rank together)."""
    import torch.distributed as dist

    if "gloo" in str(dist.get_backend()) or "mpi" in str(dist.get_backend()):
        return None
    return _gloo_group(dist.group.WORLD)


@functools.lru_cache(maxsize=1)
def _gloo_group(world: Any) -> Any:
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


def now() -> float:
    """:data:`clock`'s reading (what ``lt.run``'s ``max_time`` counts from)."""
    return clock()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]
