"""Each torch internal that ltransform/distributed/wrappers.py reads, pinned on this torch: a
torch upgrade that moves one fails here, by name, before it fails somewhere in the library."""

from __future__ import annotations

import torch

from ltransform.distributed import wrappers
from helpers import make_data, make_model, mse



def test_get_registry_names_the_composable_apis_applied(one_rank_group):
    from torch.distributed._composable import checkpoint, replicate
    from torch.distributed._composable.contract import _get_registry
    from torch.distributed.fsdp import fully_shard

    plain = make_model()
    assert _get_registry(plain) is None and wrappers.composable_apis(plain) == frozenset()
    checkpointed, replicated, sharded = make_model(), make_model(), make_model()
    checkpoint(checkpointed[0])
    replicate(replicated)
    fully_shard(sharded)
    assert list(_get_registry(checkpointed[0])) == ["checkpoint"]
    assert wrappers.composable_apis(checkpointed[0]) == {"checkpoint"} and wrappers.is_checkpointed(checkpointed[0])
    assert wrappers.composable_apis(checkpointed) == frozenset()  # the module itself, not its children
    assert wrappers.composable_apis(replicated) == {"replicate"} and wrappers.is_replicated(replicated)
    assert wrappers.composable_apis(sharded) == {"fully_shard"} and wrappers.is_sharded(sharded)
    assert not wrappers.is_replicated(sharded) and not wrappers.is_sharded(replicated)


class Counting(torch.nn.Linear):
    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_composable_checkpoint_recomputes_in_place():
    model = make_model()
    model[0].__class__, model[0].calls = Counting, 0
    keys = list(model.state_dict())
    wrappers.checkpoint(model[0])
    assert wrappers.is_checkpointed(model[0]) and list(model.state_dict()) == keys
    mse(model, make_data(1)[0]).backward()
    assert model[0].calls == 2  # the forward, and its recomputation in backward


def test_gradient_sync_reads_what_set_requires_gradient_sync_set_on_fsdp2(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model[0])
    fully_shard(model)
    root_only = torch.nn.Sequential(torch.nn.Linear(4, 16))  # a root holding no parameters of its own
    fully_shard(root_only[0])
    fully_shard(root_only)
    for sharded, unit in ((model, model[0]), (root_only, root_only[0])):
        state = sharded._get_fsdp_state()  # FSDPModule._get_fsdp_state(), FSDPState._fsdp_param_group
        assert hasattr(state, "_fsdp_param_group")
        assert wrappers.gradient_sync(sharded)  # the default
        sharded.set_requires_gradient_sync(False)
        assert not wrappers.gradient_sync(sharded)
        assert not unit._get_fsdp_state()._fsdp_param_group.reduce_grads
        sharded.set_requires_gradient_sync(True)
        assert wrappers.gradient_sync(sharded)
    assert root_only._get_fsdp_state()._fsdp_param_group is None  # why gradient_sync looks further


def test_gradient_sync_reads_what_set_requires_gradient_sync_set_on_replicate(one_rank_group):
    from torch.distributed._composable import replicate

    model = make_model()
    replicate(model)
    assert replicate.state(model)._no_sync is False
    assert wrappers.gradient_sync(model)
    model.set_requires_gradient_sync(False)
    assert replicate.state(model)._no_sync is True and not wrappers.gradient_sync(model)
    model.set_requires_gradient_sync(True)
    assert wrappers.gradient_sync(model)
    assert wrappers.gradient_sync(make_model())  # a plain module always reduces (nothing to skip)


def test_orig_mod_is_the_module_torch_compile_wrapped():
    model = make_model()
    compiled = torch.compile(model)  # nothing is compiled until it is called
    assert type(compiled).__name__ == "OptimizedModule" and compiled._orig_mod is model
    assert wrappers.compiled_original(compiled) is model
    assert wrappers.compiled_original(model) is None


def test_compiled_call_impl_is_set_by_module_compile():
    model = make_model()
    assert model._compiled_call_impl is None and not wrappers.is_compiled_in_place(model)
    model.compile()
    assert model._compiled_call_impl is not None and wrappers.is_compiled_in_place(model)


def test_a_function_torch_compile_returned_carries_its_original_and_compile_forward_marks_the_module():
    compiled = torch.compile(torch.nn.Linear.forward, backend="eager")
    assert callable(compiled._torchdynamo_orig_callable)  # the attribute is_compiled_in_place reads
    model = torch.nn.Linear(2, 2)
    wrappers.compile_forward(model, backend="eager")
    assert wrappers.is_compiled_in_place(model) and model._compiled_call_impl is None
    model.forward = lambda x: x  # a forward replaced by something else is not a compiled one
    assert not wrappers.is_compiled_in_place(model)


def test_mesh_of_a_sharded_module_is_its_parameters_device_mesh(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    assert wrappers.mesh_of(model) is None
    fully_shard(model)
    assert wrappers.mesh_of(model) is model[0].weight.device_mesh and wrappers.mesh_of(model).ndim == 1
