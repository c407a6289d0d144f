"""``estimate_memory``: per-rank memory of a training step, from a model on the ``meta`` device."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from ltransform.core.precisions import Precision, resolve_precision
from ltransform.distributed import wrappers
from ltransform.models.memory_inputs import (default_loss, describe, describe_policy, device_type, fp8_note,
                                             meta_batch, meta_copy, resolve_optimizer, shard_count, tensors)
from ltransform.models.memory_trace import measure_optimizer, trace_forward
from ltransform.models.shard import _matches, _outermost, _policy

_MIB, _GIB = 2**20, 2**30
_ROWS = (("parameters", "parameters"), ("buffers", "buffers"), ("gradients", "gradients"),
         ("optimizer", "optimizer state"), ("activations", "activations"), ("temporary", "temporary"))


@attrs.frozen(kw_only=True)
class MemoryEstimate:
    """Bytes one rank holds while it trains: what :func:`estimate_memory` returns.

    Args:
        parameters: this rank's share of the weights (divided by the shard count under FSDP).
        gradients: this rank's share of their gradients.
        optimizer: this rank's share of the optimizer's state.
        buffers: the model's buffers (not sharded: FSDP2 leaves them whole on every rank).
        activations: what the forward keeps for backward at its peak (the batch included;
            under activation checkpointing, the checkpointed blocks' inputs).
        temporary: what is alive at the peak besides those: gradients flowing in backward,
            a checkpointed block's recomputed activations, FSDP's gathered units, DDP's
            buckets, the optimizer step's intermediates.
        total: the peak, the number to compare with a device's memory.
        peak_during: ``"backward"`` or ``"optimizer step"``.
        at_peak: each category's bytes alive at the peak (they add up to ``total``).
        strategy: the strategy assumed.
        world_size: the number of ranks assumed.
        shards: the shard count assumed.
        precision: the precision assumed.
        optimizer_name: the optimizer assumed.
        batch: the batch assumed.
        checkpoint: the activation checkpointing assumed.
        note: what the estimate does not model, if anything (printed under the table).
    """

    parameters: int
    buffers: int
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
    note: str | None = None

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
        if self.note:
            lines.append(f"note: {self.note}")
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
    device: str | torch.device = "cuda",
) -> MemoryEstimate:
    """Estimate one rank's peak memory for a training step before renting the devices.

    The forward runs once on the ``meta`` device (no memory is allocated, so a model of any
    size takes seconds): saved-tensor hooks record what it keeps for backward, in order; the
    backward is replayed from that record; the optimizer is built over meta parameters and
    stepped, so its state and its step's intermediates are measured, not guessed.

    Args:
        model: a module (on ``meta`` or real: its weights are never copied), or a factory
            ``() -> nn.Module``, which is called under ``torch.device("meta")``. A model
            ``lt.checkpoint_activations`` or ``lt.compile`` was applied to is fine (it is traced
            uncompiled); a sharded or quantized one is not.
        batch: one rank's batch (a tensor, or a tuple / namedtuple / list / dict / mapping such
            as Hugging Face's ``BatchEncoding`` / dataclass of them; meta tensors are fine): the
            per-rank batch, not the global one.
        loss_fn: ``loss_fn(model, batch) -> loss``, as for ``lt.train_step``. Default: the sum
            of the model's floating outputs, of ``model(**batch)`` for a mapping,
            ``model(batch[0])`` for a tuple or list, else ``model(batch)``.
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
            ``lt.checkpoint_activations``' policy; None for none (besides those it was applied to).
        device: the device the run will use, ``"cuda"`` (or ``"cuda:N"``) or ``"cpu"``: its
            autocast lists, its attention kernels (on the CPU, attention with dropout runs
            torch's math path, which keeps the attention matrix) and its optimizers' default
            kernels (on CUDA, foreach: one step over all weights at once; on the CPU, one at a time).

    Returns:
        A :class:`MemoryEstimate`; ``print`` it for a table.

    Raises:
        ValueError: an unknown precision, strategy, optimizer name or device (the message lists
            the valid ones); a world size or mesh that does not fit the strategy; a sharded
            model; a forward that reads tensor values (``.item()``), which meta tensors lack.
        TypeError: a model that is not a module or factory; quantized weights (``lt.quantize``).

    Note:
        What it models is ``lt``'s own training: ``lt.train_step`` (gradients set to None after
        the update), ``lt.with_precision`` (autocast's low-dtype copies of the weights are held
        through backward and freed before the optimizer step), ``lt.shard`` (FSDP2: the root
        stays gathered through backward; a unit and the next are gathered at a time; a mixed
        precision gathers weights in its low dtype) and ``lt.checkpoint_activations``. Measured
        on the CPU it is within 20% of the real peak (worst +13%, FSDP on 2 ranks) for small
        GPTs and Hugging Face GPT-2 and Llama (``tests/test_memory.py``). fp8 layers are not
        modelled: their precisions get the 16-bit estimate, with a note.

    Example:
        >>> import torch, ltransform as lt
        >>> factory = lambda: torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU())
        >>> est = lt.estimate_memory(factory, batch=torch.empty(8, 1024, device="meta"))
        >>> est.parameters, est.optimizer
        (4198400, 8396800)
    """
    record = resolve_precision(precision, "estimate_memory")
    device = device_type(device)
    shards = shard_count(strategy, world_size, mesh)
    build, optimizer_name = resolve_optimizer(optimizer, device)
    # FSDP's policy for a mixed precision gathers the weights in its low dtype: the forward sees those
    sharded = strategy in ("fsdp", "hsdp")
    low = record.autocast_dtype
    meta = meta_copy(model, low if sharded and low is not None else record.param_dtype, record.param_dtype)
    params = [p for p in meta.parameters()]
    trainable = [p for p in params if p.requires_grad]
    stored = {id(p): p.numel() * (record.param_dtype.itemsize if p.is_floating_point() else p.element_size())
              for p in params}  # bytes of each weight (and of its gradient) as the optimizer holds it
    known = {id(s): s for s in (p.untyped_storage() for p in params)}
    buffers = {id(s): s for s in (b.untyped_storage() for b in meta.buffers())}
    batch_on_meta = meta_batch(batch)
    batch_storages = {id(t.untyped_storage()): t.untyped_storage() for t in tensors(batch_on_meta)}
    known.update(buffers)
    known.update(batch_storages)
    applied_to = [m for m in meta.modules() if wrappers.is_checkpointed(m)]  # lt.checkpoint_activations
    chosen = _matches(meta, _policy(checkpoint)) if checkpoint else []
    meta.train()
    with torch.enable_grad():
        trace = _trace(meta, lambda: (loss_fn or default_loss)(meta, batch_on_meta), known=known,
                       checkpointed={id(m) for m in _outermost(chosen + applied_to)},
                       rehook={id(m) for m in applied_to}, low=low, device=device)
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
    buffer_bytes = sum(s.nbytes() for s in buffers.values())
    best = {"parameters": param_bytes, "buffers": buffer_bytes, "gradients": grad_bytes,
            "optimizer": state_bytes // shards, "activations": 0, "temporary": step_bytes // shards + held_in_step}
    best, peak_during = _replay(trace.events, grad_at, [h + cached for h in held], kept, best)
    described = [describe_policy(checkpoint)] if checkpoint is not None else []
    if applied_to:
        described.append(describe_policy({type(m) for m in applied_to}) + " (applied to the model)")
    return MemoryEstimate(
        parameters=param_bytes, buffers=buffer_bytes, gradients=grad_bytes, optimizer=state_bytes // shards,
        activations=kept, temporary=best["temporary"], total=sum(best.values()), peak_during=peak_during,
        at_peak=best, strategy=strategy, world_size=world_size, shards=shards, precision=record.name,
        optimizer_name=optimizer_name, batch=describe(batch_on_meta), checkpoint=" and ".join(described) or None,
        note=fp8_note(record))


def _trace(model: torch.nn.Module, run: Callable[[], torch.Tensor], **options: Any) -> Any:
    """:func:`trace_forward`, saying what to do when the forward needs tensor values, which meta lacks."""
    try:
        return trace_forward(model, run, **options)[0]
    except (RuntimeError, NotImplementedError) as error:
        if "meta" not in str(error):
            raise
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"estimate_memory: the forward (or loss_fn) does what meta tensors cannot ({first}): "
                         f"it runs on the meta device, whose tensors have shapes but no values, so control flow "
                         f"or shapes that depend on values (.item(), if tensor:, nonzero) are not supported; "
                         f"decide from shapes or Python values instead") from error


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
