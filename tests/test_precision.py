"""with_precision against hand-written autocast / GradScaler loops, names, dtypes, errors."""

import pytest
import torch
from torch.nn.utils import clip_grad_norm_

import ltransform as lt
from helpers import assert_same_params, make_data, make_model, mse, params_changed, sgd


def test_16_mixed_is_bitwise_equal_to_a_hand_written_scaler_loop():
    data = make_data()
    ref = make_model()
    opt = sgd(ref)
    scaler = torch.amp.GradScaler("cpu")
    norms = []
    for batch in data:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = mse(ref, batch)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norms.append(clip_grad_norm_(ref.parameters(), 0.5))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    model = make_model()
    step = lt.pipe(lt.train_step(mse), lt.with_precision("16-mixed"), lt.clip_gradients(max_norm=0.5))
    seen = []
    state = lt.run(step, lt.State(model=model, optimizer=sgd(model)), data, log_every=1,
                   loggers=[lambda m, s: seen.append(m["grad_norm"])], progress=False)
    assert_same_params(model, ref, exact=True)
    assert seen == [n.item() for n in norms]  # clipping saw the unscaled gradients
    assert state.extra["grad_scaler"].get_scale() == scaler.get_scale()


def test_clipping_under_16_mixed_sees_unscaled_gradients():
    data = make_data(1)
    ref = make_model()
    mse(ref, data[0]).backward()
    true_norm = clip_grad_norm_(ref.parameters(), float("inf")).item()

    model = make_model()
    step = lt.with_precision(lt.clip_gradients(lt.train_step(mse), max_norm=1e6), "16-mixed")
    _, metrics = step(lt.State(model=model, optimizer=sgd(model)), data[0])
    assert metrics["grad_norm"].item() == pytest.approx(true_norm, rel=1e-2)  # not 65536x larger


def _nan_on_second_batch():
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = mse(model, batch)
        return loss * float("nan") if len(calls) == 2 else loss
    return loss_fn


def test_an_inf_or_nan_gradient_skips_the_update_and_the_scheduler():
    model = make_model()
    optimizer = sgd(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    step = lt.pipe(lt.train_step(_nan_on_second_batch()), lt.with_precision("16-mixed"),
                   lt.clip_gradients(max_norm=1.0))
    state = lt.State(model=model, optimizer=optimizer, scheduler=scheduler)
    data = make_data(2)
    state, _ = step(state, data[0])
    scale = state.extra["grad_scaler"].get_scale()
    before = [p.detach().clone() for p in model.parameters()]

    state, _ = step(state, data[1])
    assert not params_changed(before, model)
    assert all(p.grad is None for p in model.parameters())
    assert (state.step, state.micro_step, scheduler.last_epoch) == (1, 2, 1)
    assert state.extra["grad_scaler"].get_scale() == scale / 2


def test_a_hand_written_step_sees_optimizer_step_return_false_on_inf():
    results = []

    def my_step(state, batch):
        lt.backward(mse(state.model, batch) * float("inf"))
        results.append(lt.optimizer_step(state.optimizer))
        return state, {}

    model = make_model()
    lt.with_precision(my_step, "16-mixed")(lt.State(model=model, optimizer=sgd(model)), make_data(1)[0])
    assert results == [False]


@pytest.mark.parametrize(("name", "dtype"), [
    ("bf16-true", torch.bfloat16), ("16-true", torch.float16), ("64-true", torch.float64),
    ("bf16", torch.float32), ("16-mixed", torch.float32), (32, torch.float32),
])
def test_weights_are_in_the_precision_dtype(name, dtype):
    model = make_model()
    state = lt.run(lt.with_precision(lt.train_step(mse), name), lt.State(model=model, optimizer=sgd(model)),
                   make_data(2), progress=False)
    assert {p.dtype for p in state.model.parameters()} == {dtype}
    assert torch.get_default_dtype() == torch.float32


def test_true_precision_casts_inputs_and_matches_a_hand_written_loop():
    data = make_data(4)
    ref = make_model().to(torch.float64)
    opt = sgd(ref)
    for x, y in data:
        mse(ref, (x.double(), y.double())).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model = lt.to_precision(make_model(), "64-true")
    dtypes = []

    def loss_fn(m, batch):
        dtypes.append((batch[0].dtype, torch.get_default_dtype()))
        return mse(m, batch)

    lt.run(lt.with_precision(lt.train_step(loss_fn), "64-true"), lt.State(model=model, optimizer=sgd(model)),
           data, progress=False)
    assert dtypes[0] == (torch.float64, torch.float64)
    assert_same_params(model, ref, exact=True)


def test_bf16_mixed_keeps_fp32_weights_and_autocasts_the_forward():
    model = make_model()
    seen = []

    def loss_fn(m, batch):
        out = m(batch[0])
        seen.append(out.dtype)
        return (out.float() - batch[1]).pow(2).mean()

    step = lt.with_precision(lt.train_step(loss_fn), "bf16-mixed")
    lt.run(step, lt.State(model=model, optimizer=sgd(model)), make_data(2), progress=False)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad for p in model.parameters()} == {None}


def bf16_autocast_loop(model, data):
    """bf16-mixed written by hand: the forward under CPU autocast, SGD with momentum."""
    opt = sgd(model)
    for batch in data:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mse(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_bf16_mixed_matches_a_hand_written_autocast_loop():
    data = make_data(4)
    ref = make_model()
    bf16_autocast_loop(ref, data)
    model = make_model()
    lt.run(lt.with_precision(lt.train_step(mse), "bf16-mixed"), lt.State(model=model, optimizer=sgd(model)),
           data, progress=False)
    assert_same_params(model, ref, exact=True)


def test_aliases_resolve_to_lightning_names():
    from ltransform.core.precisions import resolve_precision as resolve
    assert [resolve(a).name for a in ("16", "bf16", "32", "64", 16, 32, 64)] == [
        "16-mixed", "bf16-mixed", "32-true", "64-true", "16-mixed", "32-true", "64-true"]


def test_unknown_precision_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown precision 'bf17'; expected one of: '16-mixed', "
                                         r"'16-true', '32-true', '64-true', 'bf16-mixed', 'bf16-true', "
                                         r"'torchao-float8', 'transformer-engine', 'transformer-engine-float16'"):
        lt.with_precision("bf17")


@pytest.mark.parametrize("bad", [True, 1.5, None])
def test_a_precision_of_the_wrong_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="precision must be a name such as 'bf16-mixed'"):
        lt.with_precision(lt.train_step(mse), bad)


def test_two_precisions_on_one_step_are_rejected_when_composed():
    with pytest.raises(ValueError, match=r"with_precision\('bf16-true'\) cannot be combined with "
                                         r"with_precision\('16-mixed'\)"):
        lt.pipe(lt.train_step(mse), lt.with_precision("16-mixed"), lt.with_precision("bf16-true"))


def test_16_mixed_on_fp16_weights_is_rejected_with_the_fix():
    model = make_model().half()
    step = lt.with_precision(lt.train_step(mse), "16-mixed")
    with pytest.raises(ValueError, match=r"keeps float32 weights .* float16 parameters \(e.g. '0.weight'\); "
                                         r"use '16-true', or lt.to_precision\(model, '16-mixed'\)"):
        lt.run(step, lt.State(model=model, optimizer=sgd(model)), make_data(1), progress=False)


def test_bf16_mixed_on_bf16_weights_is_rejected_with_the_fix():
    model = make_model().to(torch.bfloat16)
    step = lt.with_precision(lt.train_step(mse), "bf16-mixed")
    with pytest.raises(ValueError, match=r"keeps float32 weights \(and autocasts only the forward\), but the model "
                                         r"has bfloat16 parameters .*; use 'bf16-true'"):
        step(lt.State(model=model, optimizer=sgd(model)), make_data(1)[0])


def test_16_mixed_on_a_state_without_room_for_the_scaler():
    class Bare:
        def __init__(self, model):
            self.model, self.optimizer, self.step, self.micro_step = model, sgd(model), 0, 0

    with pytest.raises(TypeError, match="cannot store 'grad_scaler' in a state of type Bare"):
        lt.with_precision(lt.train_step(mse), "16-mixed")(Bare(make_model()), make_data(1)[0])


# --- a sharded model: lt.shard decided FSDP2's policy, with_precision checks it ----------------


def _full(model):
    return [p.full_tensor().detach() for p in model.parameters()]


@pytest.mark.parametrize("how", ["shard", "to_precision"])
def test_bf16_mixed_on_a_sharded_model_equals_fully_shard_with_the_policy_bitwise(one_rank_group, how):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    data = make_data(3)
    ref = make_model()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in (ref[0], ref[2], ref):
        fully_shard(module, mp_policy=policy)
    bf16_autocast_loop(ref, data)
    decide = ([lt.shard(policy={torch.nn.Linear}, precision="bf16-mixed")] if how == "shard"
              else [lt.to_precision("bf16-mixed"), lt.shard(policy={torch.nn.Linear})])
    model = lt.pipe(make_model(), *decide)
    step = lt.pipe(lt.train_step(mse), lt.with_precision("bf16"), lt.distribute("fsdp"))
    lt.run(step, lt.State(model=model, optimizer=sgd(model)), data, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # sharded master weights stay fp32
    assert all(torch.equal(a, b) for a, b in zip(_full(model), _full(ref)))


MISMATCH = (r"with_precision\('bf16-mixed'\): the model was sharded without a mixed-precision policy \(lt.shard "
            r"decided '32-true'\); FSDP2 takes its MixedPrecisionPolicy when sharding: lt.pipe\(model, "
            r"lt.shard\(policy=..., precision='bf16-mixed'\)\) or lt.pipe\(model, lt.to_precision\('bf16-mixed'\), "
            r"lt.shard\(policy=...\)\)")


def test_a_precision_the_sharding_did_not_decide_is_an_error_naming_the_fix(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    def prepare(model, precision):
        step = lt.pipe(lt.train_step(mse), lt.with_precision(precision), lt.distribute("fsdp"))
        return lt.prepare(step, lt.State(model=model, optimizer=sgd(model)))

    with pytest.raises(ValueError, match=MISMATCH):
        prepare(lt.shard(make_model(), policy={torch.nn.Linear}), "bf16-mixed")
    with pytest.raises(ValueError, match=r"with_precision\('16-mixed'\): the model was sharded with a bfloat16 "
                                         r"mixed-precision policy \(lt.shard decided 'bf16-mixed'\); .* "
                                         r"lt.shard\(policy=..., precision='16-mixed'\)\)"):
        prepare(lt.shard(make_model(), precision="bf16-mixed"), "16-mixed")
    sharded = lt.shard(make_model(), precision="bf16-mixed")
    with pytest.raises(ValueError, match=r"with_precision\('bf16-true'\): the model was sharded with a bfloat16 "
                                         r"mixed-precision policy \(lt.shard decided 'bf16-mixed'\)"):
        prepare(sharded, "bf16-true")
    assert {p.dtype for p in sharded.parameters()} == {torch.float32}  # checked before anything is cast
    prepare(lt.shard(make_model(), precision="16-mixed"), "16")  # they agree
    prepare(lt.shard(make_model()), "64-true")  # neither has a policy
    own = make_model()
    fully_shard(own)  # sharded by the user: their policy, not checked
    prepare(own, "bf16-mixed")
