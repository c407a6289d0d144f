"""What ``distribute`` and ``with_precision`` need to know of torch's DDP and FSDP2 modules.

The few reads of torch internals live here, each with the public setter it pairs with, so
a torch upgrade that moves them breaks one file (and ``tests/distributed``), not the library.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


def is_sharded(module: torch.nn.Module) -> bool:
    if "torch.distributed.fsdp" not in sys.modules:
        return False  # nothing can be sharded; and importing FSDP costs ~0.1 s
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_replicated(module: torch.nn.Module) -> bool:
    if "torch.distributed._composable" not in sys.modules:
        return False
    from torch.distributed._composable.contract import _get_registry

    registry = _get_registry(module)
    return registry is not None and "replicate" in registry


def is_ddp(module: torch.nn.Module) -> bool:
    """A model the user wrapped in ``DistributedDataParallel`` themselves."""
    return isinstance(module, torch.nn.parallel.DistributedDataParallel)


def mesh_of(module: torch.nn.Module) -> Any:
    """The device mesh a sharded module's parameters live on."""
    for param in module.parameters():
        mesh = getattr(param, "device_mesh", None)
        if mesh is not None:
            return mesh
    return None


def gradient_sync(module: torch.nn.Module) -> bool:
    """Whether ``module`` reduces gradients in backward (what
    ``set_requires_gradient_sync`` last set; True by default)."""
    if is_sharded(module):
        group = module._get_fsdp_state()._fsdp_param_group
        return True if group is None else bool(group.reduce_grads)
    if is_replicated(module):
        from torch.distributed._composable import replicate

        return not replicate.state(module)._no_sync
    return True


def set_mixed_precision(module: torch.nn.Module, param_dtype: torch.dtype, reduce_dtype: torch.dtype) -> None:
    """Give every FSDP unit of ``module`` a ``MixedPrecisionPolicy``, before its first forward.

    FSDP2 takes the policy in ``fully_shard`` and reads it at its lazy initialisation (the
    first forward); ``lt.shard`` runs before the precision is known, so the policy is set in
    between. After the first forward it is too late, which is an error, not a silent no-op.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for unit in module.modules():
        if not isinstance(unit, FSDPModule):
            continue
        state = unit._get_fsdp_state()
        if state._is_root is not None:  # set by FSDP2's lazy init
            raise RuntimeError(
                "with_precision: the sharded model already ran a forward pass, so FSDP2 has fixed "
                "its dtypes; prepare the step (lt.run does, or lt.prepare(step, state)) before the "
                "model's first forward"
            )
        state._mp_policy = policy
        if state._fsdp_param_group is not None:
            state._fsdp_param_group.mp_policy = policy
