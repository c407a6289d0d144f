"""What ``lt.estimate_memory`` takes in: the model and the batch, copied to the ``meta`` device (the
model's weights never copied; the batch in whatever containers hold its tensors), and its options."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import torch

from ltransform.core.precisions import Precision
from ltransform.distributed import wrappers
from ltransform.models.order import applied

STRATEGIES = ("single", "ddp", "fsdp", "hsdp")
OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-momentum")


def _children(value: Any) -> list[tuple[str | None, Any]] | None:
    """A container's items, named by key or field (None: by position); None for a leaf."""
    if isinstance(value, Mapping):  # dicts, their subclasses, UserDicts (Hugging Face's BatchEncoding)
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return list(zip(value._fields, value))
    if isinstance(value, (tuple, list)):
        return [(None, v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    return None


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) tuple, list, namedtuple, mapping or dataclass."""
    if isinstance(value, torch.Tensor):
        yield value
        return
    for _, item in _children(value) or ():
        yield from tensors(item)


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to each of its tensors, its containers rebuilt as their own types."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        items = {k: map_tensors(fn, v) for k, v in value.items()}
        if type(value) is dict or not isinstance(value, MutableMapping):
            return items
        rebuilt = copy.copy(value)
        rebuilt.update(items)
        return rebuilt
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(fn, v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(fn, v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: map_tensors(fn, getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


def on_device(batch: Any, device: torch.device) -> Any:
    return map_tensors(lambda t: t.to(device) if t.device.type != "meta" else torch.zeros_like(t, device=device),
                       batch)


def meta_batch(batch: Any) -> Any:
    return map_tensors(lambda t: torch.empty_like(t, device="meta"), batch)


def describe(batch: Any, name: str | None = None) -> str:
    """The batch's tensors by shape and dtype (named by key or field), not their values."""
    label = f"{name}: " if name else ""
    if isinstance(batch, torch.Tensor):
        return f"{label}{tuple(batch.shape)} {str(batch.dtype).removeprefix('torch.')}"
    children = _children(batch)
    if children is None:
        return f"{label}{type(batch).__name__}"
    return ", ".join(describe(v, k) for k, v in children if v is not None)


def meta_copy(model: Any, dtype: torch.dtype, buffer_dtype: torch.dtype) -> torch.nn.Module:
    """The model again on ``meta``, its floating weights in ``dtype`` and buffers in ``buffer_dtype``
    (as ``lt.to_precision`` casts them; FSDP2 leaves buffers alone); a real model's weights are
    not copied (deepcopy's memo hands it meta tensors instead)."""
    if not isinstance(model, torch.nn.Module):
        if not callable(model):
            raise TypeError(f"estimate_memory: model must be an nn.Module or a factory () -> nn.Module, "
                            f"got {type(model).__name__}")
        with torch.device("meta"):
            model = model()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"estimate_memory: the factory returned {type(model).__name__}, not an nn.Module")
    model = _plain(model)
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta", dtype=dtype if p.is_floating_point()
                                                          else p.dtype), p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta", dtype=buffer_dtype if b.is_floating_point() else b.dtype)
    return copy.deepcopy(model, memo)


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The model the trace copies: ``torch.compile(model)``'s original (the copy runs eagerly);
    a model it cannot copy and run is refused."""
    inner = wrappers.compiled_original(model)
    model = model if inner is None else inner
    if "shard" in applied(model):
        raise ValueError("estimate_memory: the model is already sharded (lt.shard); pass the model before "
                         "lt.shard and give strategy='fsdp', world_size=... and policy={Block}")
    for name, module in model.named_modules():
        if wrappers.is_compiled_in_place(module) and "forward" not in vars(module):
            which = f"module {name!r}" if name else "the model"
            raise ValueError(f"estimate_memory: {which} was compiled with module.compile(), whose compiled call "
                             f"runs the original, not a copy; pass the model before compiling it (lt.compile's "
                             f"blocks are fine: the estimate runs them uncompiled)")
        if wrappers.is_checkpointed(module) and "checkpoint" not in wrappers.composable_apis(module):
            raise ValueError("estimate_memory: torch_xla's checkpoint was applied to the model; pass the model "
                             "before lt.checkpoint_activations and give checkpoint={Block}")
    for name, p in model.named_parameters():
        if type(p) is not torch.nn.Parameter:
            raise TypeError(f"estimate_memory: parameter {name!r} is a {type(p).__module__}.{type(p).__name__}, "
                            f"not an nn.Parameter: quantized models (lt.quantize, QLoRA) are not supported yet; "
                            f"estimate the model before lt.quantize (its weights at full size: an upper bound)")
    return model


def device_type(device: Any) -> str:
    """``"cuda"`` or ``"cpu"``, the kind of device ``device`` names."""
    kind = device.type if isinstance(device, torch.device) else None
    if isinstance(device, str) and (device in ("cuda", "cpu") or device.removeprefix("cuda:").isdigit()):
        kind = device.partition(":")[0]
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"estimate_memory: unknown device {device!r}; expected 'cuda' (or 'cuda:N') or 'cpu'")
    return kind


def fp8_note(record: Precision) -> str | None:
    """What the estimate says of an fp8 precision, which it estimates as its 16-bit counterpart."""
    if record.fp8 is None:
        return None
    dtype = record.autocast_dtype or record.param_dtype
    as_ = ("bf16" if dtype == torch.bfloat16 else "16") + ("-mixed" if record.mixed else "-true")
    return (f"the fp8 matmuls of {record.name!r} are not modelled: this is the {as_} estimate (16-bit copies "
            f"of the matmul inputs kept for backward, where fp8 layers keep 8-bit ones)")


def shard_count(strategy: str, world_size: int, mesh: tuple[int, int] | None) -> int:
    """How many ways the strategy shards the weights and their state, once the options are checked."""
    if strategy not in STRATEGIES:
        raise ValueError(f"estimate_memory: unknown strategy {strategy!r}; expected one of: "
                         f"{', '.join(map(repr, STRATEGIES))}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"estimate_memory: world_size must be a positive int, got {world_size!r}")
    if strategy == "single" and world_size != 1:
        raise ValueError(f"estimate_memory: strategy 'single' runs on one rank, got world_size={world_size}; "
                         f"use 'ddp', 'fsdp' or 'hsdp' for more")
    if strategy != "hsdp":
        if mesh is not None:
            raise ValueError(f"estimate_memory: mesh is for strategy 'hsdp', got strategy {strategy!r}")
        return world_size if strategy == "fsdp" else 1
    if mesh is None or len(mesh) != 2 or mesh[0] * mesh[1] != world_size:
        raise ValueError(f"estimate_memory: strategy 'hsdp' needs mesh=(replicas, shards) with replicas * shards "
                         f"== world_size ({world_size}), got mesh={mesh!r}")
    return mesh[1]


def resolve_optimizer(optimizer: Any, device: str) -> tuple[Callable[[list[Any]], torch.optim.Optimizer], str]:
    """A factory ``params -> optimizer`` and a name for ``estimate_memory``'s ``optimizer``."""
    foreach = device != "cpu"
    named: dict[str, Callable[[list[Any]], torch.optim.Optimizer]] = {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=foreach),
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=foreach),
        "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3, foreach=foreach),
        "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=foreach),
    }
    if isinstance(optimizer, str):
        if optimizer not in named:
            raise ValueError(f"estimate_memory: unknown optimizer {optimizer!r}; expected one of: "
                             f"{', '.join(map(repr, OPTIMIZERS))}, or a factory params -> torch.optim.Optimizer")
        return named[optimizer], optimizer
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        cls: Any = optimizer
        return (lambda ps: cls(ps, lr=1e-3)), cls.__name__
    if callable(optimizer):
        return optimizer, getattr(optimizer, "__name__", type(optimizer).__name__)
    raise TypeError(f"estimate_memory: optimizer must be a name ({', '.join(map(repr, OPTIMIZERS))}), an "
                    f"optimizer class or a factory params -> optimizer, got {type(optimizer).__name__}")


def describe_policy(policy: Any) -> str:
    if isinstance(policy, (set, frozenset, list, tuple)):
        return "{" + ", ".join(sorted(getattr(c, "__name__", repr(c)) for c in policy)) + "}"
    return getattr(policy, "__name__", repr(policy))


def default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The sum of the model's floating outputs: of ``model(**batch)`` for a mapping,
    ``model(batch[0])`` for a tuple or list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        out = model(**batch)
    else:
        out = model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    return sum(t.float().sum() for t in tensors(out) if t.is_floating_point())  # type: ignore[return-value]
