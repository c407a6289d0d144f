"""``distribute``: data-parallel training across ranks (DDP, FSDP2, HSDP)."""

from __future__ import annotations

import weakref
from typing import Any

import attrs
import torch

from ltransform.core.compose import MISSING
from ltransform.core.effects import Effect, Handler, Stage, When
from ltransform.core.inventory import inventory
from ltransform.core.step import StepTransform, apply_step_transform
from ltransform.distributed import env, wrappers, xla
from ltransform.distributed.no_sync import without_gradient_sync
from ltransform.distributed.strategies import Strategy, note_gradient_group, resolve_strategy
from ltransform.models.order import check_compiled_before_shard
from ltransform.models.parallelize import tensor_parallel


@attrs.frozen
class _Sync:
    """What the handler needs: the modules whose gradient sync is switched off on non-boundary
    micro-steps (none in one process)."""

    strategy: Strategy
    modules: tuple[weakref.ref, ...]  # weak: the binding lives with the model (no cycle)
    xla: bool = False  # on XLA: the step's graph is cut after the update
    loss_parallel: bool = False  # the model's logits are split over the vocabulary (lt.plans' loss_parallel)


def distribute(step: Any = MISSING, /, strategy: Any = "auto") -> Any:
    """Train ``step`` data-parallel across ranks: N ranks with batch B update the parameters
    as one rank with batch N·B would.

    ``"ddp"`` applies torch's composable ``replicate`` (DDP) to each model when the step is
    prepared; ``"fsdp"`` and ``"hsdp"`` expect the model sharded with ``lt.shard`` before the
    optimizer was built. Gradients are averaged by torch's own collectives in backward. With
    ``accumulate``, non-boundary micro-steps do not synchronise gradients (forward and
    backward run with ``set_requires_gradient_sync(False)``, restored afterwards) unless the
    strategy has ``sync_micro_steps=True`` (with ``static_graph=True``, the very first micro-step
    synchronises: DDP records the graph on it). In a single process every strategy trains as one.
    (On GPUs every prepared step, distributed or not, puts the models and batches on
    ``lt.device()``.)

    ``"xla"`` is torch_xla's SPMD: one process drives every device of its host; the models are
    replicated on the XLA device, each batch is split along its first dimension over the devices
    (over the ``("data", "fsdp")`` mesh of a model sharded with ``lt.shard``), and XLA's compiler
    puts the gradient all-reduce in the compiled step. The traced graph is cut
    (``torch_xla.sync()``) after every micro-step (``lt.Strategy(name="xla",
    graph_per_update=True)`` traces a whole accumulation window into one program instead).
    ``lt.world_size()`` is then the number of devices: a batch of B gives each device B / N, so
    N devices with batch B train as one process with batch B.

    Args:
        step: the step to transform; omit it for the partial form.
        strategy: ``"auto"`` (also: for a model ``lt.parallelize`` split over every rank, no
            data-parallel wrapping: every rank trains on the same batch), ``"single"``, ``"ddp"``,
            ``"fsdp"``, ``"hsdp"``, ``"xla"``, or an
            ``lt.Strategy(...)`` record.

    Raises:
        ValueError: unknown strategy (lists the valid ones); a second ``distribute``.
        RuntimeError (when prepared): ``"fsdp"`` on a model that was not sharded, ``"ddp"``
            on one that was, an optimizer built before ``lt.shard``; DDP options (``lt.Strategy(name="auto",
            find_unused_parameters=True)``, ...) where ``"auto"`` resolves to FSDP; ``"xla"`` in a process not
            started for XLA, or ``"ddp"``/``"fsdp"``/``"hsdp"`` in one that was.
        ImportError (when prepared): ``"xla"`` with torch_xla missing or built for another torch.

    Example:
        >>> import torch, ltransform as lt
        >>> step = lt.pipe(lt.train_step(lambda m, b: m(b).sum()), lt.distribute("ddp"))
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> state, _ = step(state, torch.ones(4, 2))  # one process: plain training
        >>> state.step
        1

    Note:
        Give every rank its own part of the data: ``lt.run`` does so for a ``DataLoader``
        (``DistributedSampler``); launch with ``lt.launch`` or ``torchrun``.
    """
    if step is not MISSING and not callable(step):
        step, strategy = MISSING, step
    record = resolve_strategy(strategy)
    cut = (_xla_cut(record),) if record.name in ("auto", "xla") else ()  # (left out of a chain off XLA)
    # with sync_micro_steps every micro-step synchronises, and on XLA the compiled step reduces: no handler
    no_sync = () if record.sync_micro_steps or record.name == "xla" else (
        Handler(effect=Effect.STEP, stage=Stage.SYNC, fn=_no_sync,
                label="distribute: set_requires_gradient_sync(False) for forward and backward",
                after="distribute: restore gradient sync", when=When.NON_BOUNDARY,
                needed=lambda ctx: bool(ctx.modules), needed_text="on several ranks"),)
    loss_parallel = Handler(effect=Effect.STEP, stage=Stage.SYNC, fn=_loss_parallel,
                            label="distribute: the step (loss and backward) under loss_parallel(), metrics made whole",
                            needed=lambda ctx: ctx.loss_parallel, needed_text="on logits split over the vocabulary")
    transform = StepTransform(
        name=f"distribute({record.name!r})",
        kind="distribute",
        handlers=cut + no_sync + (loss_parallel,),
        prepare=lambda state: _with_loss_parallel(*_prepare(state, record)),
    )
    return apply_step_transform(step, transform, "distribute")


def _prepare(state: Any, strategy: Strategy) -> tuple[Any, _Sync]:
    if strategy.name == "xla" or env.accelerator() == "xla":
        if strategy.name in ("auto", "xla"):
            return _prepare_xla(state, strategy), _Sync(strategy, (), xla=True)
        what = ("trains on one device, but XLA's SPMD runs every step over all of them" if strategy.name == "single"
                else "runs on torch.distributed process groups, but this process is on XLA (SPMD)")
        raise RuntimeError(f"distribute({strategy.name!r}) {what}; use distribute('xla') or 'auto' (on one "
                           f"device: CPU_NUM_DEVICES=1, or TPU_VISIBLE_CHIPS=0 on a TPU VM)")
    distributed = env.ensure_process_group()
    modules = [m for m in inventory(state).models.values() if any(p.requires_grad for p in m.parameters())]
    for module in modules:
        check_compiled_before_shard(module)
    name = _resolve_auto(strategy.name, distributed, modules)
    if strategy.ddp_options and name not in ("ddp", "single"):
        raise RuntimeError(
            f"distribute(Strategy(name='auto', ...)) resolved to {name!r} for this model, but the strategy has "
            f"DDP options (find_unused_parameters, static_graph, timeout), which {name} does not take; drop "
            f"them, or do not shard the model and use Strategy(name='ddp', ...)")
    if name == "tensor parallel":  # every rank in one tensor-parallel group: DTensor does all the communication
        return state, _Sync(strategy, ())
    if name == "single" and env.world_size() > 1:
        raise RuntimeError(
            f"distribute('single') in a world of {env.world_size()} ranks would train each rank "
            f"alone; use 'auto', 'ddp' or 'fsdp'"
        )
    if not distributed or name == "single":
        return state, _Sync(strategy, ())
    if name == "ddp":
        # (a model replicated before, by an earlier prepare, keeps the options it was wrapped with)
        options = {} if all(wrappers.is_replicated(m) for m in modules) else _ddp_options(strategy)
        for module in modules:
            _replicate(module, options)
    else:
        for module in modules:
            _check_sharded(module, name)
    return state, _Sync(strategy, tuple(weakref.ref(m) for m in modules))


def _with_loss_parallel(state: Any, sync: _Sync) -> tuple[Any, _Sync]:
    """Record whether a model's logits come split over the vocabulary (``lt.plans.gpt(...,
    loss_parallel=True)``): its loss must then be computed, and differentiated, under ``loss_parallel``."""
    parallel = tensor_parallel(inventory(state).models.values())
    return state, (attrs.evolve(sync, loss_parallel=True) if parallel is not None and parallel.loss_parallel
                   else sync)


def _loss_parallel(ctx: _Sync, frame, value, *, proceed):
    """Forward, loss and backward under torch's ``loss_parallel`` (its cross-entropy takes the logits split
    over the vocabulary; its backward must run inside it too); the metrics it made (DTensors) made whole."""
    from torch.distributed.tensor.parallel import loss_parallel

    with loss_parallel():
        state, metrics = proceed(frame, value)
    whole = {k: v.full_tensor() if callable(getattr(v, "full_tensor", None)) else v for k, v in metrics.items()}
    return state, whole


def _resolve_auto(name: str, distributed: bool, modules: list[torch.nn.Module]) -> str:
    if name != "auto":
        return name
    parallel = tensor_parallel(modules)
    if parallel is not None and not any(wrappers.is_sharded(m) for m in modules):
        if parallel.dp == 1:
            return "tensor parallel"
        raise RuntimeError(
            f"distribute('auto'): the model is tensor parallel over {parallel.tp} of {parallel.tp * parallel.dp} "
            f"ranks, and nothing shares gradients across its {parallel.dp} data-parallel groups; shard it over the "
            f"mesh's 'dp' dimension after lt.parallelize: lt.shard(model, policy=..., mesh=mesh['dp']) (with no "
            f"mesh, lt.shard reads it from the model)")
    sharded = [m for m in modules if wrappers.is_sharded(m)]
    if sharded:
        mesh = wrappers.mesh_of(sharded[0])
        return "hsdp" if mesh is not None and mesh.ndim == 2 else "fsdp"
    return "ddp" if distributed and env.world_size() > 1 else "single"


def _ddp_options(strategy: Strategy) -> dict[str, Any]:
    """The DDP arguments ``replicate`` passes on: only those that differ from DDP's defaults; with a timeout,
    a process group of every rank for the gradients, made here (each rank prepares its step: a collective)."""
    options: dict[str, Any] = {}
    if strategy.find_unused_parameters:
        options["find_unused_parameters"] = True
    if strategy.static_graph:
        options["static_graph"] = True
    if strategy.timeout is not None:
        import torch.distributed as dist

        options["process_group"] = dist.new_group(timeout=strategy.timeout)
        note_gradient_group(strategy.timeout)
    return options


def _replicate(module: torch.nn.Module, options: dict[str, Any]) -> None:
    if wrappers.is_sharded(module):
        raise RuntimeError(
            "distribute('ddp'): the model is sharded with lt.shard; use distribute('fsdp') "
            "(or 'auto'), or do not shard it"
        )
    if wrappers.is_replicated(module):
        return
    if tensor_parallel([module]) is not None:
        raise RuntimeError(
            "distribute('ddp'): the model is tensor parallel (lt.parallelize); use distribute('auto') (with the "
            "tensor-parallel mesh over every rank it needs no data-parallel wrapping; on a 2-D mesh, shard the "
            "model over 'dp' with lt.shard)")
    from torch.distributed._composable import replicate

    device = env.device()
    # replicate passes its keyword arguments on to DistributedDataParallel (torch 2.9 to 2.13 alike)
    if device.type == "cuda":
        module.to(device)  # keeps the Parameter objects, so the optimizer stays valid
        replicate(module, device_ids=[device.index], **options)
    else:
        replicate(module, **options)
    if options.get("static_graph"):
        _UNRECORDED.add(module)


# Modules replicated with static_graph=True whose first iteration has not run: DDP records the graph on it, and
# a first iteration without gradient sync fails in backward (torch's "expect_autograd_hooks_ INTERNAL ASSERT",
# plain DDP's no_sync too); their first micro-step therefore synchronises.
_UNRECORDED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def _check_sharded(module: torch.nn.Module, name: str) -> None:
    if not wrappers.is_sharded(module):
        raise RuntimeError(
            f"distribute({name!r}): the model {type(module).__name__} is not sharded; apply "
            f"lt.shard(model, policy=...) before building the optimizer, or use distribute('ddp')"
        )
    mesh = wrappers.mesh_of(module)
    dims = 2 if name == "hsdp" else 1
    if mesh is not None and mesh.ndim != dims:
        fix = ("lt.shard(model, mesh=(replicas, shards))" if name == "hsdp"
               else "distribute('hsdp') for a 2-D mesh")
        raise RuntimeError(
            f"distribute({name!r}) needs a {dims}-D device mesh, but the model is sharded on a "
            f"{mesh.ndim}-D one; use {fix}"
        )


def _no_sync(ctx: _Sync, frame, value, *, proceed):
    # (alive: a binding is used only while its models are)
    modules: list[Any] = [ref() for ref in ctx.modules]
    unrecorded = [m for m in modules if m in _UNRECORDED] if _UNRECORDED else []
    with without_gradient_sync([m for m in modules if m not in unrecorded] if unrecorded else modules):
        result = proceed(frame, value)
    for module in unrecorded:  # (their first iteration ran, synchronised: DDP has recorded the graph)
        _UNRECORDED.discard(module)
    return result


def _xla_cut(strategy: Strategy) -> Handler:
    """The graph cut of an XLA step: after every micro-step (or only after the optimizer update)."""
    return Handler(effect=Effect.STEP, stage=Stage.SYNC, fn=xla.cut,
                   after="distribute: torch_xla.sync() (run the step)",
                   when=When.BOUNDARY if strategy.graph_per_update else When.ALWAYS,
                   needed=lambda ctx: ctx.xla, needed_text="on XLA")


def _prepare_xla(state: Any, strategy: Strategy) -> Any:
    if env.accelerator() != "xla":
        raise RuntimeError(
            f"distribute({strategy.name!r}): this process is not on XLA. Start it with PJRT_DEVICE set "
            f"(PJRT_DEVICE=TPU on a TPU VM; PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 to try SPMD on the CPU), or "
            f"LTRANSFORM_ACCELERATOR=xla; on GPUs or the CPU use distribute('auto')")
    models = inventory(state).models.values()
    for module in models:
        check_compiled_before_shard(module)
        if wrappers.is_sharded(module):
            raise RuntimeError("distribute('xla'): the model is sharded with FSDP2 (torch.distributed), which "
                               "does not run on XLA; apply lt.shard on XLA, where it uses FSDPv2")
    if not any(xla.is_fsdp(m) for m in models):  # a sharded model brought its own mesh
        xla.use_mesh(xla.make_mesh())
    return state
