"""The run context: what ``lt.run`` knows while it runs, handed to every hook explicitly."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from ltransform.core.position import Position
from ltransform.core.state import with_counters


class Run(Mapping[str, Any]):
    """The ``lt.run`` in progress, as a hook sees it (its second argument).

    It is also a read-only mapping of the latest metrics: the step's own (tensors, detached)
    and the latest evaluation's (``val_*`` floats), so a ``hook(state, metrics)`` written for
    metrics reads ``metrics["loss"]``. What a hook may read:

    - ``step``, ``micro``, ``epoch``: the counters now; ``max_steps``, ``max_epochs``, ``total``
      (optimizer steps planned, None if unknown), ``log_every``, ``eval_every``.
    - ``metrics``: the last step's metrics (tensors; reading them as floats is a host sync).
    - ``logged``: every value logged so far through :meth:`log`, by name, as ``(step, value)``;
      :meth:`fresh` gives a value only at the step it was logged at (a new evaluation result,
      not a stale one). Logged values are the same on every rank (averaged across ranks).
    - ``evaluated``: the latest evaluation's metrics, and ``evaluated_at`` its step.
    - ``batch``: the last batch (at an event), ``precision``: the step's precision name,
      ``position``: the data position checkpoints record, ``distributed``: several processes.
    - ``eval_step`` and ``eval_data``, ``bound`` (the bound step), ``data``.
    - ``error``: the exception that stopped the loop, for ``lt.on_exception`` hooks (else None).
    """

    def __init__(self, *, bound: Any, data: Iterable[Any], max_steps: int | None, max_epochs: int | None,
                 log_every: int | None, eval_every: int | None, loggers: list[Any], distributed: bool,
                 precision: str | None, total: int | None) -> None:
        self.bound, self.data = bound, data
        self.max_steps, self.max_epochs, self.total = max_steps, max_epochs, total
        self.log_every, self.eval_every = log_every, eval_every
        self.loggers = loggers  # empty on ranks other than 0
        self.distributed = distributed
        self.precision = precision
        self.position = Position(precision)  # where checkpoints see the data position
        self.resume_at: dict[str, Any] | None = None  # a loaded checkpoint's data position
        self.eval_step: Any = None
        self.eval_data: Iterable[Any] | None = None
        self.state: Any = None  # the state as last returned by the step (its counters may lag)
        self.step = self.micro = self.epoch = 0
        self.metrics: Mapping[str, Any] = {}
        self.batch: Any = None
        self.evaluated: dict[str, float] = {}
        self.evaluated_at: int | None = None
        self.logged: dict[str, tuple[int, float]] = {}
        self.preempted: tuple[Any, ...] = ()  # the signals the ranks agreed to stop on
        self.out_of_time = False  # the ranks stopped because rank 0's clock passed max_time
        self.doing: str | None = None  # what an event is doing, for an error in a collective
        self.error: BaseException | None = None  # the error that stopped the loop (for lt.on_exception)

    def current(self) -> Any:
        """The state with the run's counters (materialised for whoever looks at it)."""
        return with_counters(self.state, self.step, self.micro)

    def done(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    def log(self, values: Mapping[str, float], step: int | None = None) -> None:
        """Hand ``values`` (floats) to every logger (rank 0 only) at ``step`` (default: now), and
        record them in ``logged``. Call it on every rank with the same values."""
        step = self.step if step is None else step
        for name, value in values.items():
            self.logged[name] = (step, value)
        for logger in self.loggers:
            logger(values, step)

    def fresh(self, name: str) -> float | None:
        """``name``'s value if it was logged at this step, else None (stale or never logged)."""
        entry = self.logged.get(name)
        return entry[1] if entry is not None and entry[0] == self.step else None

    def shown(self) -> dict[str, float]:
        """The latest logged values, for display."""
        return {name: value for name, (_, value) in self.logged.items()}

    # the mapping of the latest metrics, for hook(state, metrics)
    def _merged(self) -> dict[str, Any]:
        return {**{k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in self.metrics.items()},
                **self.evaluated}

    def __getitem__(self, name: str) -> Any:
        return self._merged()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._merged())

    def __len__(self) -> int:
        return len(self._merged())

    def __repr__(self) -> str:
        return f"<lt.run at step {self.step}, epoch {self.epoch}: {sorted(self._merged())}>"

    def warn_empty(self) -> None:
        warnings.warn(
            f"lt.run: data yielded no batches in epoch {self.epoch}; pass a re-iterable (a list or "
            f"DataLoader), not an iterator that is used up after one pass",
            stacklevel=4,
        )
