"""The progress bar hook: a tqdm bar (terminal or Jupyter) on rank 0, showing the logged values.

It advances every few steps, the stride adapting to about ten redraws a second, so that it is
usually not the next event. While a terminal bar is shown, what hooks print goes through
``tqdm.write`` (above the bar, not onto its line)."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    __name__ = "progress"
    reads_state = False

    def __init__(self, total: int | None, initial: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.at = initial
        self.stride = 1
        self._time = time.monotonic()
        self._shown: dict[str, str] = {}
        self._stdout = None
        if "notebook" not in type(self.bar).__module__:  # a Jupyter widget is not broken by prints
            from tqdm.contrib import DummyTqdmFile

            self._stdout, sys.stdout = sys.stdout, DummyTqdmFile(sys.stdout)

    def next_step(self, step: int) -> int:
        return self.at + self.stride

    def __call__(self, state: Any, run: Any) -> None:
        now = run.step
        self.bar.update(now - self.at)
        self.at = now
        t = time.monotonic()
        if t - self._time < 0.1:
            self.stride = min(2 * self.stride, 1024)
        elif t - self._time > 0.5 and self.stride > 1:
            self.stride //= 2
        self._time = t
        self._show(run)

    def _show(self, run: Any) -> None:
        shown = {k: f"{v:.4g}" for k, v in run.shown().items() if k != "epoch" and isinstance(v, (int, float))}
        if shown != self._shown:
            self._shown = shown
            self.bar.set_postfix(shown, refresh=False)

    def end(self, state: Any, run: Any) -> None:
        self._show(run)

    def close(self, run: Any = None) -> None:
        if run is not None:
            self.bar.update(run.step - self.at)
            self.at = run.step
        self.bar.close()
        if self._stdout is not None:
            proxy, sys.stdout, self._stdout = sys.stdout, self._stdout, None
            rest = "".join(getattr(proxy, "_buf", []))
            if rest:  # a last line printed without a newline
                sys.stdout.write(rest)
