"""The preemption hook: the ranks agree, at checks spaced about a fifth of a second apart, whether a
preemption signal arrived; if so the run stops after that step (``lt.run`` then saves and exits).
The same checks end a run whose ``max_time`` rank 0's clock finds used up (``lt.run`` returns)."""

from __future__ import annotations

from typing import Any

from ltransform.distributed.preemption import Preemption, Watch
from ltransform.runner.hooks import stop


class Preempting:
    __name__ = "preemption"
    reads_state = False

    def __init__(self, preemption: Preemption | None, start: int, *, deadline: float | None = None) -> None:
        # preemption=None with a max_time: the checks without signal handlers
        self.watch = Watch(preemption or Preemption(signals=()), start, deadline=deadline)
        self.watch.install()

    def next_step(self, step: int) -> int:
        return self.watch.next_check

    def __call__(self, state: Any, run: Any) -> Any:
        run.doing = "the preemption check (an all_reduce)"
        run.preempted = self.watch.check(run.step)
        if not run.preempted:
            if self.watch.time_up:  # rank 0's clock passed max_time: every rank stops after this step
                run.out_of_time = True
                return stop()
            return None
        self.watch.disarm()  # the ranks reached the agreed stop: stop_within no longer applies to the saves
        return stop()

    def close(self, run: Any = None) -> None:
        self.watch.uninstall()
