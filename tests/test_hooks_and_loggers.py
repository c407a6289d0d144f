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
