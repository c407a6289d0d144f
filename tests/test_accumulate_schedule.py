"""accumulate(schedule=...) against a hand-written loop that accumulates with that schedule."""

import dataclasses
import io

import pytest
import torch

import ltransform as lt
from helpers import assert_same_params, make_data, make_model, mse, sgd
from ltransform.core.effects import active_frame
from ltransform.steps.accumulate import planned_updates

DATA = make_data(7)  # 7 batches an epoch: a multiple of none of the n below


def n_at(schedule: dict, epoch: int) -> int:
    keys = [k for k in schedule if k <= epoch]
    return schedule[max(keys)] if keys else 1


def reference(schedule: dict, epochs: int) -> tuple[torch.nn.Module, int, list[int]]:
    """Plain PyTorch: a window takes the n of the epoch it starts in, and is never cut."""
    model = make_model()
    opt = sgd(model)
    pos, n, updates, windows = 0, 1, 0, []
    for epoch in range(epochs):
        for batch in DATA:
            if pos == 0:
                n = n_at(schedule, epoch)
            (mse(model, batch) / n).backward()
            pos += 1
            if pos == n:
                opt.step()
                opt.zero_grad(set_to_none=True)
                pos, updates = 0, updates + 1
                windows.append(n)
    return model, updates, windows


SCHEDULES = [{0: 3, 1: 4, 3: 1}, {0: 8, 4: 4, 8: 1}, {2: 5}, {0: 2}]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_run_with_a_schedule_is_bitwise_equal_to_a_hand_written_loop(schedule):
    epochs = 5
    ref, updates, _ = reference(schedule, epochs)
    model = make_model()
    step = lt.accumulate(lt.train_step(mse), schedule=schedule)
    state = lt.run(step, lt.State(model=model, optimizer=sgd(model)), DATA, max_epochs=epochs, progress=False)
    assert (state.step, state.micro_step, state.epoch) == (updates, 7 * epochs, epochs)
    assert_same_params(model, ref, exact=True)
    assert planned_updates(step, len(DATA), epochs) == updates


def test_a_window_that_straddles_an_epoch_keeps_its_n():
    _, _, windows = reference({0: 3, 1: 4, 3: 1}, 4)
    # epoch 0: 3, 3, then a window of 3 begun at batch 7 closes in epoch 1; epoch 1's own windows are 4
    assert windows[:5] == [3, 3, 3, 4, 4]
    seen = []

    def my_step(state, batch):
        lt.backward(mse(state.model, batch))
        if lt.optimizer_step(state.optimizer):
            seen.append(active_frame().window)
        return state, {}

    model = make_model()
    lt.run(lt.accumulate(my_step, schedule={0: 3, 1: 4, 3: 1}), lt.State(model=model, optimizer=sgd(model)),
           DATA, max_epochs=4, progress=False)
    assert seen == windows


@pytest.mark.parametrize("at", [2, 5])
def test_resume_mid_run_equals_an_uninterrupted_run(tmp_path, at):
    schedule = {0: 3, 1: 4, 3: 1}
    step = lt.accumulate(lt.train_step(mse), schedule=schedule)

    def fresh():
        model = make_model()
        return lt.State(model=model, optimizer=sgd(model))

    straight = lt.run(step, fresh(), DATA, max_epochs=4, progress=False)
    hook = lt.every(at, lambda s, run: lt.save(tmp_path / "ckpt.pt", s, run=run) and None)
    first = lt.run(step, fresh(), DATA, max_steps=at, progress=False, hooks=[hook])
    assert first.step == at and first.micro_step % 7  # stopped mid-epoch
    resumed = lt.run(step, fresh(), DATA, max_epochs=4, progress=False, resume=tmp_path / "ckpt.pt")
    assert (resumed.step, resumed.micro_step, resumed.epoch) == (straight.step, straight.micro_step, straight.epoch)
    assert_same_params(resumed.model, straight.model, exact=True)
    ref, _, _ = reference(schedule, 4)
    assert_same_params(resumed.model, ref, exact=True)


def test_direct_calls_follow_the_schedule_and_carry_the_window_in_the_state():
    model = make_model()
    step = lt.accumulate(lt.train_step(mse), schedule={0: 2, 1: 3})
    state = lt.State(model=model, optimizer=sgd(model))
    steps = []
    for batch in DATA[:3]:
        state, _ = step(state, batch)
        steps.append(state.step)
    assert steps == [0, 1, 1]
    state = lt.State(model=state.model, optimizer=state.optimizer, step=state.step, micro_step=state.micro_step,
                     epoch=1, extra=state.extra)
    for batch in DATA[3:6]:  # the window begun at micro-step 2 (epoch 0) keeps n=2; then windows of 3
        state, _ = step(state, batch)
        steps.append(state.step)
    assert steps == [0, 1, 1, 2, 2, 2]
    assert state.extra["accumulate_window"] == (4, 3)


def test_frame_window_is_n_under_a_fixed_accumulate():
    seen = []

    def my_step(state, batch):
        seen.append(active_frame().window)
        lt.backward(mse(state.model, batch))
        lt.optimizer_step(state.optimizer)
        return state, {}

    model = make_model()
    lt.run(lt.accumulate(my_step, 3), lt.State(model=model, optimizer=sgd(model)), DATA, progress=False)
    assert seen == [3] * 7


def test_a_state_with_nowhere_to_keep_the_window_is_a_clear_error():
    @dataclasses.dataclass
    class Mine:
        model: torch.nn.Module
        optimizer: torch.optim.Optimizer
        step: int = 0
        micro_step: int = 0
        epoch: int = 0

    model = make_model()
    step = lt.accumulate(lt.train_step(mse), schedule={0: 2})
    with pytest.raises(TypeError, match=r"cannot store 'accumulate_window' in a state of type Mine: it has no "
                                        r"'extra' dict field; use lt.State, a dict, or add `extra: dict`"):
        step(Mine(model, sgd(model)), DATA[0])


def test_a_dict_state_follows_the_schedule():
    model = make_model()
    step = lt.accumulate(lt.train_step(mse), schedule={0: 2})
    state = {"model": model, "optimizer": sgd(model), "step": 0, "micro_step": 0}
    for batch in DATA[:4]:
        state, _ = step(state, batch)
    assert (state["step"], state["micro_step"], state["accumulate_window"]) == (2, 4, (0, 2))


def test_explain_shows_the_schedule():
    out = io.StringIO()
    lt.explain(lt.accumulate(lt.train_step(mse), schedule={0: 8, 4: 4, 8: 1}), file=out)
    text = out.getvalue()
    assert "with accumulate(schedule={0: 8, 4: 4, 8: 1})" in text
    assert "divide loss by the window's n (schedule {0: 8, 4: 4, 8: 1}, by epoch)" in text
    assert "non-boundary micro-step" in text and "whose n the schedule gives" in text


def test_a_schedule_without_epoch_0_starts_with_n_1():
    assert repr(lt.accumulate(schedule={2: 4})) == "lt.accumulate(schedule={0: 1, 2: 4})"


@pytest.mark.parametrize(("bad", "error", "match"), [
    ({}, ValueError, r"accumulate: schedule is empty; give at least one epoch: n"),
    ({"0": 4}, ValueError, r"accumulate: schedule keys must be epochs, ints >= 0, got '0'"),
    ({1.0: 4}, ValueError, r"schedule keys must be epochs, ints >= 0, got 1.0"),
    ({-1: 4}, ValueError, r"schedule keys must be epochs, ints >= 0, got -1"),
    ({True: 4}, ValueError, r"schedule keys must be epochs, ints >= 0, got True"),
    ({0: 0}, ValueError, r"accumulate: schedule\[0\] must be a positive int .*got 0"),
    ({0: 2, 3: 1.5}, ValueError, r"schedule\[3\] must be a positive int .*got 1.5"),
    ([(0, 4)], TypeError, r"accumulate: schedule must be a dict \{epoch: n\}, got list"),
])
def test_bad_schedules_are_clear_errors(bad, error, match):
    with pytest.raises(error, match=match):
        lt.accumulate(lt.train_step(mse), schedule=bad)


def test_n_and_schedule_together_or_neither_are_errors():
    with pytest.raises(ValueError, match=r"accumulate: give n or schedule, not both"):
        lt.accumulate(lt.train_step(mse), 2, schedule={0: 2})
    with pytest.raises(ValueError, match=r"accumulate: give n \(micro-steps per update\)"):
        lt.accumulate(lt.train_step(mse))
    with pytest.raises(ValueError, match=r"pass a schedule by name: lt.accumulate\(schedule=\{0: 2\}\)"):
        lt.accumulate({0: 2})


def test_a_schedule_and_accumulate_n_are_rejected_together():
    with pytest.raises(ValueError, match=r"accumulate\(schedule=\{0: 2\}\) cannot be combined with accumulate"):
        lt.pipe(lt.train_step(mse), lt.accumulate(4), lt.accumulate(schedule={0: 2}))


# ---------------------------------------------------------------- 2 ranks


def _train_scheduled(shard):
    """3 epochs with a schedule; ``shard``: this rank's half of each batch under DDP (None: all of it)."""
    model = make_model()
    data = DATA if shard is None else [(x.chunk(2)[shard], y.chunk(2)[shard]) for x, y in DATA]
    step = lt.accumulate(lt.train_step(mse), schedule={0: 2, 1: 3})
    if shard is not None:
        step = lt.distribute(step, "ddp")
    state = lt.run(step, lt.State(model=model, optimizer=sgd(model)), data, max_epochs=3, progress=False)
    return [p.detach().clone() for p in model.parameters()], state.step


def _on_two_ranks():
    from ltransform.distributed import env

    return env.all_gather_objects(_train_scheduled(lt.rank()))


def test_a_schedule_under_ddp_on_2_ranks_equals_one_process_with_the_double_batch():
    ranks = lt.launch(_on_two_ranks, devices=2, timeout=120)
    params, steps = _train_scheduled(None)
    for got, got_steps in ranks:
        assert got_steps == steps
        for p, q in zip(got, params):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
