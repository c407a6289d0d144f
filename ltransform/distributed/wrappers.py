"""What ltransform needs to know of torch's wrapped modules: FSDP2, composable ``replicate``
and ``checkpoint``, ``torch.compile``.

Every read of torch internals that ltransform's model and step transforms make lives here,
one small function each, so a torch upgrade that moves one breaks this file (and
``tests/test_wrappers.py``, which pins each of them), not the library:

- ``torch.distributed._composable.contract._get_registry(module)``: which composable APIs
  (``"replicate"``, ``"checkpoint"``, ``"fully_shard"``) were applied to a module
  (:func:`composable_apis`); torch has no public query.
- ``torch.distributed._composable.checkpoint``: activation checkpointing applied in place, the
  composable form (:func:`checkpoint`); ``torch.utils.checkpoint`` only wraps a function.
- ``FSDPModule._get_fsdp_state()._fsdp_param_group.reduce_grads`` and
  ``replicate.state(module)._no_sync``: what ``set_requires_gradient_sync`` last set
  (:func:`gradient_sync`), so a caller can restore it; torch has setters but no getters.
- ``OptimizedModule._orig_mod``: the module ``torch.compile(model)`` wraps (:func:`compiled_original`).
- ``Module._compiled_call_impl``: set by ``module.compile()``, and ``_torchdynamo_orig_callable``,
  which marks a function ``torch.compile`` returned (:func:`is_compiled_in_place`).
- ``torch_xla._XLAC._get_xla_sharding_spec(tensor)``: whether an XLA tensor is split over the
  devices (:func:`xla_sharded`); torch_xla has no public query.

Everything else ltransform does with these modules is torch's public API: FSDP2's
``MixedPrecisionPolicy`` in particular is a ``fully_shard`` argument, decided by ``lt.shard``.
Not here (yet): ``torch.utils._pytree.tree_map`` (``distributed/env.py``, ``steps/precision.py``),
``torch.distributed._composable.replicate`` applied by ``steps/distribute.py``,
``Module._non_persistent_buffers_set`` (``models/weights.py``), and the DCP internals the
checkpoint package reads (``checkpoint/sharded.py``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule


def is_xla_sharded(module: torch.nn.Module) -> bool:
    """A module torch_xla's FSDPv2 wraps (checked by name: importing torch_xla starts its runtime)."""
    kind = type(module)
    return kind.__name__ == "SpmdFullyShardedDataParallel" and kind.__module__.startswith("torch_xla")


def xla_sharded(tensor: torch.Tensor) -> bool:
    """An XLA tensor split over devices (not replicated): torch_xla's ``_get_xla_sharding_spec``,
    which has no public form."""
    import torch_xla

    spec = torch_xla._XLAC._get_xla_sharding_spec(tensor)
    return bool(spec) and spec != "{replicated}"


def is_sharded(module: torch.nn.Module) -> bool:
    """A module ``fully_shard`` was applied to (FSDP2's public ``FSDPModule``)."""
    if "torch.distributed.fsdp" not in sys.modules:
        return False  # nothing can be sharded; and importing FSDP costs ~0.1 s
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Free the parameters FSDP2 left gathered, so that ``model`` holds its shards again: after a
    forward without backward the root (whose ``reshard_after_forward`` is off by default) and any
    unit with it off keep plain gathered parameters until the next step, which whoever reads the
    parameters themselves (checkpoints, averages) must not see."""
    for module in model.modules():
        if is_sharded(module):
            module.reshard()  # type: ignore[operator]


def is_nf4(tensor: Any) -> bool:
    """A torchao ``NF4Tensor`` (``lt.quantize(..., backend="torchao")``), checked without importing torchao."""
    return any(c.__name__ == "NF4Tensor" and c.__module__.startswith("torchao") for c in type(tensor).__mro__)


def composable_apis(module: torch.nn.Module) -> frozenset[str]:
    """The names of torch's composable APIs applied to ``module`` itself (``"replicate"``,
    ``"checkpoint"``, ``"fully_shard"``), read from torch's private registry."""
    if "torch.distributed._composable.contract" not in sys.modules:
        return frozenset()  # no composable API was imported, so none was applied
    from torch.distributed._composable.contract import _get_registry

    registry = _get_registry(module)
    return frozenset(registry or ())


def is_replicated(module: torch.nn.Module) -> bool:
    """A module torch's composable ``replicate`` (DDP) was applied to."""
    return "replicate" in composable_apis(module)


def is_checkpointed(module: torch.nn.Module) -> bool:
    """A module composable activation checkpointing (or torch_xla's, on XLA) was applied to."""
    return "checkpoint" in composable_apis(module) or "_xla_checkpointed_forward_original" in vars(module)


def checkpoint(module: torch.nn.Module) -> None:
    """Recompute ``module``'s activations in backward (composable ``checkpoint``, in place)."""
    from torch.distributed._composable import checkpoint as composable_checkpoint

    composable_checkpoint(module)


def is_ddp(module: torch.nn.Module) -> bool:
    """A model the user wrapped in ``DistributedDataParallel`` themselves."""
    return isinstance(module, torch.nn.parallel.DistributedDataParallel)


def mesh_of(module: torch.nn.Module) -> Any:
    """The device mesh a sharded module's parameters live on (DTensor's public ``device_mesh``)."""
    for param in module.parameters():
        mesh = getattr(param, "device_mesh", None)
        if mesh is not None:
            return mesh
    return None


def gradient_sync(module: torch.nn.Module) -> bool:
    """Whether ``module`` reduces gradients in backward (what
    ``set_requires_gradient_sync`` last set; True by default)."""
    if is_sharded(module):
        # the root may hold no parameters of its own (no group): ask the first unit that does
        for unit in module.modules():
            group = cast("FSDPModule", unit)._get_fsdp_state()._fsdp_param_group if is_sharded(unit) else None
            if group is not None:
                return bool(group.reduce_grads)
        return True
    if is_replicated(module):
        from torch.distributed._composable import replicate

        return not replicate.state(module)._no_sync
    return True


def compiled_original(model: Any) -> torch.nn.Module | None:
    """The module ``torch.compile(module)`` wrapped, or None when ``model`` is not such a wrapper."""
    if type(model).__name__ != "OptimizedModule":  # torch._dynamo's class; importing dynamo is slow
        return None
    return getattr(model, "_orig_mod", None)


def is_compiled_in_place(module: torch.nn.Module) -> bool:
    """A module whose own ``module.compile()`` was called, or whose ``forward`` was replaced by a
    compiled one (``lt.compile``)."""
    if getattr(module, "_compiled_call_impl", None) is not None:
        return True
    forward = vars(module).get("forward")
    return hasattr(getattr(forward, "__func__", forward), "_torchdynamo_orig_callable")


def compile_forward(module: torch.nn.Module, **options: Any) -> None:
    """Compile ``module``'s forward in place: its class's ``forward`` compiled with
    ``torch.compile``, bound to the module as an instance attribute.

    Not ``module.compile()``: that compiles ``Module._call_impl``, torch's own code, which
    dynamo skips for torch's built-in modules (a ``Linear`` or ``Sequential`` compiled that way
    runs eager); and it puts the module's hooks (FSDP2's gathers, checkpointing's) inside the
    compiled region. A bound method (not a closure) keeps ``copy.deepcopy(model)`` right: the
    copy's forward is bound to the copy. Blocks of one class share dynamo's cache (one code
    object), so compiling the second block costs nothing."""
    import types

    compiled = torch.compile(type(module).forward, **options)
    module.forward = types.MethodType(compiled, module)
