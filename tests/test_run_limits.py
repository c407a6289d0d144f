"""lt.run's max_time (rank 0's clock decides for all), limit_batches / limit_eval_batches (after the
per-rank split, the DistributedSampler and set_epoch kept) and dry_run (no files written).

The 2-rank cases run in one ``lt.launch(devices=2)`` job (gloo on the CPU), once per module; rank 0
returns what every rank saw.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import attrs
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import ltransform as lt
from ltransform.distributed import preemption as watches
from helpers import assert_same_params, make_data, make_model, mse, sgd

STEP = lt.train_step(mse)
BUDGET = 4.5  # seconds of a fake clock that advances by a rank's rate at every batch


def fresh_state(seed: int = 0) -> lt.State:
    model = make_model(seed)
    return lt.State(model=model, optimizer=sgd(model))


def hand_loop(model: torch.nn.Module, batches) -> torch.nn.Module:
    optimizer = sgd(model)
    for batch in batches:
        mse(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


# ---------------------------------------------------------------- the fake clock

class FakeClock:
    """A clock that advances by ``rate`` seconds at each training batch (``tick``), read by
    lt.run's checks in place of ``time.monotonic``."""

    def __init__(self, rate: float) -> None:
        self.rate, self.ticks = rate, 0

    def __call__(self) -> float:
        return self.ticks * self.rate

    def tick_loss(self, model, batch):
        self.ticks += 1
        return mse(model, batch)

    def first_step_past(self, budget: float) -> int:
        """The first step after which this clock reads at least ``budget`` since the start."""
        return next(s for s in range(1, 10_000) if s * self.rate >= budget)


# ---------------------------------------------------------------- the 2-rank scenarios

def _skewed(rates: tuple[float, float], preemption) -> dict:
    """Each rank's clock runs at its own rate; the run has BUDGET seconds."""
    clock = FakeClock(rates[lt.rank()])
    watches.clock = clock  # this process's clock (each rank is its own process)
    try:
        model = make_model()
        state = lt.State(model=model, optimizer=sgd(model))
        logged: list[int] = []
        state = lt.run(lt.pipe(lt.train_step(clock.tick_loss), lt.distribute("ddp")), state, make_data(40),
                       max_time=BUDGET, progress=False, preemption=preemption, log_every=1000,
                       loggers=[lambda metrics, step: logged.append(step)])
    finally:
        watches.clock = watches.time.monotonic
    return {"step": state.step, "own": clock.first_step_past(BUDGET), "logged": logged}


def _sampled(limit, epochs: int) -> dict:
    """What each training step saw (sample indices), per epoch, and the run's progress total."""
    dataset = TensorDataset(torch.arange(20.0))
    seen: list[list[int]] = []
    totals: list[int | None] = []

    def loss(model, batch):
        (x,) = batch
        seen.append([int(i) for i in x.tolist()])
        return model(x.unsqueeze(-1)).pow(2).mean()

    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    lt.run(lt.pipe(lt.train_step(loss), lt.distribute("ddp")), state,
           DataLoader(dataset, batch_size=2, shuffle=True), max_epochs=epochs, limit_batches=limit,
           progress=False, hooks=[lambda s, run: totals.append(run.total)])
    return {"seen": seen, "total": totals[0]}


def _scenarios() -> dict:
    out = {
        "slow rank 1": _skewed((1.0, 0.01), lt.Preemption()),
        "fast rank 1": _skewed((1.0, 100.0), lt.Preemption()),
        "fast rank 0": _skewed((100.0, 1.0), None),
        "limit 3": _sampled(3, 2),
        "limit 0.5": _sampled(0.5, 2),
    }
    every: list[dict] = [{}, {}]
    dist.all_gather_object(every, out)
    return {"ranks": every}


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return lt.launch(_scenarios, devices=2, timeout=120)


# ---------------------------------------------------------------- max_time

@pytest.mark.parametrize("case", ["slow rank 1", "fast rank 1", "fast rank 0"])
def test_max_time_on_2_ranks_stops_both_at_the_step_rank_0s_clock_implies(two_ranks, case):
    zero, one = (r[case] for r in two_ranks["ranks"])
    # rank 0's clock passes the budget after step K (checked every step: a fake second per step is
    # slower than the 0.2 s check period); every rank learns it one check later, at step K + 1
    assert zero["step"] == one["step"] == zero["own"] + 1
    if zero["own"] != one["own"]:  # rank 1's own clock would have stopped elsewhere: it did not decide
        assert one["step"] != one["own"] + 1
    assert zero["logged"] == [zero["step"]] and one["logged"] == []  # the end's log point, on rank 0


def test_max_time_on_1_process_stops_early_and_returns_the_state(monkeypatch, capsys):
    clock = FakeClock(1.0)
    monkeypatch.setattr(watches, "clock", clock)
    logged: list[int] = []
    state = lt.run(lt.train_step(clock.tick_loss), fresh_state(), make_data(20), max_epochs=3,
                   max_time=BUDGET, progress=False, log_every=1000, loggers=[lambda m, step: logged.append(step)])
    assert state.step == clock.first_step_past(BUDGET) == 5  # at once on one process
    assert logged == [5]  # the end's log point, as at any end
    assert "max_time (0:00:04.500000) used up by rank 0's clock" in capsys.readouterr().err
    reference = hand_loop(make_model(), make_data(20)[:5])
    assert_same_params(state.model, reference)


@pytest.mark.parametrize("budget", [datetime.timedelta(seconds=4.5), "00:00:00:05", 5])
def test_max_time_takes_a_timedelta_a_lightning_string_or_seconds(monkeypatch, budget):
    clock = FakeClock(1.0)
    monkeypatch.setattr(watches, "clock", clock)
    state = lt.run(lt.train_step(clock.tick_loss), fresh_state(), make_data(20), max_time=budget,
                   progress=False, preemption=None)  # without signal handlers: the checks alone
    assert state.step == 5


def test_a_budget_not_used_up_changes_nothing():
    state = lt.run(STEP, fresh_state(), make_data(6), max_time=3600, progress=False)
    assert state.step == 6
    assert_same_params(state.model, hand_loop(make_model(), make_data(6)))


# ---------------------------------------------------------------- limit_batches

@pytest.mark.parametrize(("case", "per_epoch"), [("limit 3", 3), ("limit 0.5", 2)])
def test_limit_batches_keeps_the_distributed_sampler_and_set_epoch(two_ranks, case, per_epoch):
    dataset = TensorDataset(torch.arange(20.0))
    for rank, seen in enumerate(r[case] for r in two_ranks["ranks"]):
        expected = []
        for epoch in range(2):
            sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            order = list(sampler)
            expected += [order[2 * b:2 * b + 2] for b in range(per_epoch)]  # the first k batches, this epoch's shuffle
        assert seen["seen"] == expected
        assert seen["total"] == 2 * per_epoch  # the progress total sees the limited length
    epochs = two_ranks["ranks"][0][case]["seen"]
    assert epochs[:per_epoch] != epochs[per_epoch:]  # each epoch shuffled anew


def _loader() -> DataLoader:
    data = make_data(8)
    dataset = TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    return DataLoader(dataset, batch_size=8, shuffle=True)


@pytest.mark.parametrize(("limit", "per_epoch"), [(3, 3), (0.3, 2), (1.0, 8), (50, 8)])
def test_limit_batches_equals_a_hand_loop_over_the_first_batches_of_each_epoch(limit, per_epoch):
    torch.manual_seed(7)
    state = lt.run(STEP, fresh_state(), _loader(), max_epochs=2, limit_batches=limit, progress=False)
    assert (state.step, state.epoch) == (2 * per_epoch, 2)
    torch.manual_seed(7)
    model = make_model()  # (it seeds the RNG the loader shuffles with, as fresh_state() did)
    loader, batches = _loader(), []
    for _ in range(2):
        batches += [b for _, b in zip(range(per_epoch), loader)]
    assert_same_params(state.model, hand_loop(model, batches))


def test_limit_batches_resumed_mid_epoch_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    torch.manual_seed(3)
    straight = lt.run(STEP, fresh_state(), _loader(), max_epochs=2, limit_batches=3, progress=False)
    torch.manual_seed(3)
    hook = lt.every(4, lt.checkpoint_sharded(dir=tmp_path))
    first = lt.run(STEP, fresh_state(), _loader(), max_steps=4, limit_batches=3, progress=False, hooks=[hook])
    assert (first.step, first.epoch) == (4, 1)  # one batch into the second (limited) epoch
    torch.manual_seed(99)
    resumed = lt.run(STEP, fresh_state(1), _loader(), max_epochs=2, limit_batches=3, progress=False,
                     hooks=[hook], resume="latest")
    assert (resumed.step, resumed.epoch) == (straight.step, straight.epoch) == (6, 2)
    assert_same_params(resumed.model, straight.model)


EVAL = lt.eval_step(lambda model, batch: {"loss": mse(model, batch)})


@pytest.mark.parametrize(("limit", "batches"), [(2, 2), (0.5, 2), (1.0, 5)])
def test_limit_eval_batches_is_lt_evaluates_limit(limit, batches):
    eval_data = make_data(5, seed=3)
    state = lt.run(STEP, fresh_state(), make_data(2), eval_step=EVAL, eval_data=eval_data,
                   limit_eval_batches=limit, progress=False, hooks=[_Evaluated()])
    assert state.step == 2  # evaluated at the epoch's end, on this very state
    assert state.extra["val"] == lt.evaluate(EVAL, state, eval_data, limit=batches)["loss"]
    assert state.extra["val"] != lt.evaluate(EVAL, state, eval_data, limit=batches - 1 or None)["loss"]


class _Evaluated:
    """Keeps the last evaluation's val_loss in the state's extra (at the end)."""

    def end(self, state, run):
        return attrs.evolve(state, extra={"val": run.evaluated["val_loss"]})


# ---------------------------------------------------------------- dry_run

class _Writer:
    """A user's hook that writes a file, and says so."""

    writes_files = True

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, state) -> None:
        self.calls += 1
        Path("user.txt").write_text("written")


@pytest.mark.parametrize("n", [True, 3])
def test_dry_run_writes_no_files_and_trains_n_batches(tmp_path, monkeypatch, capsys, n):
    monkeypatch.chdir(tmp_path)
    csv, writer = lt.CSVLogger(tmp_path), _Writer()
    hooks = [lt.every(1, lt.checkpoint_sharded(dir="ckpt")), lt.checkpoint_best("best"), writer,
             lt.profile("traces", wait=0, warmup=0, active=1), lt.memory_snapshot("snapshot.pickle")]
    state = lt.run(STEP, fresh_state(), make_data(8), dry_run=n, loggers=[csv], hooks=hooks, log_every=1,
                   eval_step=EVAL, eval_data=make_data(4, seed=3), eval_every=100, progress=False)
    assert os.listdir(tmp_path) == []
    assert writer.calls == 0
    batches = 1 if n is True else n
    assert (state.step, state.epoch) == (batches, 1)
    assert_same_params(state.model, hand_loop(make_model(), make_data(8)[:batches]))
    said = capsys.readouterr().err
    assert f"dry run: {batches} step(s) of training and {batches} batch(es) of evaluation, writing no files" in said
    for name in ("logger CSVLogger", "checkpoint_sharded(dir='ckpt')", "checkpoint_best(dir='best'",
                 "_Writer", "profile", "memory_snapshot"):
        assert name in said, name


def test_dry_run_evaluates_n_batches_at_its_end():
    eval_data = make_data(4, seed=3)
    state = lt.run(STEP, fresh_state(), make_data(8), dry_run=2, eval_step=EVAL, eval_data=eval_data,
                   eval_every=100, progress=False, hooks=[_Evaluated()])
    assert state.extra["val"] == lt.evaluate(EVAL, state, eval_data, limit=2)["loss"]


def test_dry_run_under_accumulation_runs_n_whole_windows():
    """n optimizer steps: the update runs too (Lightning's fast_dev_run steps the optimizer)."""
    step = lt.pipe(lt.train_step(mse), lt.accumulate(3))
    state = lt.run(step, fresh_state(), make_data(8), dry_run=2, progress=False)
    reference = lt.run(step, fresh_state(), make_data(8), max_steps=2, progress=False)
    assert (state.step, state.micro_step) == (2, 6)
    assert_same_params(state.model, reference.model)


def test_dry_run_reads_resume_and_runs_n_batches_from_there(tmp_path):
    saved = lt.run(STEP, fresh_state(), make_data(8), max_epochs=1, progress=False)
    lt.save(tmp_path / "ckpt.pt", saved)
    state = lt.run(STEP, fresh_state(1), make_data(8), dry_run=2, resume=tmp_path / "ckpt.pt", progress=False)
    assert (state.step, state.epoch) == (10, 2)
    for batch in make_data(8)[:2]:  # the saved model and its optimizer (momentum), 2 more steps by hand
        mse(saved.model, batch).backward()
        saved.optimizer.step()
        saved.optimizer.zero_grad(set_to_none=True)
    assert_same_params(state.model, saved.model)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


# ---------------------------------------------------------------- bad values

@pytest.mark.parametrize(("option", "value", "error", "message"), [
    ("max_time", 0, ValueError, "max_time must be a positive, finite duration"),
    ("max_time", -3.0, ValueError, "max_time must be a positive"),
    ("max_time", float("inf"), ValueError, "positive, finite"),
    ("max_time", datetime.timedelta(0), ValueError, "positive"),
    ("max_time", "12:00", ValueError, "is not 'DD:HH:MM:SS'"),
    ("max_time", "00:00:00:00", ValueError, "positive"),
    ("max_time", [1], TypeError, "a datetime.timedelta, or a 'DD:HH:MM:SS' string"),
    ("max_time", True, TypeError, "max_time must be seconds"),
    ("limit_batches", 0, ValueError, r"limit_batches must be a positive int \(batches\), a float in \(0, 1\]"),
    ("limit_batches", -2, ValueError, "positive int"),
    ("limit_batches", 1.5, ValueError, r"in \(0, 1\], got 1.5; for a number of batches give an int"),
    ("limit_batches", 0.0, ValueError, r"\(0, 1\]"),
    ("limit_batches", "all", TypeError, "limit_batches must be an int"),
    ("limit_eval_batches", 2.0, ValueError, "limit_eval_batches as a float is a fraction"),
    ("limit_eval_batches", 2, ValueError, "limit_eval_batches given without eval_step; pass eval_step="),
    ("dry_run", 0, ValueError, r"dry_run must be True \(1 step\), a positive int \(optimizer steps\) or False"),
    ("dry_run", -1, ValueError, "dry_run must be True"),
    ("dry_run", "yes", TypeError, "dry_run must be True"),
])
def test_bad_limits_name_what_is_valid(option, value, error, message):
    with pytest.raises(error, match=message):
        lt.run(STEP, fresh_state(), make_data(2), progress=False, **{option: value})


@pytest.mark.parametrize("other", [{"max_steps": 3}, {"max_epochs": 2}, {"limit_batches": 2},
                                   {"limit_eval_batches": 1}])
def test_dry_run_with_what_it_replaces_is_an_error(other):
    with pytest.raises(ValueError, match=f"dry_run runs 1 step.*in place of {next(iter(other))}; pass one"):
        lt.run(STEP, fresh_state(), make_data(2), progress=False, dry_run=True, **other)


def test_a_fraction_of_data_without_a_length_is_an_error():
    with pytest.raises(ValueError, match="limit_batches=0.5 is a fraction of the batches, but the data has no length"):
        lt.run(STEP, fresh_state(), iter(make_data(2)), progress=False, limit_batches=0.5)
