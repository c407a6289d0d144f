"""``shard`` (FSDP2 ``fully_shard``) and ``checkpoint_activations``, chosen by a policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ltransform.core.compose import MISSING, Partial
from ltransform.core.precisions import PRECISIONS, Precision, resolve_precision
from ltransform.core.state import mark_replaced
from ltransform.distributed import env, wrappers
from ltransform.models.order import applied, check_order
from ltransform.models.precision import record_shard_precision, recorded_precision

Policy = Any  # a set of module classes, a predicate module -> bool, or a minimum parameter count


def shard(
    model: Any = MISSING,
    /,
    policy: Policy = None,
    *,
    mesh: Any = None,
    reshard_after_forward: bool | None = None,
    offload: bool = False,
    precision: Any = None,
) -> Any:
    """Shard ``model``'s parameters across ranks with FSDP2 (``fully_shard``).

    Each submodule the policy matches becomes its own FSDP unit (its parameters are
    all-gathered just for its forward and backward), then the root takes what remains.
    Parameters become ``DTensor`` shards, so build the optimizer *after* sharding.
    In a single process with no process group the model is returned unchanged, so the same
    script runs on one device.

    Args:
        model: the module; omit it for the partial form.
        policy: which submodules to shard separately: a set of module classes (e.g.
            ``{Block}``), a predicate ``module -> bool``, or an int (modules with at least that
            many parameters of their own or in children not yet sharded). None: the root only.
        mesh: a ``DeviceMesh``; or a shape ``(replicas, shards)`` for hybrid sharding (HSDP:
            shard within a group of ``shards`` ranks, replicate across ``replicas`` groups).
            Default: one dimension over all ranks; for a model ``lt.parallelize`` made tensor
            parallel on a 2-D ``("dp", "tp")`` mesh, that mesh's data-parallel dimension (FSDP
            across the tensor-parallel groups), so ``lt.parallelize(model, plan, mesh=2)`` then
            ``lt.shard(model, policy={Block})`` is the 2-D composition.
        reshard_after_forward: free gathered parameters after forward (less memory, one
            more all-gather in backward). None (default): FSDP2's own choice, True for every
            unit but the root, whose parameters backward needs first (gathering them again at
            once would cost an all-gather per step for nothing); True or False: every unit.
        offload: keep sharded parameters and gradients on the CPU (``CPUOffloadPolicy``);
            on a CPU-only mesh they are there already.
        precision: the precision the model will train in (a name or record, as for
            ``with_precision``). A mixed one (``"bf16-mixed"``, ``"16-mixed"``,
            ``"torchao-float8"``) gives every FSDP unit
            ``MixedPrecisionPolicy(param_dtype=<its autocast dtype>, reduce_dtype=torch.float32)``:
            parameters all-gather in that dtype, gradients reduce in float32. Default: the
            precision ``lt.to_precision`` gave the model, else ``"32-true"`` (no policy).

    On XLA it is torch_xla's FSDPv2 (``SpmdFullyShardedDataParallel``) on a ``("data", "fsdp")``
    mesh of shape ``mesh`` (default ``(1, devices)``), ``policy`` its ``auto_wrap_policy``; the
    wrapper is returned (its state dict keys are the unwrapped model's). Mixed precision there
    is autocast alone (``with_precision``); ``reshard_after_forward`` is left to XLA's compiler.

    Returns:
        The same module, sharded in place (on XLA: the FSDPv2 wrapper around it).

    Raises:
        RuntimeError: applied after it already was, or in the wrong order with
            ``torch.compile`` / ``checkpoint_activations``.
        ValueError: the policy puts the two ends of a weight tie (a tied embedding and head)
            in different FSDP units, which would silently untie them.
        TypeError / ValueError: a policy or mesh of the wrong kind; an unknown precision
            name (the message lists the valid ones); a model tensor parallel over every rank
            (no data-parallel dimension left); a torchao 4-bit weight whose share per rank is
            not whole NF4 blocks.
        NotImplementedError: bitsandbytes-quantized parameters (use ``backend="torchao"``).

    Example:
        >>> import torch, ltransform as lt
        >>> model = lt.shard(torch.nn.Sequential(torch.nn.Linear(2, 2)), policy={torch.nn.Linear})
        >>> type(model[0].weight)  # one process, no group: unchanged
        <class 'torch.nn.parameter.Parameter'>

    Note:
        Apply ``lt.checkpoint_activations``, ``lt.to_precision`` and ``torch.compile`` before
        ``shard``. FSDP2 takes its ``MixedPrecisionPolicy`` when sharding, so a mixed precision
        is decided here: ``lt.pipe(model, lt.shard(policy={Block}, precision="bf16-mixed"))``
        or ``lt.pipe(model, lt.to_precision("bf16-mixed"), lt.shard(policy={Block}))``; the
        step's ``with_precision`` checks that it agrees.
    """
    match = _policy(policy)
    record = None if precision is None else resolve_precision(precision, "shard")
    if model is MISSING:
        text = f"shard(policy={policy!r}" + ("" if record is None else f", precision={record.name!r}") + ")"
        return Partial(lambda m: shard(m, policy, mesh=mesh, reshard_after_forward=reshard_after_forward,
                                       offload=offload, precision=record), text)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"shard: expected a torch.nn.Module, got {type(model).__name__}")
    check_order(model, "shard")
    if "shard" in applied(model):  # (FSDP2's fully_shard, or XLA's FSDPv2)
        raise RuntimeError("shard: the model is already sharded; apply lt.shard once, to the whole model")
    _check_mesh(mesh)
    if env.accelerator() == "xla":
        return _shard_xla(model, match, mesh, offload)
    if not env.ensure_process_group() and not isinstance(mesh, _device_mesh_type()):
        return model  # one plain process: nothing to shard across
    _check_not_quantized(model)
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    device_mesh = resolve_mesh(mesh if mesh is not None else _tensor_parallel_mesh(model))
    _check_nf4_splits(model, device_mesh.size(device_mesh.ndim - 1))
    record = record or recorded_precision(model) or PRECISIONS["32-true"]
    old = list(model.parameters())
    # On a CPU mesh the sharded parameters already live in host memory: offloading is what
    # happens anyway (and FSDP2's offload path would pin memory for a device there is not).
    cpu_offload = offload and device_mesh.device_type != "cpu"
    options = dict(mesh=device_mesh, mp_policy=_mp_policy(record),
                   offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    units = _matches(model, match)
    _check_ties(model, units)
    # None spelled out as FSDP2 (torch 2.8+) decides it, which torch before 2.8 cannot take
    for module in units:
        fully_shard(module, reshard_after_forward=True if reshard_after_forward is None else reshard_after_forward,
                    **options)
    fully_shard(model, reshard_after_forward=False if reshard_after_forward is None else reshard_after_forward,
                **options)
    record_shard_precision(model, record)  # with_precision checks the step's precision against it
    new = {id(p) for p in model.parameters()}
    mark_replaced((p for p in old if id(p) not in new), "lt.shard")
    return model


def _check_not_quantized(model: torch.nn.Module) -> None:
    """bitsandbytes' 4-bit and int8 parameters keep their quantization state beside the packed
    data, which FSDP2's per-parameter sharding drops: the forward then fails deep inside
    bitsandbytes ("quant_state is required"). Refused here, naming what works: torchao's NF4
    (``lt.quantize(model, 'nf4', backend='torchao')``), whose tensors FSDP2 shards and
    all-gathers in 4 bits."""
    for name, param in model.named_parameters():
        if type(param).__module__.startswith("bitsandbytes"):
            raise NotImplementedError(
                f"shard: {name!r} is a bitsandbytes-quantized parameter ({type(param).__name__}, from lt.quantize); "
                f"FSDP2 cannot shard it (its quantization state is lost). For QLoRA across ranks quantize with "
                f"torchao instead: lt.quantize(model, 'nf4', backend='torchao'), then lt.add_adapters and lt.shard")


def _check_nf4_splits(model: torch.nn.Module, shards: int) -> None:
    """torchao's NF4 weights split only into whole scaler blocks: each rank's rows must hold a multiple of
    ``BLOCK * SCALER_BLOCK`` elements (otherwise torchao fails inside FSDP2 with an assertion)."""
    from ltransform.models.nf4 import BLOCK, SCALER_BLOCK

    whole = BLOCK * SCALER_BLOCK
    for name, param in model.named_parameters():
        rows = param.shape[0] if param.dim() else 0
        if wrappers.is_nf4(param) and (rows % shards or (param.numel() // shards) % whole):
            raise ValueError(
                f"shard: the 4-bit weight {name!r} ({'x'.join(map(str, param.shape))}) cannot be split over {shards} "
                f"ranks: torchao's NF4 splits by rows into whole blocks of {whole} elements, so each rank's part "
                f"must be a multiple of {whole} elements; keep the layer unquantized (lt.quantize(..., "
                f"skip={{{name.rsplit('.', 1)[0]!r}}})) or shard over fewer ranks")


def _shard_xla(model: torch.nn.Module, match: Callable[[torch.nn.Module], bool] | None, mesh: Any,
               offload: bool) -> torch.nn.Module:
    """FSDPv2 (torch_xla's SPMD FSDP) in place of FSDP2: see :func:`ltransform.distributed.xla.fsdp`."""
    from ltransform.distributed import xla

    if mesh is not None and not isinstance(mesh, tuple):
        raise TypeError("shard on XLA: mesh must be a shape (replicas, shards) (a torch DeviceMesh is for "
                        "torch.distributed process groups, which XLA's SPMD does not use)")
    if offload:
        raise ValueError("shard(offload=True) is not supported on XLA (FSDPv2 keeps the shards on the devices)")
    _check_ties(model, _matches(model, match))
    if mesh is not None and mesh[0] * mesh[1] != xla.device_count():
        raise ValueError(f"shard: mesh shape {mesh} needs {mesh[0] * mesh[1]} devices, but XLA has "
                         f"{xla.device_count()}")
    old = list(model.parameters())
    check = None
    if any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers())):
        # FSDPv2 cannot take a meta model: materialize it here, traced only (XLA is lazy), so the
        # initialisers then run shard by shard once the parameters are marked; lt.materialize
        # after lt.shard (the order on GPUs) finds nothing left to do
        from ltransform.models.init import SHARD_MATERIALIZED, materialize_then_check

        check = materialize_then_check(model, xla.device())
    wrapped = xla.fsdp(model, match, mesh)
    if check is not None:
        try:
            check()
        except RuntimeError as error:
            raise RuntimeError(f"shard on XLA initialises a meta model with its own initialisers (FSDPv2 cannot "
                               f"take a meta model), and {str(error).partition('materialize: ')[2].split(':')[0]}: "
                               f"on XLA call lt.materialize(model, init=fn) before lt.shard") from None
        setattr(wrapped, SHARD_MATERIALIZED, True)  # a later lt.materialize(model, init=fn) re-initialises
    new = {id(p) for p in wrapped.parameters()}
    mark_replaced((p for p in old if id(p) not in new), "lt.shard")
    return wrapped


def _mp_policy(record: Precision) -> Any:
    """FSDP2's policy for a precision: a mixed one all-gathers parameters in its autocast dtype
    and reduces gradients in float32 (torchtitan's choice); the others change nothing."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if record.autocast_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=record.autocast_dtype, reduce_dtype=torch.float32)


def _device_mesh_type() -> type:
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh


def _check_mesh(mesh: Any) -> None:
    if mesh is None or isinstance(mesh, _device_mesh_type()):
        return
    if not (isinstance(mesh, tuple) and len(mesh) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in mesh)):
        raise TypeError(f"shard: mesh must be a DeviceMesh or a shape (replicas, shards) of two "
                        f"positive ints, got {mesh!r}")


def _tensor_parallel_mesh(model: torch.nn.Module) -> Any:
    """The data-parallel mesh ``lt.parallelize`` recorded on ``model`` (None: it is not tensor parallel)."""
    from ltransform.models.order import TENSOR_PARALLEL

    record = next((r for m in model.modules() if (r := vars(m).get(TENSOR_PARALLEL)) is not None), None)
    if record is None:
        return None
    if record.dp_mesh is None:
        raise ValueError(f"shard: the model is tensor parallel over all {record.tp} ranks (lt.parallelize with a "
                         f"1-D mesh), which leaves no data-parallel dimension to shard over; give lt.parallelize "
                         f"mesh=<tensor-parallel size> (a 2-D ('dp', 'tp') mesh), then lt.shard shards over 'dp'")
    return record.dp_mesh


def resolve_mesh(mesh: Any) -> Any:
    """A ``DeviceMesh`` from ``shard``'s ``mesh`` argument (None, a shape, or a mesh)."""
    from torch.distributed.device_mesh import init_device_mesh

    device_type = env.device().type
    world = env.world_size()
    if mesh is None:
        return init_device_mesh(device_type, (world,))
    if isinstance(mesh, _device_mesh_type()):
        return mesh
    if mesh[0] * mesh[1] != world:
        raise ValueError(f"shard: mesh shape {mesh} needs {mesh[0] * mesh[1]} ranks, but the "
                         f"world size is {world}")
    return init_device_mesh(device_type, mesh, mesh_dim_names=("replicate", "shard"))


def _policy(policy: Policy) -> Callable[[torch.nn.Module], bool] | None:
    """The policy as a predicate (None: nothing below the root)."""
    if policy is None:
        return None
    if isinstance(policy, (set, frozenset, list, tuple)):
        classes = tuple(policy)
        if not all(isinstance(c, type) and issubclass(c, torch.nn.Module) for c in classes):
            raise TypeError(f"policy: a set of module classes must hold only nn.Module subclasses, got {policy!r}")
        return lambda module: isinstance(module, classes)
    if isinstance(policy, type) and issubclass(policy, torch.nn.Module):
        return lambda module: isinstance(module, policy)
    if isinstance(policy, int) and not isinstance(policy, bool):
        if policy < 1:
            raise ValueError(f"policy: a minimum parameter count must be positive, got {policy}")
        return _min_params(policy)
    if callable(policy):
        return policy
    raise TypeError(
        f"policy must be a set of module classes, a predicate module -> bool, or a minimum "
        f"parameter count, got {type(policy).__name__} {policy!r}"
    )


def _min_params(minimum: int) -> Callable[[torch.nn.Module], bool]:
    return lambda module: sum(p.numel() for p in module.parameters()) >= minimum


def _matches(model: torch.nn.Module, match: Callable[[torch.nn.Module], bool] | None) -> list[torch.nn.Module]:
    """Submodules (not the root) the policy matches, innermost first, so that a unit's
    parameters are those not already taken by a unit inside it."""
    if match is None:
        return []
    found: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        for child in module.children():
            visit(child)
        if module is not model and match(module):
            found.append(module)

    visit(model)
    return found


def _check_ties(model: torch.nn.Module, units: list[torch.nn.Module]) -> None:
    """Refuse a policy that splits a tied parameter across FSDP units: each unit would shard
    its own copy and the tie would be gone, silently."""
    unit_of: dict[int, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for unit in units:  # innermost first: a module belongs to the innermost unit holding it
        for module in unit.modules():
            unit_of.setdefault(id(module), names[id(unit)])
    places: dict[int, list[tuple[str, str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = model.get_submodule(name.rpartition(".")[0])
        places.setdefault(id(param), []).append((name, unit_of.get(id(owner), "<root>")))
    for tied in places.values():
        if len({unit for _, unit in tied}) > 1:
            where = ", ".join(f"{name!r} (unit {unit!r})" for name, unit in tied)
            raise ValueError(
                f"shard: the policy puts the tied parameters {where} in different FSDP units, which "
                f"would untie them; choose a policy that leaves them in one unit (e.g. leave the "
                f"embedding and the head to the root: policy={{Block}})")


def checkpoint_activations(model: Any = MISSING, /, policy: Policy = MISSING) -> Any:
    """Recompute the activations of the submodules ``policy`` matches in backward, instead of
    keeping them (torch's composable ``checkpoint``, in place; parameter names do not change).

    Args:
        model: the module; omit it for the partial form.
        policy: a set of module classes, a predicate ``module -> bool`` or a minimum
            parameter count, as for :func:`shard`.

    Raises:
        RuntimeError: applied after ``torch.compile`` or ``shard`` (it must come first).

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))
        >>> model = lt.checkpoint_activations(model, policy={torch.nn.Linear})
        >>> model(torch.ones(1, 2)).shape
        torch.Size([1, 1])
    """
    if policy is MISSING and not isinstance(model, torch.nn.Module):
        model, policy = MISSING, model
    if policy is MISSING or policy is None:
        raise ValueError("checkpoint_activations: give a policy, e.g. policy={Block}")
    match = _policy(policy)
    if model is MISSING:
        return Partial(lambda m: checkpoint_activations(m, policy), f"checkpoint_activations(policy={policy!r})")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"checkpoint_activations: expected a torch.nn.Module, got {type(model).__name__}")
    check_order(model, "checkpoint_activations")
    if "checkpoint_activations" in applied(model):
        raise RuntimeError("checkpoint_activations: already applied to this model; apply it once, "
                           "with one policy covering every submodule to recompute")
    targets = _matches(model, match) or ([model] if match is not None and match(model) else [])
    if not targets:
        raise ValueError(f"checkpoint_activations: policy {policy!r} matches no submodule of "
                         f"{type(model).__name__}")
    recompute = wrappers.checkpoint
    if env.accelerator() == "xla":  # XLA's compiler would merge torch's recomputation back into the forward
        from ltransform.distributed.xla import checkpoint as recompute
    for module in _outermost(targets):
        recompute(module)
    return model


def _outermost(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Drop modules nested in another selected one (checkpointing twice recomputes twice)."""
    inner = {id(m) for outer in modules for m in outer.modules() if m is not outer}
    return [m for m in modules if id(m) not in inner]
