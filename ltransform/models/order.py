"""The real orders among model transforms: tensor parallel (``parallelize``) first, then activation
checkpointing → compile (``lt.compile`` or ``torch.compile``) → shard, fp8 layer swaps (``to_precision``) →
compile → shard, and a mixed ``to_precision`` → shard.

Checkpointing must wrap the plain forward that compile traces, and FSDP2 must see the
final module structure (and sharded weights cannot move into new layers) and take its
mixed-precision policy when sharding; applying them the other way round silently loses
memory savings, breaks tracing or shards without the chosen policy. Checkpointing and the fp8
swap may come in either order. Tensor parallel must see the plain layers its plan names (and
its DTensor parameters are what FSDP2 shards on a 2-D mesh), so it comes before all three.
``quantize`` swaps layers too, so it comes before compile and shard; tensor parallel cannot split
its packed weights, so a model is either quantized or tensor parallel (:data:`EXCLUSIVE`). Each
transform calls :func:`check_order` before it acts, so a violation is an error naming both
transforms, raised here and nowhere else.

``sync_batchnorm`` swaps BatchNorm layers, so it comes before compile, shard and the DDP wrapping of
``distribute`` (``"replicate"``); it has no order with the others (quantize, checkpointing and the fp8 swap
touch no BatchNorm layer; conventionally it comes first).
"""

from __future__ import annotations

from typing import Any

import torch

from ltransform.distributed import wrappers
from ltransform.models.fp8 import is_fp8_layer
from ltransform.models.nf4 import NF4Linear

TENSOR_PARALLEL = "_lt_tensor_parallel"  # the attribute lt.parallelize sets on the root it parallelized
ORDER = ("parallelize", "checkpoint_activations", "to_precision", "torch.compile", "shard")  # as suggested in errors
MUST_PRECEDE = {
    "parallelize": ("checkpoint_activations", "torch.compile", "shard"),
    "checkpoint_activations": ("torch.compile", "shard"),
    "to_precision": ("torch.compile", "shard"),
    "torch.compile": ("shard",),
    "shard": (),
    "quantize": ("torch.compile", "shard"),
    "sync_batchnorm": ("torch.compile", "shard", "replicate"),
}
QUANTIZED_ORDER = ("quantize", "add_adapters", "checkpoint_activations", "torch.compile", "shard")  # in its errors
SYNC_BATCHNORM_ORDER = ("sync_batchnorm", "checkpoint_activations", "torch.compile", "shard")  # in its errors
EXCLUSIVE = {  # applying -> already applied: these never combine (tensor parallel cannot split packed 4-bit data)
    "quantize": ("parallelize",),
    "parallelize": ("quantize",),
}


def applied(model: torch.nn.Module) -> set[str]:
    """Which of :data:`MUST_PRECEDE`'s transforms (and DDP's ``"replicate"``) have been applied to ``model``
    or its submodules."""
    found = set()
    inner = wrappers.compiled_original(model)
    if inner is not None:  # torch.compile(model)
        found.add("torch.compile")
        model = inner
    for module in model.modules():
        if wrappers.is_sharded(module) or wrappers.is_xla_sharded(module):
            found.add("shard")
        if wrappers.is_replicated(module):  # distribute("ddp") prepared a step for it
            found.add("replicate")
        if wrappers.is_compiled_in_place(module):
            found.add("torch.compile")
        if wrappers.is_checkpointed(module):
            found.add("checkpoint_activations")
        if vars(module).get(TENSOR_PARALLEL) is not None:
            found.add("parallelize")
        if is_fp8_layer(module):
            found.add("to_precision")
        if isinstance(module, NF4Linear) or any(type(p).__module__.startswith("bitsandbytes")  # (Params4bit, ...)
                                                for p in module.parameters(recurse=False)):
            found.add("quantize")
    return found


def check_order(model: Any, applying: str, *, later: tuple[str, ...] | None = None) -> None:
    """Raise if a transform that must come after ``applying`` (or only those in ``later``)
    was already applied to ``model``."""
    if not isinstance(model, torch.nn.Module):
        return
    found = applied(model)
    _check_exclusive(applying, found)
    done = [name for name in MUST_PRECEDE[applying] if name in found and (later is None or name in later)]
    if done:
        order = {"quantize": QUANTIZED_ORDER, "sync_batchnorm": SYNC_BATCHNORM_ORDER}.get(applying, ORDER)
        after = ", then lt.distribute" if done[0] == "replicate" else ""
        raise RuntimeError(
            f"{applying} must be applied before {done[0]}; reorder: "
            f"lt.pipe(model, {', '.join(_spelling(n) for n in order)}) (model transforms in this "
            f"order, then build the optimizer{after})"
        )


def _check_exclusive(applying: str, found: set[str]) -> None:
    clash = [name for name in EXCLUSIVE.get(applying, ()) if name in found]
    if clash:
        raise RuntimeError(
            f"{applying} cannot be applied to a model that {clash[0]} was applied to: tensor parallel cannot split "
            f"quantized weights; train a quantized model sharded instead: "
            f"lt.pipe(model, {', '.join(_spelling(n) for n in QUANTIZED_ORDER)})"
        )


def _spelling(name: str) -> str:
    return {"parallelize": "lt.parallelize(plan=...)",
            "checkpoint_activations": "lt.checkpoint_activations(policy=...)",
            "to_precision": "lt.to_precision(name)", "torch.compile": "lt.compile(policy=...)",
            "shard": "lt.shard(policy=...)", "quantize": "lt.quantize(mode, backend='torchao')",
            "add_adapters": "lt.add_adapters(rank)", "sync_batchnorm": "lt.sync_batchnorm()"}[name]


def check_compiled_before_shard(model: Any) -> None:
    """``torch.compile`` applied to an already sharded model: caught where the model is used
    (``distribute`` prepares it), since torch.compile itself cannot be intercepted."""
    inner = wrappers.compiled_original(model)
    if inner is not None and "shard" in applied(inner):
        raise RuntimeError(
            f"torch.compile must be applied before shard; reorder: "
            f"lt.pipe(model, {', '.join(_spelling(n) for n in ORDER)})"
        )
