"""lt.every_epoch, lt.at_end, lt.on_exception, and lt.run(log_reduce="mean"), each against a hand
count or a hand-written loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ltransform as lt
from tests.helpers import assert_same_params, make_data, make_model, mse, sgd
from tests.test_runner import _SyncCounter


def state_of(seed: int = 0) -> lt.State:
    model = make_model(seed)
    return lt.State(model=model, optimizer=sgd(model))


# ---------------------------------------------------------------- every_epoch, at_end


def test_every_epoch_runs_after_every_nth_epoch_with_the_epoch_counted():
    seen = []
    lt.run(lt.train_step(mse), state_of(), make_data(3), max_epochs=5, progress=False,
           hooks=[lt.every_epoch(2, lambda s, run: seen.append((s.epoch, s.step, run.epoch)))])
    assert seen == [(2, 6, 2), (4, 12, 4)]


def test_at_end_runs_once_after_the_last_step_and_its_state_is_returned():
    calls = []

    def final(state):
        calls.append(state.step)
        return lt.State(model=state.model, optimizer=state.optimizer, step=state.step, epoch=state.epoch,
                        micro_step=state.micro_step, extra={"finished": True})

    out = lt.run(lt.train_step(mse), state_of(), make_data(4), max_steps=6, max_epochs=3, progress=False,
                 hooks=[lt.at_end(final)])
    assert calls == [6]
    assert out.extra == {"finished": True}


def test_at_end_is_not_run_after_an_error():
    calls = []

    def boom(state):
        if state.step == 2:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        lt.run(lt.train_step(mse), state_of(), make_data(4), progress=False,
               hooks=[boom, lt.at_end(lambda s: calls.append(s.step))])
    assert calls == []


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: lt.every_epoch(0, print), ValueError, "n must be a positive int"),
    (lambda: lt.every_epoch(True, print), ValueError, "n must be a positive int"),
    (lambda: lt.at_end(3), TypeError, r"lt.at_end: fn must be a callable \(state\) or \(state, run\), got 3"),
    (lambda: lt.on_exception(None), TypeError, "lt.on_exception: fn must be a callable"),
    (lambda: lt.on_exception(lt.early_stopping("val_loss")), TypeError, "pass it in hooks=\\[...\\] directly"),
])
def test_bad_lifecycle_hooks_are_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ---------------------------------------------------------------- on_exception


class Flaky:
    """Batches that raise once, at batch ``at`` of epoch ``epoch``, like a bad read; fine on a retry."""

    def __init__(self, data, *, at: int, epoch: int = 0, error: type[BaseException] = OSError):
        self.data, self.at, self.epoch, self.error = data, at, epoch, error
        self.passes = 0
        self.failed = False

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        this = self.passes
        self.passes += 1
        for i, batch in enumerate(self.data):
            if not self.failed and this == self.epoch and i == self.at:
                self.failed = True
                raise self.error("the storage went away")
            yield batch


@pytest.mark.parametrize(("accumulate", "at", "saved_step"), [
    (lt.accumulate(1), 5, 11),
    (lt.accumulate(2), 3, 4),
    (lt.accumulate(schedule={0: 2, 1: 4}), 5, 4),  # 3 updates in epoch 0, then windows of 4 from micro-step 6
])
def test_on_exception_saves_and_the_resume_from_it_is_bitwise(tmp_path, accumulate, at, saved_step):
    """The error falls in the middle of an accumulation window for n=2 (batch 3 of epoch 1): the
    window's micro-batch is given back, and the resume equals an uninterrupted run bit for bit."""
    data = make_data(6)
    step = lt.pipe(lt.train_step(mse), accumulate)
    reference = lt.run(step, state_of(), data, max_epochs=2, progress=False)

    saver = lt.checkpoint_sharded(dir=tmp_path)
    flaky = Flaky(data, at=at, epoch=1)
    with pytest.raises(OSError, match="the storage went away"):
        lt.run(step, state_of(), flaky, max_epochs=2, progress=False, hooks=[lt.on_exception(saver)])
    saved = lt.latest_checkpoint(tmp_path)
    assert saved is not None and saved.name == f"step-{saved_step:08d}"

    resumed = lt.run(step, state_of(seed=7), flaky, max_epochs=2, progress=False,
                     hooks=[lt.on_exception(saver)], resume="latest")
    assert (resumed.step, resumed.micro_step, resumed.epoch) == (reference.step, reference.micro_step, 2)
    assert_same_params(resumed.model, reference.model)
    for a, b in zip(resumed.optimizer.state.values(), reference.optimizer.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_on_exception_sees_the_error_and_an_interrupt_returns_the_state():
    seen = []

    def interrupt(state):
        if state.step == 3:
            raise KeyboardInterrupt

    state = lt.run(lt.train_step(mse), state_of(), make_data(8), progress=False,
                   hooks=[interrupt, lt.on_exception(lambda s, run: seen.append((s.step, type(run.error))))])
    assert state.step == 3
    assert seen == [(3, KeyboardInterrupt)]


def test_a_failing_on_exception_hook_leaves_the_original_error_with_a_note(capsys):
    def save(state):
        raise RuntimeError("disk full")

    with pytest.raises(OSError, match="the storage went away") as caught:
        lt.run(lt.train_step(mse), state_of(), Flaky(make_data(4), at=2), progress=False,
               hooks=[lt.on_exception(save)])
    assert any("disk full" in note for note in caught.value.__notes__)
    assert "on_exception(save) failed too: RuntimeError: disk full" in capsys.readouterr().err


def test_on_exception_is_not_called_on_a_normal_run_and_the_loop_stays_unwrapped():
    seen = []
    lt.run(lt.train_step(mse), state_of(), make_data(4), progress=False,
           hooks=[lt.on_exception(lambda s: seen.append(s))])
    assert seen == []


# ---------------------------------------------------------------- log_reduce="mean"


def hand_losses(data, seed: int = 0) -> list[float]:
    """The loss of every step of a plain SGD loop over ``data``."""
    model = make_model(seed)
    optimizer = sgd(model)
    losses = []
    for x, y in data:
        loss = F.mse_loss(model(x), y)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def test_log_reduce_mean_logs_interval_and_epoch_means_of_every_step():
    data = make_data(6)
    logged = []
    lt.run(lt.train_step(mse), state_of(), data, max_epochs=2, log_every=4, log_reduce="mean",
           loggers=[lambda m, s: logged.append((s, dict(m)))], progress=False)
    losses = hand_losses(data + data)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    by_step = {}
    for step, values in logged:
        by_step.setdefault(step, {}).update(values)
    assert sorted(by_step) == [4, 6, 8, 12]
    assert by_step[4]["loss"] == pytest.approx(mean(losses[0:4]), rel=1e-6)
    assert by_step[6]["loss_epoch"] == pytest.approx(mean(losses[0:6]), rel=1e-6)
    assert by_step[8]["loss"] == pytest.approx(mean(losses[4:8]), rel=1e-6)
    assert by_step[12]["loss"] == pytest.approx(mean(losses[8:12]), rel=1e-6)
    assert by_step[12]["loss_epoch"] == pytest.approx(mean(losses[6:12]), rel=1e-6)


def test_log_reduce_mean_counts_every_micro_batch_under_accumulation():
    data = make_data(8)
    logged = []
    step = lt.pipe(lt.train_step(mse), lt.accumulate(2))
    lt.run(step, state_of(), data, max_steps=2, log_every=2, log_reduce="mean",
           loggers=[lambda m, s: logged.append(m["loss"])], progress=False)
    model = make_model(0)
    optimizer = sgd(model)
    losses = []
    for i, (x, y) in enumerate(data[:4]):
        loss = F.mse_loss(model(x), y)
        losses.append(loss.item())
        (loss / 2).backward()
        if i % 2 == 1:
            optimizer.step()
            optimizer.zero_grad()
    assert logged == [pytest.approx(sum(losses) / 4, rel=1e-6)]


def test_log_reduce_mean_adds_no_host_sync(monkeypatch):
    """The running sums stay tensors: as many host syncs as logging the last value (one per log
    point), and none at all per step."""
    counts = {}
    for reduce in ("last", "mean"):
        counter = _SyncCounter(monkeypatch)
        logged = []
        lt.run(lt.pipe(lt.train_step(mse), lt.clip_gradients(max_norm=1.0)), state_of(), make_data(20),
               max_steps=15, log_every=5, log_reduce=reduce, loggers=[lambda m, s, logged=logged: logged.append(s)],
               progress=False)
        assert logged == [5, 10, 15]
        counts[reduce] = counter.calls
        monkeypatch.undo()
    assert counts == {"last": 3, "mean": 3}


def test_log_reduce_is_checked():
    with pytest.raises(ValueError, match="log_reduce must be 'last' or 'mean', got 'max'"):
        lt.run(lt.train_step(mse), state_of(), make_data(2), log_reduce="max", progress=False)


# ---------------------------------------------------------------- on several ranks


def _two_rank_exception(folder: str) -> dict:
    """Both ranks fail on the same batch (a shared bad shard); the sharded save on the way out and
    the resume from it give the uninterrupted run's parameters on both ranks."""
    data = make_data(6, seed=1 + lt.rank())  # per-rank data (a list: taken as this rank's part)
    step = lt.pipe(lt.train_step(mse), lt.accumulate(2), lt.distribute("ddp"))
    reference = lt.run(step, state_of(), data, max_epochs=2, progress=False)
    flaky = Flaky(data, at=3, epoch=1)
    saver = lt.checkpoint_sharded(dir=folder)
    try:
        lt.run(step, state_of(), flaky, max_epochs=2, progress=False, hooks=[lt.on_exception(saver)])
        raised = False
    except OSError:
        raised = True
    resumed = lt.run(step, state_of(seed=5), flaky, max_epochs=2, progress=False,
                     hooks=[lt.on_exception(saver)], resume="latest")
    mine = {"raised": raised, "saved": lt.latest_checkpoint(folder).name, "step": resumed.step,
            "same": all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), reference.model.parameters()))}
    from ltransform.distributed import env

    return env.all_gather_objects(mine)


@pytest.mark.timeout(300)
def test_on_exception_on_2_ranks_saves_sharded_and_resumes_bitwise(tmp_path):
    results = lt.launch(_two_rank_exception, str(tmp_path), devices=2, timeout=120)
    assert len(results) == 2
    for result in results:
        assert result == {"raised": True, "saved": "step-00000004", "step": 6, "same": True}


def test_log_reduce_mean_divides_each_metric_by_the_calls_that_reported_it():
    """A metric of some steps only (here every other one), and metrics that change between a
    tensor and a number, are averaged over the calls that reported them."""
    def step(state, batch):
        lt.backward(mse(state.model, batch))
        lt.optimizer_step(state.optimizer)
        n = state.step
        metrics = {"n": torch.tensor(float(n)) if n % 3 else float(n)}
        if n % 2 == 0:
            metrics["even"] = torch.tensor([float(n), float(n) + 2])  # (a vector: its mean)
        return state, metrics

    logged = []
    lt.run(step, state_of(), make_data(6), log_every=6, log_reduce="mean",
           loggers=[lambda m, s: logged.append(dict(m))], progress=False)
    assert logged[0]["n"] == pytest.approx(sum(range(6)) / 6)
    assert logged[0]["even"] == pytest.approx(((0 + 1) + (2 + 1) + (4 + 1)) / 3)


def test_log_reduce_mean_of_an_update_metric_under_accumulation_is_over_the_updates():
    step = lt.pipe(lt.train_step(mse), lt.accumulate(2), lt.clip_gradients(max_norm=1e9))
    last, mean = [], []
    for reduce, into in (("last", last), ("mean", mean)):
        lt.run(step, state_of(), make_data(2), log_every=1, log_reduce=reduce,
               loggers=[lambda m, s, into=into: "grad_norm" in m and into.append(m["grad_norm"])],
               progress=False)
    assert len(mean) == 1 and mean == pytest.approx(last)  # one update per interval: its norm, not half of it


def test_after_ctrl_c_mid_window_the_returned_state_is_the_same_with_or_without_an_on_exception_hook():
    """The hooks see the last completed update; the state lt.run returns keeps its counters (and the
    unfinished window's gradients), as without a hook."""
    data = make_data(8)

    class Interrupting:  # Ctrl-C while the 6th batch is read: 5 micro-steps done, the 3rd window open
        def __iter__(self):
            for i, batch in enumerate(data):
                if i == 5:
                    raise KeyboardInterrupt
                yield batch

        def __len__(self):
            return len(data)

    step = lt.pipe(lt.train_step(mse), lt.accumulate(2))
    seen = []
    plain = lt.run(step, state_of(), Interrupting(), progress=False)
    hooked = lt.run(step, state_of(), Interrupting(), progress=False,
                    hooks=[lt.on_exception(lambda s: seen.append((s.step, s.micro_step)))])
    assert seen == [(2, 4)]
    assert (hooked.step, hooked.micro_step) == (plain.step, plain.micro_step) == (2, 5)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(hooked.model.parameters(), plain.model.parameters()))


def test_resume_latest_takes_the_newest_save_of_every_checkpoint_hook(tmp_path, capsys):
    """Periodic saves in one directory, the exception's save in another: the newer one is resumed."""
    data = make_data(8)
    step = lt.train_step(mse)
    reference = lt.run(step, state_of(), data, progress=False)
    hooks = [lt.every(4, lt.checkpoint_sharded(dir=tmp_path / "every")),
             lt.on_exception(lt.checkpoint_sharded(dir=tmp_path / "failed"))]
    flaky = Flaky(data, at=6)
    with pytest.raises(OSError):
        lt.run(step, state_of(), flaky, progress=False, hooks=hooks)
    assert lt.latest_checkpoint(tmp_path / "every").name == "step-00000004"
    assert lt.latest_checkpoint(tmp_path / "failed").name == "step-00000006"
    capsys.readouterr()
    resumed = lt.run(step, state_of(seed=3), flaky, progress=False, hooks=hooks, resume="latest")
    assert f"resumed from {str(tmp_path / 'failed' / 'step-00000006')!r} (step 6" in capsys.readouterr().err
    assert_same_params(resumed.model, reference.model)
