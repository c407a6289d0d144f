"""The real orders among model transforms: activation checkpointing → compile → shard, and
fp8 layer swaps (``to_precision``) → compile → shard.

Checkpointing must wrap the plain forward that compile traces, and FSDP2 must see the
final module structure (and sharded weights cannot move into new layers); applying them the
other way round silently loses memory savings or breaks tracing. Checkpointing and the fp8
swap may come in either order. Each transform calls :func:`check_order` before it acts, so a
violation is an error naming both transforms, raised here and nowhere else.
"""

from __future__ import annotations

from typing import Any

import torch

from ltransform.models.fp8 import is_fp8_layer

ORDER = ("checkpoint_activations", "to_precision", "torch.compile", "shard")  # as suggested in errors
MUST_PRECEDE = {
    "checkpoint_activations": ("torch.compile", "shard"),
    "to_precision": ("torch.compile", "shard"),
    "torch.compile": ("shard",),
    "shard": (),
}


def applied(model: torch.nn.Module) -> set[str]:
    """Which of :data:`ORDER` have been applied to ``model`` or its submodules."""
    from torch.distributed.fsdp import FSDPModule

    found = set()
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):  # torch.compile(model)
        found.add("torch.compile")
        model = model._orig_mod
    for module in model.modules():
        if isinstance(module, FSDPModule):
            found.add("shard")
        if getattr(module, "_compiled_call_impl", None) is not None:
            found.add("torch.compile")
        if _has_checkpoint(module):
            found.add("checkpoint_activations")
        if is_fp8_layer(module):
            found.add("to_precision")
    return found


def _has_checkpoint(module: torch.nn.Module) -> bool:
    from torch.distributed._composable.contract import _get_registry

    registry = _get_registry(module)
    return registry is not None and "checkpoint" in registry


def check_order(model: Any, applying: str) -> None:
    """Raise if a transform that must come after ``applying`` was already applied to ``model``."""
    if not isinstance(model, torch.nn.Module):
        return
    later = [name for name in MUST_PRECEDE[applying] if name in applied(model)]
    if later:
        raise RuntimeError(
            f"{applying} must be applied before {later[0]}; reorder: "
            f"lt.pipe(model, {', '.join(_spelling(n) for n in ORDER)}) (model transforms in this "
            f"order, then build the optimizer)"
        )


def _spelling(name: str) -> str:
    return {"checkpoint_activations": "lt.checkpoint_activations(policy=...)",
            "to_precision": "lt.to_precision(fp8 name)", "torch.compile": "torch.compile",
            "shard": "lt.shard(policy=...)"}[name]


def check_compiled_before_shard(model: Any) -> None:
    """``torch.compile`` applied to an already sharded model: caught where the model is used
    (``distribute`` prepares it), since torch.compile itself cannot be intercepted."""
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and inner is not None and "shard" in applied(inner):
        raise RuntimeError(
            f"torch.compile must be applied before shard; reorder: "
            f"lt.pipe(model, {', '.join(_spelling(n) for n in ORDER)})"
        )
