"""Errors of hooks, loggers, evaluation and seeding, each with its message."""

import sys

import pytest
import torch

import ltransform as lt
from helpers import make_data, make_model, mse, sgd


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_every_needs_a_positive_int(bad):
    with pytest.raises(ValueError, match=rf"every: n must be a positive int \(optimizer steps\), got {bad!r}"):
        lt.every(bad, lambda s: None)


def test_tensorboard_logger_without_tensorboard_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'ltransform\[loggers\]'"):
        lt.TensorBoardLogger(tmp_path)


def test_empty_eval_data_is_an_error():
    model = make_model()
    with pytest.raises(ValueError, match="eval_data yielded no batches"):
        lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(2),
               eval_step=lt.eval_step(mse), eval_data=[], progress=False)


@pytest.mark.parametrize("bad", [-1, 2**32, 1.0, "3", True])
def test_seed_everything_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\)"):
        lt.seed_everything(bad)


def test_seed_everything_makes_runs_repeat():
    def train():
        lt.seed_everything(3)
        model = torch.nn.Linear(4, 1)
        return lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(3),
                      progress=False).model.weight.detach().clone()

    assert torch.equal(train(), train())


# --- Weights & Biases and MLflow, read back with their own tools ---------------------------------


def _wandb_history(run_dir):
    """The history rows of an offline W&B run, read from its .wandb file (a LevelDB-style log of
    wandb's own protobuf records: 7-byte header, then 32 KiB blocks of checksummed chunks)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    data, pos, records, pending = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_wandb_logger_offline_run_holds_every_logged_step(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    model = make_model()
    log = lt.WandbLogger(project="ltransform-test", name="offline", dir=tmp_path, mode="offline",
                         config={"lr": 0.1})
    lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(4), log_every=2,
           loggers=[log], eval_step=lt.eval_step(mse), eval_data=make_data(2), progress=False)
    log.log_hyperparams({"batch": 8})
    log.close()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    rows = [r for r in _wandb_history(run_dir) if "loss" in r or "val_loss" in r]
    assert [int(r["_step"]) for r in rows] == [2, 4]
    assert "val_loss" in rows[-1] and float(rows[-1]["val_loss"]) > 0  # the epoch-end evaluation, same row
    assert all(float(r["loss"]) > 0 for r in rows)


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_mlflow_logger_metrics_and_params_read_back_through_mlflows_client(tmp_path, monkeypatch, store):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # MLflow 3 refuses a file store without it
    uri = f"sqlite:///{tmp_path}/mlflow.db" if store == "sqlite" else f"file:{tmp_path}/mlruns"
    model = make_model()
    log = lt.MLflowLogger("ltransform-test", run_name="r1", tracking_uri=uri)
    lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(4), log_every=2,
           loggers=[log], progress=False)
    log.log_hyperparams({"lr": 0.1, "precision": "32-true"})
    log.close()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(log.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params == {"lr": "0.1", "precision": "32-true"}
    assert [m.step for m in client.get_metric_history(log.run_id, "loss")] == [2, 4]


@pytest.mark.parametrize("logger,package", [("WandbLogger", "wandb"), ("MLflowLogger", "mlflow"),
                                            ("TensorBoardLogger", "torch.utils.tensorboard")])
def test_a_missing_logger_package_names_the_pip_command(tmp_path, monkeypatch, logger, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'ltransform\[loggers\]'"):
        getattr(lt, logger)(tmp_path) if logger == "TensorBoardLogger" else getattr(lt, logger)()


def test_loggers_write_nothing_on_other_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log = lt.CSVLogger(tmp_path)
    log({"loss": 1.0}, step=1)
    log.log_hyperparams({"lr": 0.1})
    assert not log.path.exists() and not (tmp_path / "hparams.json").exists()


def test_importing_ltransform_imports_no_logger_package():
    import subprocess

    code = ("import sys, ltransform as lt; lt.CSVLogger; "
            "print(sorted(m for m in ('wandb', 'mlflow', 'tensorboard') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120).stdout.strip() == "[]"
