"""lt.run against a plain loop, and its logging, evaluation, hooks and counters."""

import dataclasses
import math
import sys

import pytest
import torch

import ltransform as lt
from helpers import assert_same_params, make_data, make_model, mse, sgd


def plain_loop(model, optimizer, data, epochs):
    for _ in range(epochs):
        for batch in data:
            loss = mse(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("explicit_precision", [False, True])
def test_run_sgd_is_bitwise_equal_to_a_plain_loop(explicit_precision):
    data = make_data()
    ref = make_model()
    plain_loop(ref, sgd(ref), data, epochs=2)

    model = make_model()
    step = lt.train_step(mse)
    if explicit_precision:
        step = lt.with_precision(step, "32-true")
    state = lt.run(step, lt.State(model=model, optimizer=sgd(model)), data, max_epochs=2, progress=False)

    assert_same_params(model, ref, exact=True)
    assert (state.step, state.micro_step, state.epoch) == (16, 16, 2)


def test_scheduler_steps_only_when_an_update_was_applied():
    model = make_model()
    optimizer = sgd(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    step = lt.accumulate(lt.train_step(mse), 4)
    state = lt.run(step, lt.State(model=model, optimizer=optimizer, scheduler=scheduler), make_data(8),
                   progress=False)
    assert (state.step, state.micro_step) == (2, 8)
    assert scheduler.last_epoch == 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_max_steps_counts_optimizer_steps_under_accumulation():
    model = make_model()
    state = lt.run(lt.accumulate(lt.train_step(mse), 2), lt.State(model=model, optimizer=sgd(model)),
                   make_data(4), max_steps=5, progress=False)
    assert (state.step, state.micro_step, state.epoch) == (5, 10, 2)


def test_a_resumed_state_past_max_steps_runs_nothing():
    model = make_model()
    state = lt.State(model=model, optimizer=sgd(model), step=5, micro_step=5)
    before = [p.clone() for p in model.parameters()]
    assert lt.run(lt.train_step(mse), state, make_data(), max_steps=5, progress=False) is state
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _SyncCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        for name in ("item", "tolist", "__float__", "cpu", "numpy"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def wrapper(tensor, *args, **kwargs):
            self.calls += 1
            return original(tensor, *args, **kwargs)
        return wrapper


def test_no_host_sync_except_at_log_points(monkeypatch):
    model = make_model()
    state = lt.State(model=model, optimizer=sgd(model))
    step = lt.pipe(lt.train_step(mse), lt.clip_gradients(max_norm=1.0))
    logged = []
    counter = _SyncCounter(monkeypatch)
    lt.run(step, state, make_data(20), log_every=5, loggers=[lambda m, s: logged.append(s)], progress=False)
    assert logged == [5, 10, 15, 20]
    assert counter.calls == 4  # one batched sync per log point, for loss and grad_norm together


def test_nothing_syncs_when_nobody_reads_the_metrics(monkeypatch):
    model = make_model()
    counter = _SyncCounter(monkeypatch)
    lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(10), log_every=2,
           progress=False)
    assert counter.calls == 0


def test_csv_logger_writes_rows_at_log_points_and_adds_late_columns(tmp_path):
    model = make_model()
    log = lt.CSVLogger(tmp_path)
    lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(6), log_every=3,
           loggers=[log], eval_step=lt.eval_step(mse), eval_data=make_data(2), progress=False)
    lines = log.path.read_text().splitlines()
    assert lines[0] == "step,loss,lr,epoch,val_loss"
    assert [line.split(",")[0] for line in lines[1:]] == ["3", "6"]  # one row per step
    assert lines[1].endswith(",")  # no val_loss at step 3
    assert lines[2].startswith("6,") and not lines[2].endswith(",")  # train and epoch-end val in one row


def test_csv_logger_appends_on_resume_and_redoes_the_steps_after_the_checkpoint(tmp_path):
    first = lt.CSVLogger(tmp_path)
    for step in (10, 20, 30):
        first({"loss": step / 10}, step=step)
    first({"val_loss": 9.0}, step=30)
    resumed = lt.CSVLogger(tmp_path)  # a run resumed from a checkpoint at step 20 logs 30 again
    resumed({"loss": 3.5}, step=30)
    resumed({"loss": 4.0}, step=40)
    lines = resumed.path.read_text().splitlines()
    assert lines == ["step,loss,val_loss", "10,1.0,", "20,2.0,", "30,3.5,", "40,4.0,"]


def test_tensorboard_logger_writes_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = make_model()
    log = lt.TensorBoardLogger(tmp_path)
    lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(4), log_every=2,
           loggers=[log], progress=False)
    log.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4]


def test_evaluation_runs_in_eval_mode_and_averages_over_batches():
    model = make_model()
    eval_data = make_data(3, seed=5)
    modes = []

    def evaluate(m, batch):
        modes.append(m.training)
        return {"mse": mse(m, batch)}

    seen = []
    lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(4), eval_every=2,
           eval_step=lt.eval_step(evaluate), eval_data=eval_data, loggers=[lambda m, s: seen.append((s, m))],
           log_every=None, progress=False)
    assert modes == [False] * 6 and model.training
    assert [s for s, _ in seen] == [2, 4]
    with torch.no_grad():
        expected = sum(mse(model, b) for b in eval_data).item() / 3
    assert seen[-1][1]["val_mse"] == pytest.approx(expected, rel=1e-6)


def test_hooks_every_n_steps_and_early_stop():
    model = make_model()
    calls = []
    stopper = lambda state, metrics: lt.stop() if state.step == 6 else None  # noqa: E731
    state = lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(10),
                   hooks=[lt.every(2, lambda s: calls.append(s.step)), stopper], progress=False)
    assert calls == [2, 4, 6]
    assert state.step == 6


def test_a_hook_can_replace_the_state_and_sees_metrics():
    model = make_model()
    seen = []

    def hook(state, metrics):
        seen.append(sorted(metrics))
        return lt.State(model=state.model, optimizer=state.optimizer, step=state.step,
                        micro_step=state.micro_step, extra={"marked": True})

    state = lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(2),
                   hooks=[hook], progress=False)
    assert state.extra == {"marked": True}
    assert seen == [["loss"], ["loss"]]


def test_a_hook_returning_the_wrong_type_is_named():
    model = make_model()
    with pytest.raises(TypeError, match=r"hook '<lambda>' returned int; a hook returns the state"):
        lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(2),
               hooks=[lambda s: 3], progress=False)


def test_dict_and_dataclass_states_carry_counters():
    model = make_model()
    out = lt.run(lt.train_step(mse), {"model": model, "optimizer": sgd(model)}, make_data(3), progress=False)
    assert (out["step"], out["micro_step"], out["epoch"]) == (3, 3, 1)

    @dataclasses.dataclass(frozen=True)
    class Mine:
        net: torch.nn.Module
        opt: torch.optim.Optimizer
        step: int = 0
        micro_step: int = 0

    mine = lt.run(lt.train_step(mse), Mine(model, sgd(model)), make_data(3), progress=False)
    assert (mine.step, mine.micro_step) == (3, 3)


def test_a_state_without_counters_gets_a_clear_error():
    @dataclasses.dataclass
    class NoCounters:
        model: torch.nn.Module
        optimizer: torch.optim.Optimizer

    model = make_model()
    with pytest.raises(TypeError, match="has no 'step'/'micro_step' counters; use lt.State"):
        lt.run(lt.train_step(mse), NoCounters(model, sgd(model)), make_data(1), progress=False)


def test_progress_bar_in_a_terminal(capfd):
    model = make_model()
    lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(4), log_every=2)
    err = capfd.readouterr().err
    assert "4/4" in err and "loss=" in err
    lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(4), progress=False)
    assert capfd.readouterr().err == ""


def test_keyboard_interrupt_returns_the_state_so_far(capsys):
    model = make_model()

    def interrupt_at_3(state):
        if state.step == 3:
            raise KeyboardInterrupt
    state = lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(10),
                   hooks=[interrupt_at_3], progress=False)
    assert state.step == 3
    assert "interrupted at step 3" in capsys.readouterr().out


@pytest.mark.parametrize(("option", "value", "message"), [
    ("max_steps", 0, "max_steps must be a positive int or None, got 0"),
    ("log_every", -1, "log_every must be a positive int or None, got -1"),
    ("loggers", [3], "a logger must be callable"),
    ("hooks", ["x"], "a hook must be callable"),
    ("eval_step", lt.eval_step(mse), "eval_step given without eval_data"),
])
def test_bad_run_options_are_rejected_up_front(option, value, message):
    model = make_model()
    with pytest.raises((ValueError, TypeError), match=message):
        lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(1),
               progress=False, **{option: value})


def test_an_iterator_used_up_after_one_epoch_warns():
    model = make_model()
    with pytest.warns(UserWarning, match="no batches in epoch 1; pass a re-iterable"):
        state = lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), iter(make_data(2)),
                       max_epochs=3, progress=False)
    assert state.step == 2


def test_to_floats_syncs_once_and_keeps_order():
    from ltransform.runner.metrics import to_floats

    values = to_floats({"a": torch.tensor(1.5), "n": 2, "b": torch.tensor([1.0, 3.0])})
    assert values == {"a": 1.5, "n": 2.0, "b": 2.0}
    assert all(isinstance(v, float) for v in values.values()) and not math.isnan(values["b"])


def test_what_a_hook_prints_goes_above_the_progress_bar_not_onto_its_line(capsys):
    import logging

    model = make_model()
    streams = []

    def hook(state):
        streams.append((sys.stdout, sys.stderr))
        print("step", state.step)
        print("to stderr", state.step, file=sys.stderr)

    original = (sys.stdout, sys.stderr)
    handlers = list(logging.getLogger().handlers)
    lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(3), hooks=[hook])
    assert (sys.stdout, sys.stderr) == original  # restored after the run
    assert logging.getLogger().handlers == handlers
    assert all(o is not original[0] and e is not original[1] for o, e in streams)  # through tqdm.write
    out, err = capsys.readouterr()
    assert out == "step 1\nstep 2\nstep 3\n"
    assert "3/3" in err and "to stderr 3\n" in err  # the bar itself, and the hook's lines, on stderr


def test_a_plain_function_replaces_the_built_in_evaluation_and_logging():
    # no eval_step, no log_every: a user's function evaluates every 2 steps and logs through the run
    # context; early stopping reads it as it reads the built-in evaluation's values
    model = make_model()
    held_out = make_data(2, seed=7)
    logged = []
    curve = iter([5.0, 4.0, 4.5, 4.2, 4.1, 1.0])  # best 4 at step 4; 3 checks without improvement

    def my_eval(state, run):
        with torch.no_grad():
            real = sum(mse(state.model, b) for b in held_out).item()
        run.log({"val_loss": next(curve), "val_real": real})

    stopper = lt.early_stopping("val_loss", patience=3)
    state = lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(20), progress=False,
                   log_every=None, eval_every=2, loggers=[lambda m, s: logged.append((s, sorted(m)))],
                   hooks=[lt.every(2, my_eval), stopper])
    assert state.step == 10 and stopper.best == 4.0
    assert logged == [(s, ["val_loss", "val_real"]) for s in (2, 4, 6, 8, 10)]


def test_a_hook_object_has_its_own_cadence_and_sees_start_epoch_end_and_end():
    calls = []

    class Tracer:
        __name__ = "tracer"

        def next_step(self, step):
            return (step // 3 + 1) * 3

        def __call__(self, state, run):
            calls.append(("step", run.step, state.step))

        def start(self, state, run):
            calls.append(("start", run.step, run.epoch))

        def epoch_end(self, state, run):
            calls.append(("epoch_end", run.step, run.epoch))

        def end(self, state, run):
            calls.append(("end", run.step, run.epoch))

        def close(self, run):
            calls.append(("close", run.step))

    model = make_model()
    lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(4), max_epochs=2,
           progress=False, hooks=[Tracer()])
    assert calls == [("start", 0, 0), ("step", 3, 3), ("epoch_end", 4, 1), ("step", 6, 6), ("epoch_end", 8, 2),
                     ("end", 8, 2), ("close", 8)]


def test_a_bad_hook_or_option_leaves_no_handler_and_no_redirected_stdout():
    import signal

    model = make_model()
    state = lt.State(model=model, optimizer=sgd(model))
    before_out, before_term = sys.stdout, signal.getsignal(signal.SIGTERM)
    with pytest.raises(TypeError, match="a hook must be callable"):
        lt.run(lt.train_step(mse), state, make_data(2), hooks=[42])
    with pytest.raises(TypeError, match="preemption must be an lt.Preemption"):
        lt.run(lt.train_step(mse), state, make_data(2), preemption="SIGTERM")
    assert sys.stdout is before_out and signal.getsignal(signal.SIGTERM) is before_term


def test_a_failing_close_still_undoes_the_rest_and_is_raised():
    import signal

    class Broken:
        __name__ = "broken"

        def close(self, run):
            raise OSError("disk full")

    model = make_model()
    before_out, before_term = sys.stdout, signal.getsignal(signal.SIGTERM)
    with pytest.raises(OSError, match="disk full"):
        lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(2), hooks=[Broken()])
    assert sys.stdout is before_out and signal.getsignal(signal.SIGTERM) is before_term


def test_every_refuses_a_hook_object_with_its_own_cadence():
    with pytest.raises(TypeError, match=r"lt.every: profile is a hook object with its own cadence"):
        lt.every(2, lt.profile("/tmp/unused-trace-dir"))


def test_a_hook_not_reading_the_state_may_return_one_without_resetting_the_counters():
    calls = []

    class Tagger:
        __name__ = "tagger"
        reads_state = False

        def next_step(self, step):
            return (step // 5 + 1) * 5

        def __call__(self, state, run):
            calls.append(run.step)
            return dataclasses.replace(state) if dataclasses.is_dataclass(state) else \
                lt.State(model=state.model, optimizer=state.optimizer, extra={"tag": run.step})

    model = make_model()
    state = lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(20), max_steps=10,
                   progress=False, hooks=[Tagger()])
    assert calls == [5, 10] and state.step == 10 and state.extra["tag"] == 10
