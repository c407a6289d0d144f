"""Profiling hooks: ``lt.profile`` (``torch.profiler`` traces of chosen steps, for TensorBoard or
Chrome/Perfetto) and ``lt.memory_snapshot`` (a CUDA allocator history for PyTorch's memory viz).

Both are due only while they record: after that they are never the next event, so they cost
nothing for the rest of the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ltransform.distributed import env
from ltransform.runner.hooks import NEVER
from ltransform.runner.hooks import say


def _count(call: str, option: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{call}: {option} must be an int >= {least}, got {value!r}")
    return value


class Profile:
    """``lt.profile``'s hook; see :func:`profile`."""

    __name__ = "profile"
    writes_files = True  # left out of a dry run
    reads_state = False

    def __init__(self, dir: Path, schedule: dict[str, int], skip_first: int, options: dict[str, Any]) -> None:
        self.dir, self.schedule, self.skip_first, self.options = dir, schedule, skip_first, options
        self.total = (schedule["wait"] + schedule["warmup"] + schedule["active"]) * schedule["repeat"]
        self.profiler: Any = None
        self.begin_at: float = NEVER  # the step after which the profiler starts
        self.steps = 0  # profiler steps done
        self.finished = False
        self.first = 0  # the step ProfilerStep#0 is

    def start(self, state: Any, run: Any) -> None:
        self.begin_at, self.steps, self.finished = run.step + self.skip_first, 0, False
        if not self.skip_first:
            self._begin(run)

    def next_step(self, step: int) -> float:
        if self.finished:
            return NEVER
        return step + 1 if self.profiler is not None else max(self.begin_at, step + 1)

    def __call__(self, state: Any, run: Any) -> None:
        if self.profiler is None:
            if run.step >= self.begin_at:
                self._begin(run)
            return
        self.profiler.step()
        self.steps += 1
        if self.steps >= self.total:
            self._finish()

    def close(self, run: Any = None) -> None:
        if self.profiler is not None:  # the run ended (or failed) inside the schedule: what was recorded
            self._finish()

    def _begin(self, run: Any) -> None:
        from torch.profiler import profile, schedule, tensorboard_trace_handler

        self.dir.mkdir(parents=True, exist_ok=True)
        self.first = run.step + 1
        write = tensorboard_trace_handler(str(self.dir), worker_name=f"rank{env.rank()}")
        self.profiler = profile(schedule=schedule(**self.schedule), on_trace_ready=write, **self.options)
        self.profiler.start()

    def _finish(self) -> None:
        profiler, self.profiler, self.finished = self.profiler, None, True
        profiler.stop()
        spans = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in self.recorded())
        say(f"lt.profile: recorded steps {spans or 'none'} (ProfilerStep#0 is step {self.first}) into "
            f"{str(self.dir)!r}, a file per rank and cycle: open them with TensorBoard's profiler plugin or "
            f"ui.perfetto.dev")

    def recorded(self) -> list[tuple[int, int]]:
        """The optimizer steps recorded so far: ``(first, last)`` of each cycle's active steps."""
        wait, warmup, active = self.schedule["wait"], self.schedule["warmup"], self.schedule["active"]
        cycle, out = wait + warmup + active, []
        for start in range(0, self.steps, cycle):
            lo, hi = start + wait + warmup, min(start + cycle, self.steps) - 1
            if lo <= hi:
                out.append((self.first + lo, self.first + hi))
        return out


def profile(dir: str | os.PathLike[str], *, wait: int = 1, warmup: int = 1, active: int = 3, repeat: int = 1,
            skip_first: int = 0, activities: Iterable[Any] | None = None, record_shapes: bool = False,
            profile_memory: bool = False, with_stack: bool = False) -> Profile:
    """A hook that runs ``torch.profiler`` over chosen optimizer steps and writes their traces to ``dir``.

    After ``skip_first`` steps of the run the profiler starts, and each optimizer step is one
    profiler step of torch's schedule: ``wait`` steps idle, ``warmup`` steps traced and
    discarded, ``active`` steps recorded, the cycle ``repeat`` times; each cycle writes a trace
    file ``dir/rank<R>.<time>.pt.trace.json`` per rank (Chrome trace format: TensorBoard's
    profiler plugin, ui.perfetto.dev or chrome://tracing read it), its steps marked
    ``ProfilerStep#k``, k counted from the step after the profiler started. With the defaults
    the run's steps 3, 4 and 5 are recorded. The hook is due every step only while the profiler
    runs, then never; a run that ends inside the schedule writes what was recorded.

    Args:
        dir: where the trace files go.
        wait: ``torch.profiler.schedule``'s ``wait``: steps idle.
        warmup: ``torch.profiler.schedule``'s ``warmup``: steps traced and discarded.
        active: ``torch.profiler.schedule``'s ``active``: steps recorded.
        repeat: ``torch.profiler.schedule``'s ``repeat``: cycles (>= 1: it ends).
        skip_first: steps of the run before the profiler starts (they cost nothing).
        activities: ``torch.profiler.ProfilerActivity`` values; None: torch's default (the CPU,
            and CUDA where available).
        record_shapes: ``torch.profiler.profile``'s.
        profile_memory: ``torch.profiler.profile``'s.
        with_stack: ``torch.profiler.profile``'s.

    Returns:
        The hook, for ``lt.run(..., hooks=[...])``.

    Example:
        >>> import os, tempfile, torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> data = [torch.randn(4, 2) for _ in range(6)]
        >>> root = tempfile.mkdtemp()
        >>> hook = lt.profile(root, wait=1, warmup=1, active=2)
        >>> state = lt.run(lt.train_step(lambda m, b: m(b).pow(2).mean()), state, data, progress=False, hooks=[hook])
        >>> hook.recorded(), [name.startswith("rank0.") for name in os.listdir(root)]
        ([(3, 4)], [True])
    """
    call = "lt.profile"
    schedule = {"wait": _count(call, "wait", wait, 0), "warmup": _count(call, "warmup", warmup, 0),
                "active": _count(call, "active", active, 1), "repeat": _count(call, "repeat", repeat, 1)}
    options = {"activities": None if activities is None else list(activities), "record_shapes": record_shapes,
               "profile_memory": profile_memory, "with_stack": with_stack}
    return Profile(Path(dir), schedule, _count(call, "skip_first", skip_first, 0), options)


class MemorySnapshot:
    """``lt.memory_snapshot``'s hook; see :func:`memory_snapshot`."""

    __name__ = "memory_snapshot"
    writes_files = True
    reads_state = False

    def __init__(self, path: Path, steps: int, max_entries: int) -> None:
        self.path, self.steps, self.max_entries = path, steps, max_entries
        self.recording = False
        self.at: float = NEVER  # the step after which the snapshot is dumped
        self.written: Path | None = None

    def start(self, state: Any, run: Any) -> None:
        if not torch.cuda.is_available():
            say("lt.memory_snapshot: no CUDA device; nothing recorded")
            return
        torch.cuda.memory._record_memory_history(max_entries=self.max_entries)
        self.recording, self.at = True, run.step + self.steps

    def next_step(self, step: int) -> float:
        return self.at if self.recording and self.at > step else NEVER

    def __call__(self, state: Any, run: Any) -> None:
        if self.recording:
            self._dump(run.step)

    def close(self, run: Any = None) -> None:
        if self.recording:  # the run ended early or failed (an out-of-memory error): what was recorded
            self._dump(None if run is None else run.step)

    def _dump(self, step: int | None) -> None:
        self.recording = False
        path = _for_this_rank(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.cuda.memory._dump_snapshot(str(path))
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        self.written = path
        say(f"lt.memory_snapshot: wrote {str(path)!r} (up to step {step}); drag it onto "
            f"https://pytorch.org/memory_viz")


def _for_this_rank(path: Path) -> Path:
    """``path`` with ``{rank}`` filled in; on several ranks without one, ``-rank<R>`` before the suffix."""
    if "{rank}" in str(path):
        return Path(str(path).format(rank=env.rank()))
    if env.world_size() > 1:
        return path.with_name(f"{path.stem}-rank{env.rank()}{path.suffix}")
    return path


def memory_snapshot(path: str | os.PathLike[str], *, steps: int = 3, max_entries: int = 100_000) -> MemorySnapshot:
    """A hook that records the CUDA allocator's history over the run's first ``steps`` optimizer
    steps and writes it to ``path``, a pickle for https://pytorch.org/memory_viz.

    Recording starts with the run (``torch.cuda.memory._record_memory_history``) and ends once
    the snapshot is written (``torch.cuda.memory._dump_snapshot``), after step ``steps``; a run
    that ends or fails before (an out-of-memory error) writes what was recorded. On several
    ranks each writes its own: ``{rank}`` in ``path`` is replaced by the rank, or else
    ``-rank<R>`` is added before the suffix. Without CUDA it says so once and does nothing.

    Args:
        path: the snapshot file (e.g. ``"memory.pickle"``).
        steps: how many optimizer steps to record.
        max_entries: how many allocation events the history keeps (the oldest are dropped).

    Returns:
        The hook, for ``lt.run(..., hooks=[...])``; after the run its ``written`` is the file
        (None if nothing was recorded).

    Example:
        >>> import ltransform as lt
        >>> hook = lt.memory_snapshot("memory.pickle", steps=2)
    """
    call = "lt.memory_snapshot"
    return MemorySnapshot(Path(path), _count(call, "steps", steps, 1), _count(call, "max_entries", max_entries, 1))
