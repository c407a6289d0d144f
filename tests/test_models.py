"""Model transforms: to_precision, init_module, materialize, and shard's precision."""

import pytest
import torch

import ltransform as lt
from helpers import make_model


@pytest.mark.parametrize(("name", "dtype"), [("bf16-true", torch.bfloat16), ("16-true", torch.float16),
                                             ("64-true", torch.float64), ("bf16-mixed", torch.float32)])
def test_to_precision_casts_floating_weights(name, dtype):
    model = make_model().to(torch.float16) if name == "bf16-mixed" else make_model()
    assert lt.pipe(model, lt.to_precision(name)) is model
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_to_precision_rejects_non_modules_and_unknown_names():
    with pytest.raises(TypeError, match="to_precision: expected a torch.nn.Module, got int"):
        lt.to_precision(3, "bf16-true")
    with pytest.raises(ValueError, match=r"to_precision: unknown precision 'half'; expected one of"):
        lt.to_precision(make_model(), "half")


def test_init_module_builds_in_the_precision_dtype_without_an_fp32_copy():
    model = lt.init_module(torch.nn.Linear, 8, 8, precision="bf16-true")
    assert model.weight.dtype == torch.bfloat16 and model.weight.device.type == "cpu"
    assert torch.get_default_dtype() == torch.float32


def test_empty_init_allocates_nothing_and_materialize_matches_direct_construction():
    model = lt.init_module(lambda: make_model(seed=3), empty=True)
    assert all(p.is_meta for p in model.parameters())
    torch.manual_seed(3)
    lt.materialize(model)
    reference = make_model(seed=3)
    assert all(not p.is_meta for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_materialize_with_a_user_init_function():
    def init(module):
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.constant_(module.weight, 0.5)
            torch.nn.init.zeros_(module.bias)

    model = lt.pipe(lt.init_module(make_model, empty=True), lt.materialize(init=init))
    assert all(torch.all(m.weight == 0.5) for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_init_module_partial_form_and_errors():
    build = lt.init_module(precision="64-true")
    assert build(lambda: torch.nn.Linear(2, 2)).weight.dtype == torch.float64
    with pytest.raises(TypeError, match="init_module: expected a function that builds the model"):
        lt.init_module(3)
    with pytest.raises(TypeError, match="materialize: expected a torch.nn.Module"):
        lt.materialize("x")


# --- shard's precision: FSDP2's MixedPrecisionPolicy is decided when sharding ------------------


@pytest.fixture
def fully_shard_calls(monkeypatch):
    """Every fully_shard call lt.shard makes, as (module, keyword arguments); the calls go through."""
    import torch.distributed.fsdp as fsdp

    calls, real = [], fsdp.fully_shard
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: calls.append((module, kw)) or real(module, **kw))
    return calls


def gathered_dtypes(model):
    """The dtype of each Linear's weight inside its forward, after FSDP2 all-gathered it (FSDP2's
    own pre-forward hook runs first): what the policy decides, read through public behaviour."""
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    with torch.no_grad():
        model(torch.ones(2, 4))
    return seen


@pytest.mark.parametrize(("precision", "param_dtype", "recorded"), [
    ("bf16-mixed", torch.bfloat16, "bf16-mixed"), ("16-mixed", torch.float16, "16-mixed"),
    ("bf16", torch.bfloat16, "bf16-mixed"), (lt.PRECISIONS["bf16-mixed"], torch.bfloat16, "bf16-mixed"),
    ("32-true", None, "32-true"), (None, None, "32-true")])
def test_shard_passes_the_precisions_policy_to_every_fully_shard_call(one_rank_group, fully_shard_calls,
                                                                      precision, param_dtype, recorded):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = lt.shard(make_model(), policy={torch.nn.Linear}, precision=precision)
    expected = (MixedPrecisionPolicy() if param_dtype is None
                else MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32))
    assert [m for m, _ in fully_shard_calls] == [model[0], model[2], model]
    assert [kw["mp_policy"] for _, kw in fully_shard_calls] == [expected] * 3
    assert gathered_dtypes(model) == [param_dtype or torch.float32] * 2
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # sharded weights stay float32
    assert model._ltransform_shard_precision == recorded  # what with_precision checks against


def test_to_precision_then_shard_takes_the_recorded_precision(one_rank_group, fully_shard_calls):
    model = lt.pipe(make_model(), lt.to_precision("bf16-mixed"), lt.shard(policy={torch.nn.Linear}))
    assert {kw["mp_policy"].param_dtype for _, kw in fully_shard_calls} == {torch.bfloat16}
    assert {kw["mp_policy"].reduce_dtype for _, kw in fully_shard_calls} == {torch.float32}
    assert gathered_dtypes(model) == [torch.bfloat16] * 2
    assert model._ltransform_shard_precision == "bf16-mixed"
    # an explicit precision is the decision, whatever to_precision recorded
    fully_shard_calls.clear()
    model = lt.pipe(make_model(), lt.to_precision("bf16-mixed"), lt.shard(precision="16-mixed"))
    assert [kw["mp_policy"].param_dtype for _, kw in fully_shard_calls] == [torch.float16]
    assert gathered_dtypes(model) == [torch.float16] * 2


def test_to_precision_records_its_name_as_a_plain_attribute():
    model = lt.to_precision(make_model(), "bf16")
    assert model._ltransform_precision == "bf16-mixed"
    assert "_ltransform_precision" not in dict(model.named_modules()) and len(model.state_dict()) == 4
    assert lt.to_precision(model, "16-true")._ltransform_precision == "16-true"  # the latest choice


def test_shard_precision_is_validated_when_applied_and_kept_by_the_partial_form():
    with pytest.raises(ValueError, match=r"shard: unknown precision 'bf17'; expected one of: '16-mixed', "):
        lt.shard(make_model(), precision="bf17")  # one process: nothing is sharded, still checked
    with pytest.raises(ValueError, match=r"shard: unknown precision 'bf17'"):
        lt.shard(policy={torch.nn.Linear}, precision="bf17")
    with pytest.raises(TypeError, match=r"shard: precision must be a name such as 'bf16-mixed', got float"):
        lt.shard(precision=16.0)
    partial = lt.shard(policy={torch.nn.Linear}, precision="bf16")
    assert repr(partial) == "lt.shard(policy={<class 'torch.nn.modules.linear.Linear'>}, precision='bf16-mixed')"
    assert repr(lt.shard(policy=100)) == "lt.shard(policy=100)"
    model = make_model()
    assert partial(model) is model  # one process, no group: unchanged, and no record of a sharding
    assert not hasattr(model, "_ltransform_shard_precision")


def test_partial_shard_with_a_precision_shards_with_its_policy(one_rank_group, fully_shard_calls):
    model = lt.pipe(make_model(), lt.shard(policy={torch.nn.Linear}, precision="16-mixed"))
    assert [kw["mp_policy"].param_dtype for _, kw in fully_shard_calls] == [torch.float16] * 3
    assert gathered_dtypes(model) == [torch.float16] * 2


def test_a_mixed_to_precision_after_shard_is_an_order_error(one_rank_group):
    sharded = lt.shard(make_model())
    with pytest.raises(RuntimeError, match=r"to_precision must be applied before shard; reorder: "
                                           r"lt.pipe\(model, .*lt.to_precision\(name\), lt.compile\(policy=...\), "
                                           r"lt.shard\(policy=...\)\)"):
        lt.to_precision(sharded, "bf16-mixed")
    lt.to_precision(torch.compile(make_model()), "bf16-mixed")  # compile does not take a policy: fine


class _TiedHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.block = torch.nn.Embedding(8, 4), torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight


def test_shard_refuses_a_policy_that_would_untie_weights(one_rank_group):
    with pytest.raises(ValueError, match=r"tied parameters 'embed.weight' \(unit '<root>'\), "
                                         r"'head.weight' \(unit 'head'\) in different FSDP units"):
        lt.shard(_TiedHead(), policy={torch.nn.Linear})
    model = lt.shard(_TiedHead(), policy=lambda m: isinstance(m, torch.nn.Linear) and m.bias is not None)
    assert model.head.weight is model.embed.weight  # the tie kept in the root unit
