"""Training-quality hooks: stop when a monitored value stops improving (``lt.early_stopping``)
and keep the checkpoints of its K best values and the last (``lt.checkpoint_best``).

Both act on *fresh* values only: the value logged at this very step (``run.fresh``), so a
validation loss computed at step 40 counts once, not again at steps 41, 42, ... They are due
where a value can be fresh: every ``eval_every`` and ``log_every`` steps and at the end of each
epoch (where evaluation runs when ``eval_every`` is None). A logged value is the same on every
rank (train metrics and ``val_*`` results are averaged across ranks before they are logged), and
these hooks decide from nothing else, so every rank stops after the same step and takes part
in the same saves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

from ltransform.core.state import extras, set_field
from ltransform.runner.hooks import NEVER, say, stop
from ltransform.runner.metrics import to_floats

MODES = ("min", "max")


@attrs.frozen(kw_only=True)
class Monitor:
    """Which logged value a hook watches, which way is better, and by how much it must move."""

    name: str
    mode: str
    min_delta: float = 0.0

    def better(self, value: float, than: float | None) -> bool:
        """Whether ``value`` improves on ``than`` (None: nothing yet) by more than ``min_delta``."""
        if math.isnan(value):
            return False
        if than is None:
            return True
        return value < than - self.min_delta if self.mode == "min" else value > than + self.min_delta


def check_monitor(call: str, name: Any, mode: Any, min_delta: Any = 0.0) -> Monitor:
    """A checked :class:`Monitor`; errors name ``call``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"{call}: monitor must be the name of a logged value (e.g. 'val_loss'), got {name!r}")
    if mode not in MODES:
        raise ValueError(f"{call}: unknown mode {mode!r}; expected one of: 'min' (lower is better), 'max'")
    if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
        raise ValueError(f"{call}: min_delta must be a number >= 0 (an absolute change), got {min_delta!r}")
    return Monitor(name=name, mode=mode, min_delta=float(min_delta))


def positive(call: str, option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{call}: {option} must be a positive int, got {value!r}")
    return value


class Watch:
    """Where a monitored value can be fresh (evaluation and log points), and reading it there,
    once per step."""

    def __init__(self, monitor: Monitor, call: str) -> None:
        self.monitor, self.call = monitor, call
        self.every: tuple[int, ...] = ()
        self.read_at = -1  # the step whose value was taken last
        self.known = False  # the name has been seen

    def start(self, run: Any) -> None:
        name = self.monitor.name
        if name.startswith("val_") and run.eval_step is None and not run.eval_every:
            raise ValueError(f"{self.call}: monitor {name!r} is an evaluation result, but lt.run has no eval_step; "
                             f"pass eval_step= and eval_data= to lt.run (or eval_every= to a hook of yours that "
                             f"logs it with run.log), or monitor a training metric such as 'loss'")
        if not name.startswith("val_") and not run.log_every:
            raise ValueError(f"{self.call}: monitor {name!r} is read at log points, but lt.run(log_every=None) "
                             f"has none; set log_every")
        self.every = tuple(n for n in (run.eval_every, run.log_every) if n)
        self.read_at = run.step  # a value logged before this run started is not this run's to count

    def next_step(self, step: int) -> float:
        return min((step // n + 1) * n for n in self.every) if self.every else NEVER

    def read(self, run: Any) -> float | None:
        """The monitored value if it is fresh at this step and not taken yet, else None.

        Raises:
            ValueError: the value should be here (evaluation ran / a log point) and has never
                been logged; the message lists the names that are.
        """
        now, name = run.step, self.monitor.name
        if now == self.read_at:
            return None
        value = run.fresh(name)
        at_log_point = bool(run.log_every) and now % run.log_every == 0
        if value is None and at_log_point and not run.distributed and name in run.metrics:
            value = to_floats({name: run.metrics[name]})[name]  # no logger and no bar: nothing logged it
        if value is None:
            expected = run.evaluated_at == now if name.startswith("val_") else at_log_point
            if expected and not self.known and name not in run.logged and name not in run.metrics:
                names = ", ".join(repr(n) for n in sorted({*run.logged, *run.metrics})) or "none"
                raise ValueError(f"{self.call}: monitor {name!r} is not logged; the logged values are: {names} "
                                 f"(evaluation results carry a 'val_' prefix)")
            return None
        self.known, self.read_at = True, now
        return float(value)


class EarlyStopping:
    """``lt.early_stopping``'s hook; see :func:`early_stopping`."""

    def __init__(self, monitor: Monitor, patience: int, check_finite: bool) -> None:
        self.watch = Watch(monitor, "lt.early_stopping")
        self.patience, self.check_finite = patience, check_finite
        self.key = f"lt.early_stopping({monitor.name})"  # its record in state.extra
        self.__name__ = f"early_stopping({monitor.name!r})"
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0  # checks since the last improvement
        self.stopped_at: int | None = None

    def next_step(self, step: int) -> float:
        return self.watch.next_step(step)

    def start(self, state: Any, run: Any) -> None:
        self.watch.start(run)
        self.best, self.best_step, self.bad, self.stopped_at = None, None, 0, None
        saved = extras(state).get(self.key)
        if isinstance(saved, Mapping) and saved.get("at", math.inf) <= run.step:  # resumed: go on counting
            self.best, self.best_step, self.bad = saved["best"], saved["best_step"], saved["bad"]

    def __call__(self, state: Any, run: Any) -> Any:
        value = self.watch.read(run)
        if value is None:
            return None
        name, now = self.watch.monitor.name, run.step
        reason = None
        if self.check_finite and not math.isfinite(value):
            reason = f"{name} is {value}"
        elif self.watch.monitor.better(value, self.best):
            self.best, self.best_step, self.bad = value, now, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                by = f" by more than {self.watch.monitor.min_delta:g}" if self.watch.monitor.min_delta else ""
                reason = (f"{name} has not improved{by} on its best, {self.best:.6g} at step {self.best_step}, "
                          f"in {self.bad} checks (patience={self.patience})")
        state = self._remember(state, now)
        if reason is None:
            return state
        self.stopped_at = now
        say(f"lt.early_stopping: stopping after step {now}: {reason}")
        return stop(state)

    epoch_end = __call__

    def _remember(self, state: Any, now: int) -> Any:
        """``state`` with this hook's counts in ``state.extra`` (so a checkpoint keeps them), if it has one."""
        extra = state.get("extra") if isinstance(state, Mapping) else getattr(state, "extra", None)
        if not isinstance(extra, Mapping):
            return state
        record = {"best": self.best, "best_step": self.best_step, "bad": self.bad, "at": now}
        return set_field(state, "extra", {**extra, self.key: record})


def early_stopping(monitor: str = "val_loss", *, patience: int = 3, mode: str = "min", min_delta: float = 0.0,
                   check_finite: bool = True) -> EarlyStopping:
    """A hook that stops ``lt.run`` once ``monitor`` has not improved for ``patience`` checks.

    A check is a fresh value of ``monitor``: one logged at this step (an evaluation every
    ``eval_every`` steps or at the end of each epoch for ``val_*`` names; a log point every
    ``log_every`` steps for training metrics such as ``loss``). A stale value is never counted
    twice. It improves when it is lower (``mode="min"``) or higher (``"max"``) than the best so
    far by more than ``min_delta``. When it stops, rank 0 says why on stderr.

    On several ranks every rank stops after the same step: logged values are averaged across
    ranks and the decision reads nothing else. Its counts (best value, checks without
    improvement) are kept in ``state.extra`` (for a state that has one, like ``lt.State``), so a
    checkpoint saved after its check and ``lt.run(resume=...)`` go on counting where they were.

    Args:
        monitor: the logged name to watch: ``"val_<metric>"`` for an evaluation result, or a
            training metric (``"loss"``).
        patience: how many checks without improvement stop the run.
        mode: ``"min"`` (lower is better) or ``"max"``.
        min_delta: the smallest change that counts as an improvement (absolute, >= 0).
        check_finite: stop at once on a NaN or infinite value.

    Returns:
        The hook, for ``lt.run(..., hooks=[...])``; after the run its ``best``, ``best_step``
        and ``stopped_at`` (None if it did not stop the run) tell what happened.

    Raises:
        ValueError: a bad option; at the start of the run, ``monitor`` names an evaluation
            result and the run has no ``eval_step``, or a training metric and ``log_every`` is
            None; at the first evaluation (or log point), ``monitor`` is not logged (the
            message lists the names that are).

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> data = [torch.randn(4, 2) for _ in range(8)]
        >>> state = lt.run(lt.train_step(lambda m, b: m(b).pow(2).mean()), state, data, progress=False,
        ...                eval_step=lt.eval_step(lambda m, b: m(b).pow(2).mean()), eval_data=data[:2],
        ...                eval_every=2, hooks=[lt.early_stopping("val_loss", patience=2)])

    Note:
        Put it before a checkpoint hook in ``hooks``, so that a checkpoint of a step holds the
        counts after that step's check. A value a hook of yours logs (``run.log``) is read where
        this hook is due, if your hook comes first.
    """
    call = "lt.early_stopping"
    if not isinstance(check_finite, bool):
        raise TypeError(f"{call}: check_finite must be True or False, got {check_finite!r}")
    watched = check_monitor(call, monitor, mode, min_delta)
    return EarlyStopping(watched, positive(call, "patience", patience), check_finite)

