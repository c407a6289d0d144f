"""Loggers: any callable ``(metrics: dict[str, float], step: int)``; CSV, TensorBoard, Weights &
Biases and MLflow here, each writing on rank 0 only and importing its package when built."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class CSVLogger:
    """Write metrics to ``<dir>/metrics.csv``: one row per step, one column per metric.

    Metrics logged at the same step (the training loss and, later, ``val_loss``) share a row; a
    metric first seen later adds a column (the file is rewritten then). A logger opened on a
    ``metrics.csv`` that exists keeps its rows, so a resumed run appends to it: at its first
    step, the rows from that step on are dropped (the run that wrote them is the one redone).
    Hyper-parameters go to ``<dir>/hparams.json``. It writes on rank 0 only.

    Example:
        >>> import tempfile, ltransform as lt
        >>> log = lt.CSVLogger(tempfile.mkdtemp()); log({"loss": 1.5}, step=10); log({"val_loss": 2.0}, step=10)
        >>> log.path.read_text().splitlines()
        ['step,loss,val_loss', '10,1.5,2.0']
    """

    def __init__(self, dir: str | os.PathLike[str], filename: str = "metrics.csv") -> None:
        self.path = Path(dir) / filename  # the directory is made at the first write (rank 0's)
        self._columns: list[str] = ["step"]
        self._rows: list[dict[str, Any]] = []
        self._resumed = False
        self._file: Any = None  # open while logging: rows are appended, the last one rewritten in place
        self._last_at = 0  # where the last row starts in the file
        self._writes = True  # rank 0 (read at the first call)
        self._line_writer: tuple[int, io.StringIO, Any] | None = None
        if self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self._columns = list(reader.fieldnames or ["step"])
                self._rows = [{k: v for k, v in row.items() if v != ""} for row in reader]
            for row in self._rows:
                row["step"] = int(row["step"])

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        if not self._resumed:  # the first call: rows a resumed run redoes; the rank, once (it is fixed)
            self._writes = _rank_zero()
            if not self._writes:
                return
            self._resumed = True
            self._rows = [r for r in self._rows if r["step"] < step]
        if not self._writes:
            return
        new = [k for k in metrics if k not in self._columns]
        self._columns += new
        same = bool(self._rows) and self._rows[-1]["step"] == step
        if same:
            self._rows[-1].update(metrics)
        else:
            self._rows.append({"step": step, **metrics})
        # The file is current after every call. It is rewritten whole only when a column is added
        # (or at the first call); otherwise a new step's row is appended and more values for the
        # same step rewrite just the last row (a truncating rewrite of the whole file costs ms).
        if new or self._file is None or self._file.closed:
            self._rewrite()
        else:
            if same:
                self._file.seek(self._last_at)
                self._file.truncate()
            else:
                self._last_at = self._file.tell()
            self._file.write(self._line(self._rows[-1]))
        self._file.flush()

    def _rewrite(self) -> None:
        if self._file is not None:
            self._file.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w+", newline="")  # held open between log points
        writer = csv.DictWriter(self._file, fieldnames=self._columns)
        writer.writeheader()
        writer.writerows(self._rows[:-1])
        self._last_at = self._file.tell()
        self._file.write(self._line(self._rows[-1]))

    def _line(self, row: Mapping[str, Any]) -> str:
        if self._line_writer is None or self._line_writer[0] != len(self._columns):  # columns only grow
            buffer = io.StringIO()
            self._line_writer = (len(self._columns), buffer,
                                 csv.DictWriter(buffer, fieldnames=self._columns, lineterminator="\r\n"))
        _, buffer, writer = self._line_writer
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(row)
        return buffer.getvalue()

    def flush(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.flush()

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Write ``params`` to ``hparams.json`` beside the metrics."""
        if _rank_zero():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            (self.path.parent / "hparams.json").write_text(json.dumps(dict(params), indent=1, default=str) + "\n")

    def close(self) -> None:
        """Close the file (a later call opens it again, rewriting it whole)."""
        if self._file is not None:
            self._file.close()


def _rank_zero() -> bool:
    from ltransform.distributed import env

    return env.rank() == 0


def _needs(package: str, logger: str) -> Any:
    """``import package``, or an ImportError naming the pip command."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ImportError(f"{logger} needs {package}: pip install 'ltransform[loggers]' (or pip install "
                          f"{package})") from error


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
        if not _rank_zero():
            return
        if self._writer is None:
            self._writer = self._make()
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Record ``params`` as the text ``hparams`` (JSON)."""
        if _rank_zero():
            if self._writer is None:
                self._writer = self._make()
            self._writer.add_text("hparams", json.dumps(dict(params), default=str))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbLogger:
    """Log metrics to a Weights & Biases run (needs ``wandb``); the run starts at the first log.

    Args:
        project: ``wandb.init``'s ``project``.
        name: ``wandb.init``'s ``name`` (the run's).
        dir: ``wandb.init``'s ``dir``.
        config: ``wandb.init``'s ``config``: the run's hyper-parameters.
        mode: ``"online"``, ``"offline"`` (written under ``dir``, synced later with ``wandb sync``)
            or ``"disabled"``; default wandb's (``WANDB_MODE``).
        **init: any other ``wandb.init`` argument.

    Example:
        >>> import tempfile, ltransform as lt
        >>> log = lt.WandbLogger(project="demo", dir=tempfile.mkdtemp(), mode="disabled")
        >>> log({"loss": 1.5}, step=10); log.close()
    """

    def __init__(self, project: str | None = None, name: str | None = None, dir: str | os.PathLike[str] | None = None,
                 config: Mapping[str, Any] | None = None, mode: str | None = None, **init: Any) -> None:
        self._wandb = _needs("wandb", "WandbLogger")
        self._init = dict(project=project, name=name, dir=None if dir is None else str(dir),
                          config=dict(config or {}), mode=mode, **init)
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self.run: Any = None

    def _run(self) -> Any:
        if self.run is None:
            self.run = self._wandb.init(**{k: v for k, v in self._init.items() if v is not None})
        return self.run

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        if _rank_zero():
            self._run().log(dict(metrics), step=step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Add ``params`` to the run's config."""
        if _rank_zero():
            self._run().config.update(dict(params), allow_val_change=True)

    def close(self) -> None:
        """Finish the run (an offline run's files are complete then)."""
        if self.run is not None:
            self.run.finish()
            self.run = None


class MLflowLogger:
    """Log metrics to an MLflow run (needs ``mlflow``) through its client (no global active run).

    Args:
        experiment: the experiment's name (created if missing).
        run_name: the run's name; ``tracking_uri``: e.g. ``"sqlite:///mlflow.db"``, an MLflow
            server, or a file store (``"file:./mlruns"`` or a directory; MLflow 3 refuses these
            unless ``MLFLOW_ALLOW_FILE_STORE=true``, which asking for one sets in this process)
            (default: mlflow's, ``MLFLOW_TRACKING_URI``); ``tags``: the run's tags.

    Example:
        >>> import tempfile, ltransform as lt
        >>> log = lt.MLflowLogger("demo", tracking_uri=f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
        >>> log({"loss": 1.5}, step=10); log.close()
        >>> log.client.get_metric_history(log.run_id, "loss")[0].value
        1.5
    """

    def __init__(self, experiment: str = "ltransform", run_name: str | None = None, tracking_uri: str | None = None,
                 tags: Mapping[str, str] | None = None) -> None:
        _needs("mlflow", "MLflowLogger")
        from mlflow.tracking import MlflowClient

        if tracking_uri is not None and (str(tracking_uri).startswith("file:") or "://" not in str(tracking_uri)):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # asked for by name: not refused
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._experiment, self._run_name, self._tags = experiment, run_name, dict(tags or {})
        self.run_id: str | None = None

    def _run(self) -> str:
        if self.run_id is None:
            found = self.client.get_experiment_by_name(self._experiment)
            experiment = found.experiment_id if found is not None else self.client.create_experiment(self._experiment)
            self.run_id = self.client.create_run(experiment, run_name=self._run_name, tags=self._tags).info.run_id
        return self.run_id

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        if _rank_zero():
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self._run(), metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Record ``params`` as the run's parameters (as strings, MLflow's form)."""
        if _rank_zero():
            from mlflow.entities import Param

            self.client.log_batch(self._run(), params=[Param(k, str(v)) for k, v in params.items()])

    def close(self) -> None:
        """Mark the run finished."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
