"""The logging hook: at log points, the step's metrics as floats (averaged across ranks), the
learning rate and the epoch, handed to the loggers through ``run.log``."""

from __future__ import annotations

from typing import Any

from ltransform.core.inventory import inventory
from ltransform.runner.hooks import cadence_next
from ltransform.runner.metrics import mean_across_ranks, to_floats


class Logging:
    """Log the training metrics every ``every`` optimizer steps and at the end of the run.

    Metrics stay tensors between log points; here they are converted in one host sync (one
    collective on several ranks, where every rank takes part). With no logger and no progress
    bar on one process nothing is converted at all.
    """

    __name__ = "logging"

    def __init__(self, every: int | None, *, needed: bool) -> None:
        self.every = every
        self.needed = needed  # someone reads the values (a logger, the bar, another rank)
        self.next_step = cadence_next(every)
        self.logged_at = -1
        self._optimizer: Any = None  # the first optimizer of the state, for "lr"
        self._found_for: Any = None  # the binding it was looked up for (a new one: look again)

    def __call__(self, state: Any, run: Any) -> None:
        self.logged_at = run.step
        metrics = run.metrics
        if run.distributed:  # every rank takes part in the collective, whether or not it logs
            values = mean_across_ranks(metrics)
        elif self.needed:
            values = to_floats(metrics)
        else:
            return  # nobody reads them: no host sync at all on one rank
        if run.bound is not self._found_for:  # the state's objects are the binding's: walk it once per binding
            self._found_for = run.bound
            self._optimizer = next(iter(inventory(state).optimizers.values()), None)
        if self._optimizer is not None:
            values["lr"] = float(self._optimizer.param_groups[0]["lr"])
        values["epoch"] = run.epoch
        run.log(values)

    def end(self, state: Any, run: Any) -> None:
        if self.every and run.metrics and self.logged_at != run.step:
            self(state, run)
