"""The progress bar hook: a tqdm bar (terminal or Jupyter) on rank 0, showing the logged values.

It advances every few steps, the stride adapting to about ten redraws a second, so that it is
usually not the next event. While a terminal bar is shown, what hooks print (stdout, stderr,
warnings) and the root logger's console output go through ``tqdm.write``: above the bar, not
onto its line."""

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
        self._streams: tuple[Any, Any] | None = None
        self._logging: Any = None
        if "notebook" not in type(self.bar).__module__:  # a Jupyter widget is not broken by prints
            from tqdm.contrib import DummyTqdmFile
            from tqdm.contrib.logging import logging_redirect_tqdm

            # prints and warnings (sys.stdout/stderr as they are now) and the root logger's console
            # handlers write above the bar (the bar itself keeps the stderr it was made with)
            self._streams = (sys.stdout, sys.stderr)
            sys.stdout, sys.stderr = DummyTqdmFile(sys.stdout), DummyTqdmFile(sys.stderr)
            self._logging = logging_redirect_tqdm()
            self._logging.__enter__()

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
        if self._logging is not None:
            self._logging.__exit__(None, None, None)
            self._logging = None
        if self._streams is not None:
            proxies = (sys.stdout, sys.stderr)
            (sys.stdout, sys.stderr), self._streams = self._streams, None
            for proxy, stream in zip(proxies, (sys.stdout, sys.stderr)):
                rest = "".join(getattr(proxy, "_buf", []))
                if rest:  # a last line written without a newline
                    stream.write(rest)
