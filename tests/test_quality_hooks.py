"""lt.early_stopping and lt.checkpoint_best against scripted validation curves, on 1 and 2 ranks.

The evaluation step returns a value scripted by the step number, so the step each hook must act
at is computed by hand (the curves' comments); nothing of torch is mocked."""

from __future__ import annotations

import json
import math

import pytest
import torch

import ltransform as lt
from ltransform.distributed import env
from helpers import make_data, make_model, mse, sgd

# val_loss at the evaluations every 2 steps: best 3 at step 6, then 3.5, 3.2, 3.1 do not improve
# on it, so patience=3 stops after step 12 (the 6th evaluation)
CURVE = [5, 4, 3, 3.5, 3.2, 3.1, 3.6, 2.0, 1.0]


def scripted(curve, every=2, offset=None):
    """An eval step whose val_loss at step ``every * (i + 1)`` is ``curve[i]`` (plus ``offset(step)``)."""

    def step(state, batch):
        value = curve[state.step // every - 1] if state.step % every == 0 and state.step else math.inf
        return state, {"loss": value + (offset(state.step) if offset else 0.0)}

    return step


def train(hooks, *, curve=CURVE, every=2, batches=40, offset=None, **options):
    model = make_model()
    options = {"eval_every": every, "progress": False, **options}
    return lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model, lr=0.01)), make_data(batches),
                  eval_step=scripted(curve, every, offset), eval_data=[torch.zeros(1, 1)], hooks=hooks, **options)


def test_early_stopping_stops_at_the_step_the_curve_says(capsys):
    stopper = lt.early_stopping("val_loss", patience=3)
    state = train([stopper])
    assert state.step == 12 and stopper.stopped_at == 12
    assert (stopper.best, stopper.best_step) == (3, 6)
    said = "lt.early_stopping: stopping after step 12: val_loss has not improved on its best, 3 at step 6, in 3 checks"
    assert f"{said} (patience=3)" in capsys.readouterr().err


@pytest.mark.parametrize("patience,stops_at", [(1, 8), (2, 10), (4, 14)])
def test_patience_counts_evaluations_without_improvement(patience, stops_at):
    assert train([lt.early_stopping(patience=patience)]).step == stops_at


def test_min_delta_needs_a_bigger_improvement():
    curve = [5, 4, 3, 2.9, 2.85, 2.8, 2.7]  # improves every time, by 0.1, then 0.05
    assert train([lt.early_stopping(patience=3)], curve=curve, batches=14).step == 14  # the data runs out first
    stopper = lt.early_stopping(patience=3, min_delta=0.25)  # 2.9, 2.85, 2.8 are not 0.25 below 3
    assert train([stopper], curve=curve).step == 12
    assert stopper.best == 3


def test_mode_max_watches_for_a_rise():
    stopper = lt.early_stopping("val_loss", mode="max", patience=3)  # the negated curve: same stop
    assert train([stopper], curve=[-v for v in CURVE]).step == 12
    assert stopper.best == -3


def test_a_stale_value_is_not_counted_again():
    # evaluated every 4 steps, logged every step: the stopper is due every step but counts only
    # fresh values, so it stops at the 6th evaluation, step 24 (counting stale ones: step 15)
    stopper = lt.early_stopping(patience=3)
    state = train([stopper], every=4, log_every=1, loggers=[lambda m, s: None])
    assert state.step == 24 and stopper.best_step == 12


def test_evaluation_at_epoch_end_is_checked_once_per_step():
    # 4 batches an epoch, evaluated every 2 steps: the value fresh at step 4 is seen at the step
    # and again at the epoch's end; it counts once, so the stop is the same as without epochs
    stopper = lt.early_stopping(patience=3)
    assert train([stopper], batches=4, max_epochs=20).step == 12
    model = make_model()  # evaluation only at each epoch's end (eval_every=None): epochs of 2 steps
    state = lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model, lr=0.01)), make_data(2),
                   max_epochs=20, eval_step=scripted(CURVE), eval_data=[torch.zeros(1, 1)], progress=False,
                   hooks=[lt.early_stopping(patience=3)])
    assert state.step == 12 and state.epoch == 6


@pytest.mark.parametrize("loggers", [[], [lambda metrics, step: None]])
def test_a_training_metric_is_read_at_log_points(loggers):
    # log points every 3 steps see 5, 4, 3, 3.5, 3.2, 3.1: stop at step 18; the steps between
    # see 0 (a new best each, if they were read)
    at_log_points = {3: 5, 6: 4, 9: 3, 12: 3.5, 15: 3.2, 18: 3.1}
    calls = []

    def loss_fn(model, batch):
        calls.append(None)
        return mse(model, batch), {"score": torch.tensor(float(at_log_points.get(len(calls), 0.0)))}

    model = make_model()
    stopper = lt.early_stopping("score", patience=3)
    state = lt.run(lt.train_step(loss_fn), lt.State(model=model, optimizer=sgd(model)), make_data(30),
                   log_every=3, loggers=loggers, progress=False, hooks=[stopper])
    assert state.step == 18 and (stopper.best, stopper.best_step) == (3, 9)


def test_a_nan_stops_at_once(capsys):
    stopper = lt.early_stopping(patience=10)
    assert train([stopper], curve=[5, 4, math.nan, 1]).step == 6
    assert "val_loss is nan" in capsys.readouterr().err


def test_its_counts_survive_a_checkpoint_and_resume(tmp_path):
    # stopped by max_steps at 8 (best 3 at step 6, one check without improvement), then resumed
    # from the checkpoint of step 8: it goes on counting and stops at 12 as an unbroken run does
    saver = lt.every(2, lt.checkpoint_sharded(dir=tmp_path))
    first = train([lt.early_stopping(patience=3), saver], max_steps=8)
    assert first.extra["lt.early_stopping(val_loss)"] == {"best": 3, "best_step": 6, "bad": 1, "at": 8}
    stopper = lt.early_stopping(patience=3)
    assert train([stopper, saver], resume="latest").step == 12
    assert stopper.best_step == 6


def test_an_unknown_monitor_names_the_logged_values(tmp_path):
    with pytest.raises(ValueError, match=r"lt.early_stopping: monitor 'val_los' is not logged; the logged values "
                                         r"are: .*'val_loss'"):
        train([lt.early_stopping("val_los")])
    model = make_model()
    with pytest.raises(ValueError, match=r"lt.checkpoint_best: monitor 'acc' is not logged; the logged values are: "
                                         r"'epoch', 'loss', 'lr'"):
        lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(4), log_every=2,
               loggers=[lambda m, s: None], progress=False, hooks=[lt.checkpoint_best(tmp_path, monitor="acc")])


def test_a_val_monitor_needs_an_evaluation():
    model = make_model()
    with pytest.raises(ValueError, match=r"monitor 'val_loss' is an evaluation result, but lt.run has no eval_step"):
        lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(2), progress=False,
               hooks=[lt.early_stopping()])
    with pytest.raises(ValueError, match=r"monitor 'loss' is read at log points, but lt.run\(log_every=None\)"):
        lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(2), progress=False,
               log_every=None, hooks=[lt.early_stopping("loss")])


@pytest.mark.parametrize("options,error,message", [
    ({"mode": "mn"}, ValueError, r"lt.early_stopping: unknown mode 'mn'; expected one of: 'min'"),
    ({"patience": 0}, ValueError, r"lt.early_stopping: patience must be a positive int, got 0"),
    ({"min_delta": -0.1}, ValueError, r"lt.early_stopping: min_delta must be a number >= 0"),
    ({"monitor": 3}, TypeError, r"lt.early_stopping: monitor must be the name of a logged value"),
    ({"check_finite": "yes"}, TypeError, r"lt.early_stopping: check_finite must be True or False"),
])
def test_early_stopping_options_are_checked(options, error, message):
    with pytest.raises(error, match=message):
        lt.early_stopping(**options)


# --- checkpoint_best -------------------------------------------------------------------------


def _params_by_step():
    seen = {}

    def record(state):
        seen[state.step] = [p.detach().clone() for p in state.model.parameters()]

    return seen, record


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("sharded", [True, False])
def test_checkpoint_best_keeps_exactly_the_best_k_and_the_last(tmp_path, sharded):
    # evaluations at 2, 4, ..., 14: 5, 4, 3, 3.5, 3.2, 3.1, 3.6; the best 2 are 3 (step 6) and 3.1 (step 12)
    seen, record = _params_by_step()
    best = lt.checkpoint_best(tmp_path, monitor="val_loss", top_k=2, sharded=sharded)
    state = train([record, best], max_steps=14)
    assert _names(tmp_path) == ["best-step-00000006", "best-step-00000012", "best.json", "step-00000014"]
    manifest = json.loads((tmp_path / "best.json").read_text())
    assert manifest == {"monitor": "val_loss", "mode": "min", "last": "step-00000014",
                        "best": [{"path": "best-step-00000006", "step": 6, "value": 3},
                                 {"path": "best-step-00000012", "step": 12, "value": 3.1}]}
    assert best.best_path == tmp_path / "best-step-00000006"
    for path, step in [(best.best_path, 6), (tmp_path / "best-step-00000012", 12), (tmp_path / "step-00000014", 14)]:
        model = make_model(seed=9)
        loaded = lt.load(path, lt.State(model=model, optimizer=sgd(model)))
        assert loaded.step == step
        for p, q in zip(model.parameters(), seen[step]):
            assert torch.equal(p, q)
    assert lt.latest_checkpoint(tmp_path) == tmp_path / "step-00000014"
    assert state.step == 14


def test_a_tie_goes_to_the_earlier_step_and_max_mode_ranks_high_values(tmp_path):
    best = lt.checkpoint_best(tmp_path / "min", top_k=1, last=False)
    train([best], curve=[5, 3, 3, 4], max_steps=8)
    assert _names(tmp_path / "min") == ["best-step-00000004", "best.json"]  # no last: only the best
    best = lt.checkpoint_best(tmp_path / "max", mode="max", top_k=2)
    train([best], curve=[5, 3, 7, 5], max_steps=8)
    assert [(e["step"], e["value"]) for e in best.best] == [(6, 7), (2, 5)]
    assert _names(tmp_path / "max") == ["best-step-00000002", "best-step-00000006", "best.json", "step-00000008"]


def test_resume_from_last_goes_on_ranking_against_the_saved_best(tmp_path):
    # evaluations 5, 4, 3, 3.5 at steps 2..8: the best 2 are steps 6 and 8; the last, the final state (9)
    train([lt.checkpoint_best(tmp_path, top_k=2)], max_steps=9)
    assert _names(tmp_path) == ["best-step-00000006", "best-step-00000008", "best.json", "step-00000009"]
    seen, record = _params_by_step()
    best = lt.checkpoint_best(tmp_path, top_k=2)
    state = train([record, best], resume="latest", max_steps=14)  # from step 9: 3.2, 3.1, 3.6 at 10, 12, 14
    assert state.step == 14
    assert [(e["step"], e["value"]) for e in best.best] == [(6, 3), (12, 3.1)]
    assert _names(tmp_path) == ["best-step-00000006", "best-step-00000012", "best.json", "step-00000014"]
    model = make_model(seed=9)
    assert lt.load(tmp_path / "best-step-00000012", lt.State(model=model, optimizer=sgd(model))).step == 12
    for p, q in zip(model.parameters(), seen[12]):
        assert torch.equal(p, q)


def test_a_new_run_into_the_directory_of_another_is_refused_and_deletes_nothing(tmp_path):
    train([lt.checkpoint_best(tmp_path)], max_steps=8)
    assert _names(tmp_path) == ["best-step-00000006", "best.json", "step-00000008"]
    with pytest.raises(ValueError, match=r"holds another run's checkpoints \(best-step-00000006, step-00000008\); "
                                         r"continue that run \(lt.run\(..., resume='latest'\)\), or give this one"):
        train([lt.checkpoint_best(tmp_path)], curve=[9, 8], max_steps=4)
    assert _names(tmp_path) == ["best-step-00000006", "best.json", "step-00000008"]
    last, best = tmp_path / "step-00000008", tmp_path / "best-step-00000006"
    fresh = tmp_path / "fresh"
    train([lt.checkpoint_best(fresh)], curve=[9, 8], max_steps=4)
    last, best = fresh / "step-00000004", fresh / "best-step-00000004"
    for name in _names(last):  # the best is the last under a second name (hard links): no second write
        assert (last / name).stat().st_ino == (best / name).stat().st_ino


def test_another_monitor_in_the_same_directory_is_refused(tmp_path):
    train([lt.checkpoint_best(tmp_path)], max_steps=2)
    with pytest.raises(ValueError, match=r"holds the best checkpoints by 'val_loss' \(min\); this hook ranks by "
                                         r"'val_loss' \(max\); give it another directory"):
        train([lt.checkpoint_best(tmp_path, mode="max")], max_steps=2)


@pytest.mark.parametrize("options,error,message", [
    ({"top_k": 0}, ValueError, r"lt.checkpoint_best: top_k must be a positive int, got 0"),
    ({"mode": "best"}, ValueError, r"lt.checkpoint_best: unknown mode 'best'"),
    ({"last": 1}, TypeError, r"lt.checkpoint_best: last must be True or False"),
])
def test_checkpoint_best_options_are_checked(tmp_path, options, error, message):
    with pytest.raises(error, match=message):
        lt.checkpoint_best(tmp_path, **options)


# --- 2 ranks ----------------------------------------------------------------------------------

# Each rank's own value is the curve plus (rank 0) or minus (rank 1) OFFSETS[step]: rank 0 alone
# would take 2.9 at step 8 and 2.7 at step 10 as new bests, rank 1 alone 2.4 at step 12, and
# neither would stop by step 18; the logged value is their average, the curve, which stops at 12.
OFFSETS = {8: -0.6, 10: -0.5, 12: 0.7}


def _offset(step):
    return OFFSETS.get(step, 0.0) * (1 if lt.rank() == 0 else -1)


def two_ranks(directory):
    torch.manual_seed(0)
    model = make_model()
    stopper = lt.early_stopping(patience=3)
    seen, record = _params_by_step()
    best = lt.checkpoint_best(directory, top_k=2)
    state = lt.run(lt.pipe(lt.train_step(mse), lt.distribute("ddp")),
                   lt.State(model=model, optimizer=sgd(model, lr=0.01)), make_data(40), eval_every=2,
                   eval_step=scripted(CURVE, 2, _offset), eval_data=[torch.zeros(1, 1)], progress=False,
                   hooks=[stopper, record, best])
    mine = {"step": state.step, "stopped_at": stopper.stopped_at, "best": [e["step"] for e in best.best],
            "params": {s: seen[s] for s in (6, 12)}}
    return env.all_gather_objects(mine)  # lt.launch returns rank 0's result: every rank's


def _local_stop(rank):
    """Where a rank deciding from its own values would stop (the test's own count)."""
    best, bad = math.inf, 0
    for i, value in enumerate(CURVE):
        step = 2 * (i + 1)
        value += OFFSETS.get(step, 0.0) * (1 if rank == 0 else -1)
        best, bad = (value, 0) if value < best else (best, bad + 1)
        if bad == 3:
            return step
    return None


def test_two_ranks_stop_at_the_same_step_from_the_averaged_value(tmp_path):
    assert {_local_stop(0), _local_stop(1)} != {12}  # a rank's own values would stop elsewhere
    ranks = lt.launch(two_ranks, str(tmp_path), devices=2)
    assert [r["step"] for r in ranks] == [12, 12] and [r["stopped_at"] for r in ranks] == [12, 12]
    assert [r["best"] for r in ranks] == [[6, 12], [6, 12]]
    assert _names(tmp_path) == ["best-step-00000006", "best-step-00000012", "best.json", "step-00000012"]
    for step in (6, 12):
        model = make_model(seed=5)
        assert lt.load(tmp_path / f"best-step-{step:08d}", lt.State(model=model, optimizer=sgd(model))).step == step
        for p, q in zip(model.parameters(), ranks[0]["params"][step]):
            assert torch.equal(p, q)


def test_a_preemption_saves_the_last_checkpoint_that_resume_latest_finds(tmp_path):
    import os
    import signal

    def preempt(state):
        if state.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    best = lt.checkpoint_best(tmp_path, top_k=1)
    with pytest.raises(lt.Preempted) as stopped:  # evaluations every 4 steps: it stops between two
        train([best, preempt], every=4)
    step = stopped.value.step
    assert 5 <= step < 8  # (the ranks agree on the step within a few; the last is saved there)
    assert stopped.value.checkpoint == tmp_path / f"step-{step:08d}" == lt.latest_checkpoint(tmp_path)
    assert _names(tmp_path) == ["best-step-00000004", "best.json", f"step-{step:08d}"]
    assert json.loads((tmp_path / "best.json").read_text())["last"] == f"step-{step:08d}"
    resumed = lt.checkpoint_best(tmp_path, top_k=1)
    assert train([resumed], every=4, resume="latest", max_steps=14).step == 14  # evaluations: 4 at 8, 3 at 12
    assert resumed.best_path == tmp_path / "best-step-00000012"


def test_a_failure_of_rank_0s_part_of_a_save_is_raised_as_one_clear_error(tmp_path):
    manifest = tmp_path / "best.json"

    def sabotage(state):  # after the save at step 2: the manifest cannot be written any more
        if state.step == 3:
            manifest.unlink()
            manifest.mkdir()

    with pytest.raises(RuntimeError, match=r"lt.checkpoint_best: rank 0 failed: IsADirectoryError"):
        train([sabotage, lt.checkpoint_best(tmp_path)], max_steps=6)


def test_the_hooks_take_the_issue_s_keyword_forms(tmp_path):
    best = lt.checkpoint_best(dir=tmp_path / "best", monitor="val_loss", top_k=2)
    stopper = lt.early_stopping(monitor="val_loss", patience=3, mode="min", min_delta=0.0)
    state = train([stopper, best])
    assert state.step == 12 and [e["step"] for e in best.best] == [6, 12]  # 3 and 3.1
    assert lt.profile(dir=tmp_path / "trace").__name__ == "profile"
    assert lt.memory_snapshot(path=tmp_path / "snapshot.pickle").__name__ == "memory_snapshot"
