"""Loggers: any callable ``(metrics: dict[str, float], step: int)``; CSV and TensorBoard here."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class CSVLogger:
    """Write metrics to ``<dir>/metrics.csv``, one row per log call, one column per metric.

    A metric first seen later (e.g. ``val_loss``) adds a column; the file is rewritten then.

    Example:
        >>> import tempfile, ltransform as lt
        >>> log = lt.CSVLogger(tempfile.mkdtemp()); log({"loss": 1.5}, step=10)
        >>> log.path.read_text().splitlines()
        ['step,loss', '10,1.5']
    """

    def __init__(self, dir: str | os.PathLike[str], filename: str = "metrics.csv") -> None:
        self.path = Path(dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._columns: list[str] = ["step"]
        self._rows: list[dict[str, Any]] = []

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        row = {"step": step, **metrics}
        self._rows.append(row)
        new = [k for k in row if k not in self._columns]
        if new or len(self._rows) == 1:
            self._columns += new
            self._write("w", self._rows, header=True)
        else:
            self._write("a", [row], header=False)

    def _write(self, mode: str, rows: list[dict[str, Any]], header: bool) -> None:
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._columns)
            if header:
                writer.writeheader()
            writer.writerows(rows)


class TensorBoardLogger:
    """Write metrics as TensorBoard scalars under ``dir`` (needs the ``tensorboard`` package).

    Example:
        >>> import tempfile, ltransform as lt
        >>> log = lt.TensorBoardLogger(tempfile.mkdtemp()); log({"loss": 1.5}, step=10); log.close()
    """

    def __init__(self, dir: str | os.PathLike[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "TensorBoardLogger needs tensorboard: pip install 'ltransform[loggers]' "
                "(or pip install tensorboard)"
            ) from error
        self.dir = Path(dir)
        self._make = lambda: SummaryWriter(log_dir=str(self.dir))
        self._writer: Any = None  # created on first use: ranks that never log write no file

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        if self._writer is None:
            self._writer = self._make()
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
