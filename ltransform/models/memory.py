"""``estimate_memory``: per-rank memory of a training step, from a model on the ``meta`` device."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from ltransform.core.precisions import Precision, resolve_precision
from ltransform.models.memory_trace import describe, measure_optimizer, meta_batch, meta_copy, tensors, trace_forward
from ltransform.models.shard import _matches, _outermost, _policy

STRATEGIES = ("single", "ddp", "fsdp", "hsdp")
OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-momentum")
_MIB, _GIB = 2**20, 2**30
_ROWS = (("parameters", "parameters"), ("gradients", "gradients"), ("optimizer", "optimizer state"),
         ("activations", "activations"), ("temporary", "temporary"))


@attrs.frozen(kw_only=True)
class MemoryEstimate:
    """Bytes one rank holds while it trains: what :func:`estimate_memory` returns.

    Args:
        parameters, gradients, optimizer: this rank's share of the weights, their gradients
            and the optimizer's state (divided by the shard count under FSDP).
        activations: what the forward keeps for backward at its peak (the batch included;
            under activation checkpointing, the checkpointed blocks' inputs).
        temporary: what is alive at the peak besides those: gradients flowing in backward,
            a checkpointed block's recomputed activations, FSDP's gathered units, DDP's
            buckets, the optimizer step's intermediates.
        total: the peak, the number to compare with a device's memory.
        peak_during: ``"backward"`` or ``"optimizer step"``.
        at_peak: each category's bytes alive at the peak (they add up to ``total``).
        strategy, world_size, shards, precision, optimizer_name, batch, checkpoint: what was assumed.
    """

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    temporary: int
    total: int
    peak_during: str
    at_peak: Mapping[str, int]
    strategy: str
    world_size: int
    shards: int
    precision: str
    optimizer_name: str
    batch: str
    checkpoint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The record as a plain dict (``at_peak`` as a dict too)."""
        return {**attrs.asdict(self), "at_peak": dict(self.at_peak)}

    def __str__(self) -> str:
        lines = [f"{'memory per rank':<22}{'size':>12}{'at peak':>12}"]
        for field, label in _ROWS:
            size = "" if field == "temporary" else _size(getattr(self, field))
            lines.append(f"{label:<22}{size:>12}{_size(self.at_peak[field]):>12}")
        lines.append(f"{'total (peak)':<22}{'':>12}{_size(self.total):>12}")
        ranks = f"{self.world_size} rank{'s' * (self.world_size != 1)}"
        sharding = f", {self.shards} shards" if self.shards > 1 else ""
        lines += [f"peak during the {self.peak_during}",
                  f"assumed: strategy {self.strategy} on {ranks}{sharding}; precision {self.precision}; "
                  f"optimizer {self.optimizer_name}; per-rank batch {self.batch}; "
                  f"activation checkpointing {self.checkpoint or 'off'}"]
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / _GIB:.2f} GiB" if n >= _GIB else f"{n / _MIB:.1f} MiB"


def estimate_memory(
    model: torch.nn.Module | Callable[[], torch.nn.Module],
    /,
    *,
    batch: Any,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    precision: Any = "32-true",
    optimizer: Any = "adamw",
    strategy: str = "single",
    world_size: int = 1,
    mesh: tuple[int, int] | None = None,
    policy: Any = None,
    checkpoint: Any = None,
    device: str = "cuda",
) -> MemoryEstimate:
    """Estimate one rank's peak memory for a training step before renting the devices.

    The forward runs once on the ``meta`` device (no memory is allocated, so a model of any
    size takes seconds): saved-tensor hooks record what it keeps for backward, in order; the
    backward is replayed from that record; the optimizer is built over meta parameters and
    stepped, so its state and its step's intermediates are measured, not guessed.

    Args:
        model: a module (on ``meta`` or real: its weights are never copied), or a factory
            ``() -> nn.Module``, which is called under ``torch.device("meta")``.
        batch: one rank's batch (a tensor, or a tuple / list / dict of them; meta tensors are
            fine): the per-rank batch, not the global one.
        loss_fn: ``loss_fn(model, batch) -> loss``, as for ``lt.train_step``. Default: the
            sum of ``model(batch)`` (of ``model(batch[0])`` for a tuple or list).
        precision: a precision name (as ``lt.with_precision`` takes): the weights' dtype, and
            the autocast dtype of the matmuls for a mixed one.
        optimizer: ``"adamw"``, ``"adam"``, ``"sgd"``, ``"sgd-momentum"``, or a factory
            ``params -> torch.optim.Optimizer`` (an optimizer class works).
        strategy: ``"single"``, ``"ddp"``, ``"fsdp"`` or ``"hsdp"``.
        world_size: ranks (for ``"hsdp"``: ``replicas * shards``).
        mesh: for ``"hsdp"``, the shape ``(replicas, shards)``, as ``lt.shard`` takes it.
        policy: the FSDP units, as ``lt.shard``'s policy (e.g. ``{Block}``): the largest one
            is all-gathered at a time. None: the whole model is one unit.
        checkpoint: the modules whose activations are recomputed, as
            ``lt.checkpoint_activations``' policy; None for none.
        device: the device type the run will use, ``"cuda"`` or ``"cpu"``: its autocast lists
            and its optimizers' default kernels (on CUDA, foreach: one step over all weights at
            once; on the CPU, one weight at a time).

    Returns:
        A :class:`MemoryEstimate`; ``print`` it for a table.

    Raises:
        ValueError: an unknown precision, strategy or optimizer name (the message lists the
            valid ones); a world size or mesh that does not fit the strategy.

    Note:
        What it models is ``lt``'s own training: ``lt.train_step`` (gradients set to None after
        the update), ``lt.with_precision`` (autocast's low-dtype copies of the weights are held
        through backward and freed before the optimizer step), ``lt.shard`` (FSDP2: the root
        stays gathered through backward; a unit and the next are gathered at a time; a mixed
        precision gathers weights in its low dtype) and ``lt.checkpoint_activations``. Measured
        on the CPU it is within 15% of the real peak for a small GPT (``tests/test_memory.py``).

    Example:
        >>> import torch, ltransform as lt
        >>> factory = lambda: torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU())
        >>> est = lt.estimate_memory(factory, batch=torch.empty(8, 1024, device="meta"))
        >>> est.parameters, est.optimizer
        (4198400, 8396800)
    """
    record = resolve_precision(precision, "estimate_memory")
    shards = _shards(strategy, world_size, mesh)
    build, optimizer_name = resolve_optimizer(optimizer, device)
    # FSDP's policy for a mixed precision gathers the weights in its low dtype: the forward sees those
    sharded = strategy in ("fsdp", "hsdp")
    low = record.autocast_dtype
    meta = meta_copy(model, low if sharded and low is not None else record.param_dtype)
    params = [p for p in meta.parameters()]
    trainable = [p for p in params if p.requires_grad]
    stored = {id(p): p.numel() * (record.param_dtype.itemsize if p.is_floating_point() else p.element_size())
              for p in params}  # bytes of each weight (and of its gradient) as the optimizer holds it
    known = {id(s): s for s in (p.untyped_storage() for p in params)}
    batch_on_meta = meta_batch(batch)
    batch_storages = {id(t.untyped_storage()): t.untyped_storage() for t in tensors(batch_on_meta)}
    known.update(batch_storages)
    checkpointed = {id(m) for m in _outermost(_matches(meta, _policy(checkpoint)))} if checkpoint else set()
    meta.train()
    with torch.enable_grad():
        trace, _ = trace_forward(meta, lambda: (loss_fn or default_loss)(meta, batch_on_meta), known=known,
                                 checkpointed=checkpointed, low=low, device=device)
    state_bytes, step_bytes = measure_optimizer(build, [torch.nn.Parameter(torch.empty_like(
        p, dtype=record.param_dtype if p.is_floating_point() else p.dtype)) for p in trainable])

    param_bytes = sum(stored.values()) // shards
    grad_bytes = sum(stored[id(p)] for p in trainable) // shards
    grad_at = [0] * len(trace.events)
    last = {id(p): i for i, event in enumerate(trace.events) for p in event.params if p.requires_grad}
    for p in trainable:
        grad_at[last.get(id(p), 0)] += stored[id(p)] // shards
    kept = sum(s.nbytes() for s in batch_storages.values()) + sum(e.saved for e in trace.events)
    held, held_in_step = _held(strategy, meta, policy, record, grad_bytes * shards, trace.events)
    # autocast's casts of the weights stay cached through backward (lt.with_precision frees them
    # before the optimizer step)
    cached = sum(trace.cached.values())
    best = {"parameters": param_bytes, "gradients": grad_bytes, "optimizer": state_bytes // shards,
            "activations": 0, "temporary": step_bytes // shards + held_in_step}
    best, peak_during = _replay(trace.events, grad_at, [h + cached for h in held], kept, best)
    return MemoryEstimate(
        parameters=param_bytes, gradients=grad_bytes, optimizer=state_bytes // shards, activations=kept,
        temporary=best["temporary"], total=sum(best.values()), peak_during=peak_during, at_peak=best,
        strategy=strategy, world_size=world_size, shards=shards, precision=record.name,
        optimizer_name=optimizer_name, batch=describe(batch_on_meta),
        checkpoint=None if checkpoint is None else _describe_policy(checkpoint))


def _replay(events: list[Any], grad_at: list[int], held: list[int], kept: int,
            step: dict[str, int]) -> tuple[dict[str, int], str]:
    """Walk backward over the forward's record: activations are freed where they were saved,
    gradients appear where their weights were used; return the larger of the optimizer step's
    bytes (``step``) and backward's peak, by category, and which it was."""
    best, peak_during, alive, grads = step, "optimizer step", kept, 0
    for event, grad, extra in zip(reversed(events), reversed(grad_at), reversed(held)):
        grads += grad
        now = {**step, "gradients": grads, "activations": alive,
               # where backward is, a gradient as large as what was saved there flows, and one is made
               "temporary": 2 * event.largest + event.recompute + extra}
        if sum(now.values()) > sum(best.values()):
            best, peak_during = now, "backward"
        alive -= event.saved
    return best, peak_during


def _shards(strategy: str, world_size: int, mesh: tuple[int, int] | None) -> int:
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


def _describe_policy(policy: Any) -> str:
    if isinstance(policy, (set, frozenset, list, tuple)):
        return "{" + ", ".join(sorted(getattr(c, "__name__", repr(c)) for c in policy)) + "}"
    return getattr(policy, "__name__", repr(policy))


def default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The sum of the model's floating outputs, on ``batch`` (on ``batch[0]`` for a tuple or list)."""
    out = model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    return sum(t.float().sum() for t in tensors(out) if t.is_floating_point())  # type: ignore[return-value]


def _held(strategy: str, model: torch.nn.Module, policy: Any, record: Precision, grad_bytes: int,
          events: list[Any]) -> tuple[list[int], int]:
    """What the strategy holds besides the shards at each point of backward, and in the optimizer
    step. DDP: its buckets (a copy of the gradients). FSDP: the root, gathered from forward to
    the end of backward, with its unsharded gradients; inside a unit's backward, that unit and
    the next one (prefetched) gathered, and the unit's unsharded gradients."""
    if strategy in ("single", "ddp"):
        bucket = grad_bytes if strategy == "ddp" else 0
        return [bucket] * len(events), bucket
    unit_of: dict[int, int] = {}
    for unit in _matches(model, _policy(policy)):  # innermost first: the innermost unit holds a weight
        own = [p for p in unit.parameters() if id(p) not in unit_of]
        unit_of.update((id(p), sum(q.numel() for q in own)) for p in own)
    root = sum(p.numel() for p in model.parameters() if id(p) not in unit_of)
    gather = (record.autocast_dtype or record.param_dtype).itemsize
    reduce = torch.float32.itemsize if record.mixed else record.param_dtype.itemsize
    held, size = [], 0
    for event in events:  # an event without weights (a recomputation) is in the unit before it
        if event.params:
            size = max(unit_of.get(id(p), 0) for p in event.params)
        held.append(root * (gather + reduce) + size * (2 * gather + reduce))
    return held, 0
