"""lt.run's evaluation: in the training precision, weighted by batch size, the padding of a
DistributedSampler left out, fresh values told from stale ones; against hand-written loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import ltransform as lt
from ltransform.runner.hooks.evaluation import evaluate


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def data(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=gen), torch.randn(n, 1, generator=gen))


def fresh_state() -> lt.State:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    return lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05))


def by_hand(model, loader, dtype=None) -> float:
    """The evaluation written out: each batch's mean loss times its size, over the sample count."""
    total, count = torch.zeros(()), 0
    with torch.no_grad():
        for x, y in loader:
            if dtype is None:
                loss = F.mse_loss(model(x), y)
            else:
                with torch.autocast("cpu", dtype=dtype):
                    loss = F.mse_loss(model(x), y)
            total = total + loss.float() * len(x)
            count += len(x)
    return (total / count).item()


def run_with_eval(step, eval_step, *, eval_every=None, hooks=()):
    logged = []
    state = lt.run(step, fresh_state(), DataLoader(data(16, 1), batch_size=4), max_epochs=1, progress=False,
                   log_every=None, eval_step=eval_step, eval_data=DataLoader(data(13, 2), batch_size=4),
                   eval_every=eval_every, loggers=[lambda m, s: logged.append((s, dict(m)))], hooks=list(hooks))
    return state, logged


def test_the_eval_step_runs_in_the_training_precision_and_weights_batches_by_size():
    step = lt.pipe(lt.train_step(mse), lt.with_precision("bf16-mixed"))
    state, logged = run_with_eval(step, lt.eval_step(mse))
    assert [s for s, _ in logged] == [4]
    expected = by_hand(state.model, DataLoader(data(13, 2), batch_size=4), torch.bfloat16)
    assert logged[0][1]["val_loss"] == pytest.approx(expected, rel=1e-6)
    # the float32 value is another number: the test can tell them apart
    assert abs(by_hand(state.model, DataLoader(data(13, 2), batch_size=4)) - expected) > 20e-6 * abs(expected)
    # an unweighted mean of the 4 batch means (the last holds 1 sample) is another number too
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        means = [F.mse_loss(state.model(x), y).float().item() for x, y in DataLoader(data(13, 2), batch_size=4)]
    assert abs(sum(means) / 4 - expected) > 1e-4


def test_an_eval_step_with_its_own_precision_keeps_it():
    step = lt.pipe(lt.train_step(mse), lt.with_precision("bf16-mixed"))
    state, logged = run_with_eval(step, lt.with_precision(lt.eval_step(mse), "32-true"))
    expected = by_hand(state.model, DataLoader(data(13, 2), batch_size=4))
    assert logged[0][1]["val_loss"] == pytest.approx(expected, rel=1e-6)


def test_hooks_tell_a_fresh_evaluation_from_a_stale_one():
    seen = []
    run_with_eval(lt.train_step(mse), lt.eval_step(mse), eval_every=3,
                  hooks=[lambda s, run: seen.append((run.step, run.fresh("val_loss") is not None, run.evaluated_at))])
    assert seen == [(1, False, None), (2, False, None), (3, True, 3), (4, False, 3)]


def test_evaluate_leaves_out_the_samples_a_distributed_sampler_repeats():
    # 13 samples over 2 ranks: rank 1 gets 1, 3, ..., 11 and a repeat of sample 0 to even out
    dataset = data(13, 2)
    model = fresh_state().model
    step = lt.eval_step(mse)
    sizes = []
    counting = lt.eval_step(lambda m, b: sizes.append(len(b[0])) or mse(m, b))
    for rank, real in ((0, range(0, 13, 2)), (1, range(1, 13, 2))):
        loader = DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, num_replicas=2, rank=rank,
                                                                                shuffle=False))
        value = evaluate(step, lt.State(model=model), loader, average=False)["loss"]
        subset = DataLoader(torch.utils.data.Subset(dataset, list(real)), batch_size=4)
        assert value == pytest.approx(by_hand(model, subset), rel=1e-6)
        sizes.clear()
        evaluate(counting, lt.State(model=model), loader, average=False)
        assert sizes == ([4, 3] if rank == 0 else [4, 2])  # the repeat is cut off the last batch


def test_a_batch_made_only_of_repeats_still_runs_and_counts_for_nothing():
    dataset = data(3, 2)  # 3 samples over 2 ranks, batch 1: rank 1 gets sample 1, then a repeat of 0
    model = fresh_state().model
    sizes = []
    counting = lt.eval_step(lambda m, b: sizes.append(len(b[0])) or mse(m, b))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False)
    loader = DataLoader(dataset, batch_size=1, sampler=sampler)
    value = evaluate(counting, lt.State(model=model), loader, average=False)["loss"]
    assert sizes == [1, 1]  # as many batches as rank 0 runs (collectives in a sharded forward)
    assert value == pytest.approx(by_hand(model, DataLoader(torch.utils.data.Subset(dataset, [1]))), rel=1e-6)


def test_eval_data_with_no_batches_is_a_clear_error():
    with pytest.raises(ValueError, match="eval_data yielded no batches"):
        evaluate(lt.eval_step(mse), fresh_state(), [], average=False)
