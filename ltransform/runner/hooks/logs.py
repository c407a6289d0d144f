"""The logging hook: at log points, the step's metrics as floats (averaged across ranks), the
learning rate and the epoch, handed to the loggers through ``run.log``; with ``reduce="mean"``,
each metric's mean over the steps since the last log point, and over each epoch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ltransform.core.inventory import inventory
from ltransform.runner.hooks import cadence_next
from ltransform.runner.metrics import mean_across_ranks, to_floats


class Logging:
    """Log the training metrics every ``every`` optimizer steps and at the end of the run.

    Metrics stay tensors between log points; here they are converted in one host sync (one
    collective on several ranks, where every rank takes part). With no logger and no progress
    bar on one process nothing is converted at all.

    ``reduce="mean"``: every step call's metrics are added to running sums where they are (on
    the device, no host sync; :class:`_Means`), and a log point logs the mean since the last one;
    each epoch's end logs the epoch's means as ``<name>_epoch`` (Lightning's ``on_epoch=True``).
    """

    __name__ = "logging"

    def __init__(self, every: int | None, *, needed: bool, reduce: str = "last") -> None:
        self.every = every
        self.needed = needed  # someone reads the values (a logger, the bar, another rank)
        self.means = _Means() if reduce == "mean" and every else None
        if self.means is not None:  # (a hook with epoch_end makes the loop hand it the state: only then)
            self.epoch_end = self._log_epoch_means
        self.next_step = cadence_next(every)
        self.logged_at = -1
        self._optimizer: Any = None  # the first optimizer of the state, for "lr"
        self._found_for: Any = None  # the binding it was looked up for (a new one: look again)

    def around_step(self, call: Callable[..., Any]) -> Callable[..., Any]:
        """The loop's step call, adding each call's metrics to the running sums (``reduce="mean"``)."""
        return call if self.means is None else self.means.around(call)

    def __call__(self, state: Any, run: Any) -> None:
        self.logged_at = run.step
        metrics = run.metrics if self.means is None else self.means.interval()
        values = self._floats(metrics, run)
        if values is None:
            return  # nobody reads them: no host sync at all on one rank
        if run.bound is not self._found_for:  # the state's objects are the binding's: walk it once per binding
            self._found_for = run.bound
            self._optimizer = next(iter(inventory(state).optimizers.values()), None)
        if self._optimizer is not None:
            values["lr"] = float(self._optimizer.param_groups[0]["lr"])
        values["epoch"] = run.epoch
        run.log(values)

    def _floats(self, metrics: Mapping[str, Any], run: Any) -> dict[str, float] | None:
        if run.distributed:  # every rank takes part in the collective, whether or not it logs
            return mean_across_ranks(metrics)
        if self.needed:
            return to_floats(metrics)
        return None

    def _log_epoch_means(self, state: Any, run: Any) -> None:
        assert self.means is not None
        values = self._floats(self.means.epoch(), run)
        if values:
            run.log({f"{name}_epoch": value for name, value in values.items()})

    def end(self, state: Any, run: Any) -> None:
        if self.every and run.metrics and self.logged_at != run.step:
            if self.means is None or self.means.pending:
                self(state, run)


class _Means:
    """Running sums of the step's metrics, kept where the metrics are: one in-place add per
    tensor metric per step call, no host sync; the sums become means at log points (the
    interval's) and at epoch ends (the epoch's)."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}  # since the last flush: what each step call adds to
        self.count = 0
        self.since_log: dict[str, Any] = {}  # flushed, not yet logged / not yet in an epoch's mean
        self.logs_count = 0
        self.since_epoch: dict[str, Any] = {}
        self.epoch_count = 0

    @property
    def pending(self) -> bool:
        return bool(self.count or self.logs_count)

    def around(self, call: Callable[..., Any]) -> Callable[..., Any]:
        sums = self.sums

        def step(state: Any, batch: Any, micro: int) -> Any:
            result = call(state, batch, micro)
            metrics = result[1]
            for name, value in metrics.items():
                total = sums.get(name)
                if total is None:
                    sums[name] = (value.detach().float().mean().clone() if isinstance(value, torch.Tensor)
                                  else float(value))
                elif isinstance(total, torch.Tensor):
                    total.add_(value.detach().float().mean() if value.dim() else value.detach())
                else:
                    sums[name] = total + float(value)
            self.count += 1
            return result

        return step

    def _flush(self) -> None:
        """Move the running sums into the interval's and the epoch's (at events only)."""
        for into in (self.since_log, self.since_epoch):
            for name, total in self.sums.items():
                into[name] = total if name not in into else into[name] + total
        self.logs_count += self.count
        self.epoch_count += self.count
        self.sums.clear()
        self.count = 0

    def interval(self) -> dict[str, Any]:
        self._flush()
        means = _divided(self.since_log, self.logs_count)
        self.since_log, self.logs_count = {}, 0
        return means

    def epoch(self) -> dict[str, Any]:
        self._flush()
        means = _divided(self.since_epoch, self.epoch_count)
        self.since_epoch, self.epoch_count = {}, 0
        return means


def _divided(sums: Mapping[str, Any], count: int) -> dict[str, Any]:
    return {name: total / count for name, total in sums.items()} if count else {}
