"""lt.ema / lt.ema_weights against a hand-written EMA loop in plain PyTorch: the averages, the
swap, evaluation with the averaged weights, full and sharded checkpoints, and 2 FSDP2 ranks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ltransform as lt

B = 4  # each rank's batch on 2 ranks


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)  # (the last layer's weight [1, 16] and bias [1] shard unevenly on 2 ranks)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)


def batches(n: int, size: int = 2 * B, seed: int = 1, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 4, generator=gen, dtype=dtype), torch.randn(size, 1, generator=gen, dtype=dtype))
            for _ in range(n)]


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def fresh(seed: int = 0, dtype: torch.dtype = torch.float32) -> lt.State:
    model = make_model(seed, dtype)
    return lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def hand_written(steps: int, decay, *, every: int = 1, start: int = 0, formula: bool = False,
                 dtype: torch.dtype = torch.float32, data=None):
    """Plain PyTorch: SGD steps, and every ``every`` steps from ``start`` on the EMA update (the
    average is the initial weights, and a copy of the weights at the first update step >= start)."""
    model = make_model(0, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = [p.detach().clone() for p in model.parameters()]
    started, n = start == 0, 0
    for step, batch in enumerate(data or batches(steps, dtype=dtype), start=1):
        mse(model, batch).backward()
        opt.step()
        opt.zero_grad()
        if step % every or step < start:
            continue
        with torch.no_grad():
            d = decay(n) if callable(decay) else decay
            for i, p in enumerate(model.parameters()):
                if not started:
                    ema[i] = p.detach().clone()
                elif formula:
                    ema[i] = d * ema[i] + (1 - d) * p
                else:
                    ema[i].lerp_(p, 1 - d)
        n += started
        started = True
    return model, ema


def run(state, steps, hooks=(), **options):
    return lt.run(lt.train_step(mse), state, batches(steps, dtype=state.model[0].weight.dtype)[:steps],
                  max_steps=steps, hooks=list(hooks), progress=False, log_every=None, **options)


def equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --- the averages ---------------------------------------------------------------------


@pytest.mark.parametrize(("every", "start"), [(1, 0), (3, 0), (2, 3)])
def test_ema_equals_a_hand_written_lerp_loop_bitwise(every, start):
    state = run(fresh(), 10, [lt.ema(0.8, every=every, start=start)])
    model, ema = hand_written(10, 0.8, every=every, start=start)
    assert equal(list(state.model.parameters()), list(model.parameters()))
    assert equal(state.extra["ema"].averages, ema)
    assert state.extra["ema"].updates == len([s for s in range(1, 11) if s % every == 0 and s >= start]) - (start > 0)


def test_ema_equals_the_formula_decay_times_average_plus_the_rest():
    # lt.ema computes average + w * (weight - average) (torch.lerp), which rounds differently from
    # decay * average + (1 - decay) * weight: the same number up to rounding, so in float64 the
    # two agree to ~1e-16 (in float32 they differ by a few ulp, ~1e-7, hence float64 here)
    state = run(fresh(dtype=torch.float64), 10, [lt.ema(0.8, every=2)])
    _, ema = hand_written(10, 0.8, every=2, formula=True, dtype=torch.float64)
    assert max((a - b).abs().max().item() for a, b in zip(state.extra["ema"].averages, ema)) < 1e-12


def test_a_decay_schedule_gets_the_number_of_updates_made():
    def warmup(n):
        return min(0.9, (1 + n) / (10 + n))

    state = run(fresh(), 8, [lt.ema(warmup)])
    assert equal(state.extra["ema"].averages, hand_written(8, warmup)[1])


def test_outside_lt_run_the_hook_is_called_after_each_step_and_skips_micro_steps():
    ema = lt.ema(0.8)
    step = lt.accumulate(lt.train_step(mse), 2)
    halves = [tuple(t[i * B:(i + 1) * B] for t in batch) for batch in batches(4) for i in (0, 1)]
    by_run = lt.run(step, fresh(), halves, max_steps=4, hooks=[ema], progress=False, log_every=None)
    state = ema.prepare(fresh())
    for part in halves:  # the hook after every micro-step: it updates only when a step was made
        state, _ = step(state, part)
        state = ema(state)
    assert state.step == 4 and state.extra["ema"].updates == 4
    assert equal(state.extra["ema"].averages, by_run.extra["ema"].averages)


def test_frozen_parameters_are_not_averaged_and_batch_norm_statistics_are():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    state = lt.State(model=model, optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    state = run(state, 3, [lt.ema(0.5)])
    names = state.extra["ema"].names
    assert names == ["1.weight", "1.bias", "2.weight", "2.bias", "1.running_mean", "1.running_var"]
    assert "1.num_batches_tracked" not in names  # not floating point: kept as the model's
    assert lt.ema(0.5, buffers=False).prepare(lt.State(model=model)).extra["ema"].names == names[:4]


# --- evaluating and exporting with the averaged weights -------------------------------


def test_ema_weights_swaps_the_averages_in_and_restores_the_weights_exactly():
    state = run(fresh(), 5, [lt.ema(0.8)])
    weights = [p.detach().clone() for p in state.model.parameters()]
    averages = [a.clone() for a in state.extra["ema"].averages]
    x = batches(1, seed=7)[0]
    with lt.ema_weights(state) as inside:
        assert inside is state
        assert equal(list(state.model.parameters()), averages)
        averaged = copy.deepcopy(state.model)  # an export: a plain model with the averaged weights
        loss = mse(state.model, x).item()
    assert equal(list(state.model.parameters()), weights)
    assert equal(state.extra["ema"].averages, averages)
    reference, ema = make_model(), hand_written(5, 0.8)[1]
    with torch.no_grad():
        for p, a in zip(reference.parameters(), ema):
            p.copy_(a)
    assert loss == mse(reference, x).item()
    assert equal(list(averaged.parameters()), list(reference.parameters()))


def test_ema_weights_restores_after_an_error_and_refuses_updates_and_saves_inside(tmp_path):
    ema = lt.ema(0.8)
    state = run(fresh(), 2, [ema])
    weights = [p.detach().clone() for p in state.model.parameters()]
    with pytest.raises(KeyError), lt.ema_weights(state):
        raise KeyError("boom")
    assert equal(list(state.model.parameters()), weights)
    with lt.ema_weights(state):
        with pytest.raises(RuntimeError, match=r"cannot be updated inside lt.ema_weights\(state\)"):
            ema(lt.State(model=state.model, optimizer=state.optimizer, extra=state.extra, step=3))
        with pytest.raises(RuntimeError, match=r"cannot be saved inside lt.ema_weights"):
            lt.save(tmp_path / "c.pt", state)
        with pytest.raises(RuntimeError, match="already inside lt.ema_weights"):
            with lt.ema_weights(state):
                pass
    assert equal(list(state.model.parameters()), weights)


def test_evaluate_true_logs_val_ema_metrics_computed_with_the_averaged_weights():
    evals = batches(2, seed=5)
    logged = []
    run(fresh(), 6, [lt.ema(0.8, every=2, evaluate=True)], eval_step=lt.eval_step(mse), eval_data=evals,
        eval_every=4, loggers=[lambda values, step: logged.append((step, dict(values)))])
    by_step = {step: values for step, values in logged if "val_ema_loss" in values}
    assert sorted(by_step) == [4]
    model, ema = hand_written(4, 0.8, every=2)
    with torch.no_grad():
        plain = sum(mse(model, b).item() for b in evals) / 2
        for p, a in zip(model.parameters(), ema):
            p.copy_(a)
        averaged = sum(mse(model, b).item() for b in evals) / 2
    assert by_step[4]["val_ema_loss"] == pytest.approx(averaged, rel=1e-6)
    assert [v["val_loss"] for s, v in logged if s == 4 and "val_loss" in v] == [pytest.approx(plain, rel=1e-6)]


# --- checkpoints ----------------------------------------------------------------------


def test_a_full_checkpoint_round_trips_and_the_ema_continues_exactly(tmp_path):
    ema = lt.ema(0.8, every=2)
    straight = run(fresh(), 8, [ema])
    half = run(fresh(), 4, [ema])
    lt.save(tmp_path / "c.pt", half)
    loaded = lt.load(tmp_path / "c.pt", ema.prepare(fresh(seed=5)))
    assert equal(loaded.extra["ema"].averages, half.extra["ema"].averages)
    assert loaded.extra["ema"].updates == 2 and loaded.extra["ema"].step == 4
    data = batches(8)[4:]
    resumed = lt.run(lt.train_step(mse), loaded, data, max_steps=8, hooks=[ema], progress=False, log_every=None)
    assert equal(resumed.extra["ema"].averages, straight.extra["ema"].averages)
    assert equal(list(resumed.model.parameters()), list(straight.model.parameters()))


@pytest.mark.parametrize("saver_first", [True, False])
def test_a_sharded_checkpoint_and_lt_run_resume_continue_the_ema_exactly(tmp_path, saver_first):
    # (a checkpoint hook listed first saves the average before its update at that step: the
    # resumed run makes that update at its start, from the loaded weights, which are that step's)
    ema = lt.ema(0.8)
    saver = lt.every(3, lt.checkpoint_sharded(dir=tmp_path / "ckpt"))
    hooks = [saver, ema] if saver_first else [ema, saver]
    straight = run(fresh(), 7, [ema])
    run(fresh(), 3, hooks)
    resumed = lt.run(lt.train_step(mse), ema.prepare(fresh(seed=5)), batches(7), max_steps=7, hooks=hooks,
                     resume="latest", progress=False, log_every=None)
    assert resumed.extra["ema"].updates == 7
    assert equal(resumed.extra["ema"].averages, straight.extra["ema"].averages)
    assert equal(list(resumed.model.parameters()), list(straight.model.parameters()))


def test_resuming_needs_the_average_in_the_state_before_the_load(tmp_path):
    state = run(fresh(), 2, [lt.ema(0.8)])
    lt.save(tmp_path / "c.pt", state)
    with pytest.raises(lt.CheckpointError, match=r"state.extra\['ema'\].*hook.prepare\(state\)"):
        lt.load(tmp_path / "c.pt", fresh())


def test_an_average_of_other_entries_does_not_load_and_leaves_the_state_as_it_was(tmp_path):
    lt.save(tmp_path / "c.pt", run(fresh(), 2, [lt.ema(0.8)]))
    target = fresh(seed=5)
    target.model[0].requires_grad_(False)  # (so its average leaves out the first layer)
    target = lt.ema(0.8).prepare(target)
    before = [a.clone() for a in [*target.extra["ema"].averages, *target.model.parameters()]]
    with pytest.raises(lt.CheckpointError, match=r"state.extra\['ema'\] cannot load its saved state \(ValueError: "
                                                 r"the saved average is of other entries of the model: missing \[\], "
                                                 r"unexpected \['0.bias', '0.weight'\]"):
        lt.load(tmp_path / "c.pt", target)
    assert equal([*target.extra["ema"].averages, *target.model.parameters()], before)


def test_starting_a_run_after_loading_a_checkpoint_without_an_average_averages_the_loaded_weights(tmp_path):
    lt.save(tmp_path / "c.pt", run(fresh(), 3))
    ema = lt.ema(0.8)
    state = lt.load(tmp_path / "c.pt", ema.prepare(fresh(seed=5)))  # made from seed 5's weights
    state = lt.run(lt.train_step(mse), state, batches(3), max_steps=3, hooks=[ema], progress=False)
    assert equal(state.extra["ema"].averages, [p.detach() for p in state.model.parameters()])


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"decay": 1.5}, ValueError, r"lt.ema: decay must be a number in \[0, 1\] or a schedule"),
    ({"decay": 0.9, "every": 0}, ValueError, r"lt.ema: every must be an int >= 1 \(optimizer steps\), got 0"),
    ({"decay": 0.9, "start": -1}, ValueError, r"lt.ema: start must be an int >= 0"),
    ({"decay": 0.9, "key": 3}, TypeError, r"lt.ema: key must be a str"),
])
def test_bad_options_are_refused_when_the_hook_is_made(options, error, match):
    with pytest.raises(error, match=match):
        lt.ema(**options)


def test_which_model_to_average_must_be_said_when_there_are_several():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    state = lt.State(model={"a": a, "b": b})
    with pytest.raises(ValueError, match=r"the state has 2 models \(\['model.a', 'model.b'\]\); say which"):
        lt.ema(0.9).prepare(state)
    with pytest.raises(ValueError, match=r"model='c' is not a model of the state"):
        lt.ema(0.9, model="c").prepare(state)
    assert lt.ema(0.9, model="model.b").prepare(state).extra["ema"].averages[0].equal(b.weight)


def test_evaluate_needs_lt_run_evaluation_at_update_steps():
    with pytest.raises(ValueError, match=r"evaluate=True\) evaluates the averaged weights with lt.run's eval_step"):
        run(fresh(), 2, [lt.ema(0.9, evaluate=True)])
    with pytest.raises(ValueError, match=r"give lt.run an eval_every that is a multiple of 2 \(got 3\)"):
        run(fresh(), 2, [lt.ema(0.9, every=2, evaluate=True)], eval_step=lt.eval_step(mse),
            eval_data=batches(1), eval_every=3)


def test_ema_weights_needs_an_average_and_a_bad_schedule_is_named():
    with pytest.raises(ValueError, match=r"state.extra\['ema'\] holds no average"):
        with lt.ema_weights(fresh()):
            pass
    with pytest.raises(ValueError, match=r"the decay schedule gave 2 at update 0"):
        run(fresh(), 2, [lt.ema(lambda n: 2)])
    with pytest.raises(TypeError, match=r"state.extra\['ema'\] holds an object of type int, not an average"):
        lt.ema(0.9).prepare(lt.State(model=torch.nn.Linear(2, 2), extra={"ema": 3}))


# --- 2 ranks, FSDP2 ---------------------------------------------------------------------


def two_ranks(tmp: str) -> list[dict[str, object]]:
    """On each of 2 gloo ranks: lt.shard + lt.distribute("fsdp"), the EMA of the sharded model,
    checkpoints (sharded and full) and a resume."""
    from torch.distributed.tensor import DTensor

    def sharded():
        model = lt.shard(make_model(), policy={torch.nn.Linear})
        return lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))

    rank = lt.rank()
    data = [tuple(t[rank * B:(rank + 1) * B] for t in batch) for batch in batches(6)]
    step = lt.pipe(lt.train_step(mse), lt.distribute("fsdp"))
    ema = lt.ema(0.8)
    straight = lt.run(step, sharded(), data, max_steps=6, hooks=[ema], progress=False, log_every=None)
    average = straight.extra["ema"]
    params = list(straight.model.parameters())
    lt.save(f"{tmp}/full.pt", straight)
    lt.checkpoint_sharded(straight, f"{tmp}/final")
    saver = lt.every(3, lt.checkpoint_sharded(dir=f"{tmp}/ckpt"))
    lt.run(step, sharded(), data, max_steps=3, hooks=[saver, ema], progress=False, log_every=None)
    resumed = lt.run(step, ema.prepare(sharded()), data, max_steps=6, hooks=[saver, ema], resume="latest",
                     progress=False, log_every=None)
    from_full = lt.load(f"{tmp}/full.pt", ema.prepare(sharded()))
    kept = lt.shard(make_model(), policy={torch.nn.Linear}, reshard_after_forward=False)
    kept_state = lt.State(model=kept, optimizer=torch.optim.SGD(kept.parameters(), lr=0.1, momentum=0.9))
    kept_state = lt.run(step, kept_state, data, max_steps=2, hooks=[ema], progress=False, log_every=None)
    x, reference = data[0][0], make_model()
    with torch.no_grad():
        for p, a in zip(reference.parameters(), kept_state.extra["ema"].averages):
            p.copy_(a.full_tensor())
        kept(x)  # (leaves the parameters gathered: lt.ema_weights must reshard before it swaps)
        with lt.ema_weights(kept_state):
            swapped = (kept(x) - reference(x)).abs().max().item()
    mine = {
        "swapped_forward_diff": swapped,
        "dtensors": all(isinstance(a, DTensor) and a.placements == p.placements
                        for a, p in zip(average.averages, params)),
        "local_shapes": [tuple(a.to_local().shape) for a in average.averages],
        "param_local_shapes": [tuple(p.to_local().shape) for p in params],
        "local_bytes": sum(a.to_local().nbytes for a in average.averages),
        "full": [a.full_tensor() for a in average.averages],
        "weights": [p.detach().full_tensor() for p in params],
        "resumed_equal": all(torch.equal(a.to_local(), b.to_local())
                             for a, b in zip(resumed.extra["ema"].averages, average.averages)),
        "full_file_equal": all(torch.equal(a.to_local(), b.to_local())
                               for a, b in zip(from_full.extra["ema"].averages, average.averages)),
    }
    gathered: list[dict[str, object]] = [{}, {}]
    torch.distributed.all_gather_object(gathered, mine)  # every rank's results, so the test sees rank 1's too
    return gathered


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ema")
    return tmp, lt.launch(two_ranks, str(tmp), devices=2)


def test_on_2_ranks_the_ema_of_a_sharded_model_is_sharded_like_it(ranks):
    _, results = ranks
    full_shapes = [(16, 4), (16,), (1, 16), (1,)]
    for r in results:
        assert r["dtensors"]
        assert r["local_shapes"] == r["param_local_shapes"]
    assert results[0]["local_shapes"] == [(8, 4), (8,), (1, 16), (1,)]  # (the 1-row weight: all on rank 0)
    assert results[1]["local_shapes"] == [(8, 4), (8,), (0, 16), (0,)]
    for i, shape in enumerate(full_shapes):
        assert sum(r["local_shapes"][i][0] for r in results) == shape[0]
    total = sum(torch.Size(s).numel() for s in full_shapes) * 4
    assert results[0]["local_bytes"] + results[1]["local_bytes"] == total
    assert results[1]["local_bytes"] == 8 * 5 * 4  # half of the first layer; nothing else


def test_on_2_ranks_the_ema_equals_the_one_process_hand_written_one(ranks):
    _, results = ranks
    model, ema = hand_written(6, 0.8)
    for r in results:
        assert max((a - b).abs().max().item() for a, b in zip(r["weights"], model.parameters())) < 1e-6
        assert max((a - b).abs().max().item() for a, b in zip(r["full"], ema)) < 1e-6
    assert equal(results[0]["full"], results[1]["full"])


def test_on_2_ranks_sharded_and_full_checkpoints_round_trip_and_resume_exactly(ranks):
    tmp, results = ranks
    for r in results:
        assert r["resumed_equal"] and r["full_file_equal"]
        assert r["swapped_forward_diff"] < 1e-6  # the averaged weights, also after a forward left them gathered
    ema = lt.ema(0.8)
    for path in (tmp / "final" / "step-00000006", tmp / "full.pt"):  # onto one process, no group
        loaded = lt.load(path, ema.prepare(fresh(seed=5)))
        assert loaded.extra["ema"].updates == 6
        assert equal(loaded.extra["ema"].averages, results[0]["full"])
    consolidated = lt.consolidate(tmp / "final" / "step-00000006", tmp / "consolidated.pt")
    assert equal(lt.load(consolidated, ema.prepare(fresh(seed=5))).extra["ema"].averages, results[0]["full"])


def test_ema_weights_on_a_sharded_model_holding_gathered_parameters_from_a_forward(one_rank_group):
    # with reshard_after_forward=False a forward without backward leaves the parameters gathered;
    # a swap of the shards alone would not reach them: lt.ema_weights reshards first
    model = lt.shard(make_model(), reshard_after_forward=False)
    state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    state = run(state, 4, [lt.ema(0.8)])
    assert type(state.extra["ema"].averages[0]).__name__ == "DTensor"
    x = batches(1, seed=7)[0][0]
    with torch.no_grad():
        trained = model(x)  # (leaves the parameters gathered)
        with lt.ema_weights(state):
            averaged = model(x)
        assert torch.equal(model(x), trained)
    reference, ema = hand_written(4, 0.8)
    with torch.no_grad():
        for p, a in zip(reference.parameters(), ema):
            p.copy_(a)
        assert torch.allclose(averaged, reference(x), rtol=0, atol=1e-6)
        assert not torch.allclose(averaged, trained, rtol=0, atol=1e-3)
