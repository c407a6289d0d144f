"""The evaluation hook of ``lt.run``: ``lt.evaluate`` every ``every`` steps or at each epoch's end."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ltransform.runner.evaluate import weighted_means
from ltransform.runner.hooks import cadence_next


class Evaluation:
    """Evaluate every ``every`` optimizer steps, or at the end of each epoch (``every=None``).

    The results (``val_*``) are logged at the step they are computed (``run.fresh`` tells them
    from stale ones) and kept in ``run.evaluated``. ``limit``: at most this many batches per
    rank each time (``lt.run(limit_eval_batches=...)``, ``lt.evaluate(limit=...)``)."""

    __name__ = "evaluation"

    def __init__(self, eval_step: Any, data: Iterable[Any], every: int | None, *, limit: int | None = None) -> None:
        self.eval_step, self.data, self.every, self.limit = eval_step, data, every, limit
        self.next_step = cadence_next(every)

    def __call__(self, state: Any, run: Any) -> None:
        run.doing = "evaluation"
        # lt.evaluate's loop: the data was split per rank and its length checked once, by lt.run
        results = weighted_means(self.eval_step, state, self.data, limit=self.limit, average=run.distributed)
        values = {f"val_{k}": v for k, v in results.items()}
        run.evaluated, run.evaluated_at = values, run.step
        run.log(values)

    def epoch_end(self, state: Any, run: Any) -> None:
        if self.every is None:
            self(state, run)


def evaluate(eval_step: Any, state: Any, data: Iterable[Any], *, average: bool | None = None) -> dict[str, float]:
    """``lt.evaluate``'s loop over per-rank ``data`` (kept under this name for callers of it)."""
    return weighted_means(eval_step, state, data, average=average)
