"""distribute, shard, checkpoint_activations and the order checks in one process (world size 1),
with and without a 1-rank gloo process group. The 2-rank tests are in tests/distributed/."""

from __future__ import annotations

import pytest
import torch

import ltransform as lt
from helpers import assert_same_params, make_data, make_model, mse, sgd



def plain_loop(model, data, accumulate=1, clip=None):
    opt = sgd(model)
    for i, batch in enumerate(data):
        (mse(model, batch) / accumulate).backward()
        if (i + 1) % accumulate == 0:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model


def train(step, model, data):
    state = lt.State(model=model, optimizer=sgd(model))
    for batch in data:
        state, _ = step(state, batch)
    return state


@pytest.mark.parametrize("strategy", ["auto", "single", "ddp", "fsdp", "hsdp", lt.Strategy(name="ddp")])
def test_one_process_without_a_group_trains_exactly_like_a_plain_loop(strategy):
    model = lt.shard(make_model(), policy={torch.nn.Linear})  # no group: unchanged
    assert type(model[0].weight) is torch.nn.Parameter
    step = lt.pipe(lt.train_step(mse), lt.distribute(strategy), lt.accumulate(2), lt.clip_gradients(max_norm=0.5))
    state = train(step, model, make_data())
    assert state.step == 4
    assert_same_params(model, plain_loop(make_model(), make_data(), accumulate=2, clip=0.5))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "auto"])
def test_one_rank_group_ddp_and_fsdp_match_a_plain_loop(one_rank_group, strategy):
    model = make_model()
    if strategy != "ddp":
        model = lt.shard(model, policy={torch.nn.Linear})
        assert hasattr(model[0].weight, "to_local")  # a real FSDP2 DTensor on one rank
    step = lt.pipe(lt.train_step(mse), lt.distribute(strategy), lt.accumulate(2), lt.clip_gradients(max_norm=0.5))
    train(step, model, make_data())
    ref = plain_loop(make_model(), make_data(), accumulate=2, clip=0.5)
    for p, q in zip(model.parameters(), ref.parameters()):
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown strategy 'dp'; expected one of: 'auto', 'single', 'ddp', "
                                         "'fsdp', 'hsdp'"):
        lt.distribute(lt.train_step(mse), "dp")
    with pytest.raises(ValueError, match="'name' must be in"):
        lt.Strategy(name="zero3")


def test_distribute_twice_is_rejected_when_composed():
    with pytest.raises(ValueError, match=r"distribute\('fsdp'\) cannot be combined with distribute\('ddp'\)"):
        lt.pipe(lt.train_step(mse), lt.distribute("ddp"), lt.distribute("fsdp"))


def test_explain_shows_the_sync_stage_on_non_boundary_micro_steps(capsys):
    lt.explain(lt.pipe(lt.train_step(mse), lt.accumulate(4), lt.distribute("ddp")))
    out = capsys.readouterr().out
    non_boundary = out.split("non-boundary")[1]
    assert "set_requires_gradient_sync(False)" in non_boundary
    assert "set_requires_gradient_sync(False)" not in out.split("non-boundary")[0]


def test_shard_validates_policy_and_mesh_when_applied():
    with pytest.raises(TypeError, match="a set of module classes must hold only nn.Module subclasses"):
        lt.shard(make_model(), policy={"Linear"})
    with pytest.raises(ValueError, match="minimum parameter count must be positive"):
        lt.shard(make_model(), policy=0)
    with pytest.raises(TypeError, match="policy must be a set of module classes"):
        lt.shard(make_model(), policy="blocks")
    with pytest.raises(TypeError, match=r"mesh must be a DeviceMesh or a shape \(replicas, shards\)"):
        lt.shard(make_model(), mesh=(2, "x"))
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        lt.shard("model")


def test_shard_twice_is_an_error(one_rank_group):
    model = lt.shard(make_model())
    with pytest.raises(RuntimeError, match="already sharded"):
        lt.shard(model)


def test_optimizer_built_before_shard_is_caught_before_training(one_rank_group):
    model = make_model()
    optimizer = sgd(model)
    lt.shard(model, policy={torch.nn.Linear})
    step = lt.train_step(mse)  # even with no distribute: any step's prepare checks
    with pytest.raises(RuntimeError, match=r"built before lt.shard.*build the optimizer after"):
        step(lt.State(model=model, optimizer=optimizer), make_data(1)[0])


class Counting(torch.nn.Linear):
    calls = 0

    def forward(self, x):
        Counting.calls += 1
        return super().forward(x)


def counting_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(Counting(4, 16), torch.nn.Tanh(), Counting(16, 1))


def test_checkpoint_activations_recomputes_and_gives_identical_gradients():
    model = counting_model()
    keys = list(model.state_dict())
    model = lt.pipe(model, lt.checkpoint_activations(policy={Counting}))
    assert list(model.state_dict()) == keys  # in place: checkpoints load unchanged
    Counting.calls = 0
    mse(model, make_data(1)[0]).backward()
    assert Counting.calls == 4  # 2 forwards + 2 recomputations in backward
    ref = counting_model()
    Counting.calls = 0
    mse(ref, make_data(1)[0]).backward()
    assert Counting.calls == 2
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_checkpoint_activations_errors():
    with pytest.raises(ValueError, match="give a policy"):
        lt.checkpoint_activations(make_model())
    with pytest.raises(ValueError, match="matches no submodule"):
        lt.checkpoint_activations(make_model(), policy={torch.nn.Conv2d})
    model = lt.checkpoint_activations(make_model(), policy={torch.nn.Linear})
    with pytest.raises(RuntimeError, match="already applied"):
        lt.checkpoint_activations(model, policy={torch.nn.Linear})


def test_order_checkpoint_then_compile_then_shard_is_enforced(one_rank_group):
    compiled = torch.compile(make_model())
    with pytest.raises(RuntimeError, match="checkpoint_activations must be applied before torch.compile; reorder"):
        lt.checkpoint_activations(compiled, policy={torch.nn.Linear})
    sharded = lt.shard(make_model())
    with pytest.raises(RuntimeError, match="checkpoint_activations must be applied before shard; reorder"):
        lt.checkpoint_activations(sharded, policy={torch.nn.Linear})
    late = torch.compile(lt.shard(make_model()))
    step = lt.pipe(lt.train_step(mse), lt.distribute("fsdp"))
    with pytest.raises(RuntimeError, match="torch.compile must be applied before shard; reorder"):
        lt.prepare(step, lt.State(model=late, optimizer=sgd(late)))
    # the right order works: checkpoint, compile, shard
    model = lt.pipe(make_model(), lt.checkpoint_activations(policy={torch.nn.Linear}))
    lt.shard(torch.compile(model))


def test_collectives_are_the_identity_in_one_process():
    t = torch.tensor([1.0, 2.0])
    assert lt.all_reduce(t, "sum").tolist() == [1.0, 2.0]
    assert [x.tolist() for x in lt.all_gather(t)] == [[1.0, 2.0]]
    assert lt.broadcast("x") == "x"
    lt.barrier()
    assert (lt.rank(), lt.world_size(), lt.local_rank(), lt.device()) == (0, 1, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown op 'avg'; expected one of: 'mean', 'sum'"):
        lt.all_reduce(t, "avg")


def test_to_device_moves_every_tensor_in_a_nested_batch():
    from ltransform.distributed.env import to_device

    batch = {"x": torch.ones(2), "pair": (torch.zeros(1), "label"), "n": 3}
    moved = to_device(batch, torch.device("meta"))
    assert moved["x"].is_meta and moved["pair"][0].is_meta
    assert moved["pair"][1] == "label" and moved["n"] == 3
    assert not batch["x"].is_meta  # the input is left as it was
