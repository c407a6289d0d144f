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
    interval's) and at epoch ends (the epoch's). Each metric is divided by the number of step
    calls that reported it (a metric of the updates alone, such as ``grad_norm`` under
    accumulation, is the mean over the updates)."""

    def __init__(self) -> None:
        self.sums: dict[str, list[Any]] = {}  # name -> [sum, calls], since the last flush
        self.since_log: dict[str, list[Any]] = {}  # flushed, not yet logged
        self.since_epoch: dict[str, list[Any]] = {}  # flushed, not yet in an epoch's mean

    @property
    def pending(self) -> bool:
        return bool(self.sums or self.since_log)

    def around(self, call: Callable[..., Any]) -> Callable[..., Any]:
        sums = self.sums

        def step(state: Any, batch: Any, micro: int) -> Any:
            result = call(state, batch, micro)
            for name, value in result[1].items():
                if isinstance(value, torch.Tensor):
                    value = value.detach()
                    if value.dim():
                        value = value.float().mean()
                else:
                    value = float(value)
                entry = sums.get(name)
                if entry is None:
                    sums[name] = [value.float().clone() if isinstance(value, torch.Tensor) else value, 1]
                    continue
                total = entry[0]
                if isinstance(total, torch.Tensor):
                    total.add_(value)  # (a number too: no host sync)
                elif isinstance(value, torch.Tensor):  # a number so far, a tensor now: the sum moves there
                    entry[0] = value.float() + total
                else:
                    entry[0] = total + value
                entry[1] += 1
            return result

        return step

    def _flush(self) -> None:
        """Move the running sums into the interval's and the epoch's (at events only)."""
        for into in (self.since_log, self.since_epoch):
            for name, (total, calls) in self.sums.items():
                entry = into.get(name)
                into[name] = [total, calls] if entry is None else [entry[0] + total, entry[1] + calls]
        self.sums.clear()

    def interval(self) -> dict[str, Any]:
        self._flush()
        means = _divided(self.since_log)
        self.since_log = {}
        return means

    def epoch(self) -> dict[str, Any]:
        self._flush()
        means = _divided(self.since_epoch)
        self.since_epoch = {}
        return means


def _divided(sums: Mapping[str, list[Any]]) -> dict[str, Any]:
    return {name: total / calls for name, (total, calls) in sums.items()}
