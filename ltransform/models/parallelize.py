"""``parallelize``: tensor parallel (DTensor's ``parallelize_module``) as a model transform, by a plan."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch

from ltransform.core.compose import MISSING, Partial
from ltransform.distributed import env
from ltransform.models.order import TENSOR_PARALLEL, applied, check_order
from ltransform.models.shard import _device_mesh_type

STYLES = ("colwise", "rowwise", "sequence")  # the names a plan may give; or a ParallelStyle object


@attrs.frozen(kw_only=True)
class TensorParallel:
    """What ``parallelize`` records on the model's root: the tensor-parallel size, the data-parallel
    size and rank (1 and 0 when the tensor-parallel mesh spans every rank: every rank sees the same batch),
    and the data-parallel mesh ``lt.shard`` shards over by default (None when there is none)."""

    tp: int
    dp: int
    dp_rank: int
    dp_mesh: Any = attrs.field(default=None, eq=False, repr=False)
    loss_parallel: bool = False  # a style left the logits split over the vocabulary (lt.plans' loss_parallel)


def parallelize(model: Any = MISSING, /, plan: Any = MISSING, *, mesh: Any = None) -> Any:
    """Split ``model``'s layers across ranks (tensor parallel), in place, by a plan.

    Each module the plan names is handed to torch's ``parallelize_module`` with its style:
    ``"colwise"`` (``ColwiseParallel``: the weight split by output features, the input
    replicated, the output kept local), ``"rowwise"`` (``RowwiseParallel``: split by input
    features, the partial outputs summed), ``"sequence"`` (``SequenceParallel``: parameters
    replicated, activations split along the sequence), or any ``ParallelStyle`` object.
    Parameters of parallelized modules become ``DTensor`` shards, so build the optimizer after;
    DTensor does tensor parallel's collectives. In one process with no process group the model
    is returned unchanged, so the same script runs on one device.

    Args:
        model: the module; omit it for the partial form.
        plan: a dict from module names or ``fnmatch`` patterns relative to the model (e.g.
            ``"blocks.*.attn.qkv"``) to a style name or a ``ParallelStyle``; or a callable
            ``model -> dict`` (a ready plan such as ``lt.plans.gpt`` or ``lt.plans.llama``).
        mesh: None (one dimension, ``"tp"``, over all ranks: every rank sees the same batch); an
            int, the tensor-parallel size ``tp`` (a 2-D ``("dp", "tp")`` mesh of shape
            ``(world // tp, tp)``, tensor parallel on ``"tp"``); or a ``DeviceMesh`` (1-D over all
            ranks, or 2-D with a ``"tp"`` dimension).

    On a 2-D mesh, shard the model over its data-parallel dimension next: ``lt.shard(model,
    policy=...)`` does so by default (it reads the mesh from the model: no mesh to pass), the 2-D
    composition of tensor parallel within a group and FSDP across the groups; ``lt.run`` splits the
    data by the data-parallel size, the ranks of one tensor-parallel group seeing the same batch.

    Returns:
        The same module, parallelized in place.

    Raises:
        ValueError: an unknown style name (the message lists the valid ones), a pattern that
            matches no module, two patterns for one module, a split that does not divide a
            layer's features, a mesh that does not fit the world.
        TypeError: a style on a module kind it cannot take (``"colwise"`` on a ``LayerNorm``),
            a plan or mesh of the wrong kind.
        RuntimeError: applied twice, or after ``checkpoint_activations``, ``compile`` or ``shard``.

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> model = lt.parallelize(model, plan={"0": "colwise", "2": "rowwise"})
        >>> type(model[0].weight)  # one process, no group: unchanged
        <class 'torch.nn.parameter.Parameter'>
        >>> model = lt.shard(model)  # on a 2-D mesh (mesh=<tp size>): FSDP over its "dp" dimension

    Note:
        Tensor parallel comes first: ``parallelize`` → ``checkpoint_activations`` → ``compile`` →
        ``shard`` (each checks it). Split attention projections need an attention that takes
        its head count from the projection's (local) output size, as ``lt.plans`` explain.
    """
    if plan is MISSING and not isinstance(model, torch.nn.Module):
        model, plan = MISSING, model
    if plan is MISSING or plan is None:
        raise ValueError("parallelize: give a plan, e.g. plan={'blocks.*.attn.qkv': 'colwise', ...} or lt.plans.gpt")
    if not (callable(plan) or isinstance(plan, Mapping)):
        raise TypeError(f"parallelize: plan must be a dict of module names or patterns to styles, or a callable "
                        f"model -> dict, got {type(plan).__name__}")
    _check_mesh_argument(mesh)
    if model is MISSING:
        return Partial(lambda m: parallelize(m, plan, mesh=mesh), f"parallelize(plan={_plan_text(plan)})")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"parallelize: expected a torch.nn.Module, got {type(model).__name__}")
    check_order(model, "parallelize")
    if "parallelize" in applied(model):
        raise RuntimeError("parallelize: the model is already tensor parallel; apply lt.parallelize once, with one "
                           "plan for every layer to split")
    if env.accelerator() == "xla":
        raise RuntimeError("parallelize: tensor parallel on XLA is not supported yet (torch_xla's SPMD splits "
                           "tensors with its own mark_sharding); on XLA use lt.shard")
    pairs = _resolve(model, plan)
    if not env.ensure_process_group() and not isinstance(mesh, _device_mesh_type()):
        return model  # one plain process: nothing to split across
    tp_mesh, record = _meshes(mesh)
    for name, module, style in pairs:
        _check_divisible(name, module, style, record.tp)
    from torch.distributed.tensor.parallel import parallelize_module

    for _, module, style in pairs:
        parallelize_module(module, tp_mesh, style)
    if any(getattr(style, "loss_parallel", False) for _, _, style in pairs):
        record = attrs.evolve(record, loss_parallel=True)
    setattr(model, TENSOR_PARALLEL, record)
    return model


def tensor_parallel(models: Iterable[torch.nn.Module]) -> TensorParallel | None:
    """The record ``parallelize`` left on the first of ``models`` it parallelized (None: none was)."""
    for model in models:
        record = getattr(model, TENSOR_PARALLEL, None)
        if record is not None:
            return record
    return None


def _plan_text(plan: Any) -> str:
    name = getattr(plan, "__qualname__", None)
    return name or (f"{{{len(plan)} entries}}" if isinstance(plan, Mapping) else repr(plan))


def _check_mesh_argument(mesh: Any) -> None:
    if mesh is None or isinstance(mesh, _device_mesh_type()):
        return
    if isinstance(mesh, bool) or not isinstance(mesh, int):
        raise TypeError(f"parallelize: mesh must be None, a tensor-parallel size (int) or a DeviceMesh, got {mesh!r}")
    if mesh < 1:
        raise ValueError(f"parallelize: a tensor-parallel size must be positive, got {mesh}")


def _meshes(mesh: Any) -> tuple[Any, TensorParallel]:
    """The tensor-parallel (1-D) mesh, and the record of the tensor- and data-parallel sizes."""
    from torch.distributed.device_mesh import init_device_mesh

    world, device_type = env.world_size(), env.device().type
    if mesh is None:
        mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("tp",))
    elif isinstance(mesh, int):
        if world % mesh:
            raise ValueError(f"parallelize: a tensor-parallel size of {mesh} does not divide the world size {world}")
        mesh = init_device_mesh(device_type, (world // mesh, mesh), mesh_dim_names=("dp", "tp"))
    names = mesh.mesh_dim_names or ()
    if mesh.ndim == 1:
        if mesh.size() != world:
            raise ValueError(f"parallelize: a 1-D mesh must span all {world} ranks (it has {mesh.size()}); give a "
                             f"2-D mesh with a 'tp' dimension, or mesh=<tensor-parallel size>")
        return mesh, TensorParallel(tp=mesh.size(), dp=1, dp_rank=0)
    if mesh.ndim != 2 or "tp" not in names:
        raise ValueError(f"parallelize: a mesh must be 1-D, or 2-D with a 'tp' dimension; got {mesh.ndim}-D with "
                         f"dimensions {names!r}")
    dp_mesh = mesh[next(n for n in names if n != "tp")]
    return mesh["tp"], TensorParallel(tp=mesh["tp"].size(), dp=dp_mesh.size(), dp_rank=dp_mesh.get_local_rank(),
                                      dp_mesh=dp_mesh)


def _resolve(model: torch.nn.Module, plan: Any) -> list[tuple[str, torch.nn.Module, Any]]:
    """(name, module, ParallelStyle) for every module the plan names; every entry checked."""
    if callable(plan) and not isinstance(plan, Mapping):
        plan = plan(model)
        if not isinstance(plan, Mapping):
            raise TypeError(f"parallelize: a plan function must return a dict, got {type(plan).__name__}")
    if not plan:
        raise ValueError("parallelize: the plan is empty; name the layers to split")
    modules = dict(model.named_modules())
    chosen: dict[str, tuple[str, Any]] = {}
    for pattern, style in plan.items():
        if not isinstance(pattern, str):
            raise TypeError(f"parallelize: plan keys are module names or patterns (str), got {pattern!r}")
        names = [pattern] if pattern in modules else [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
        if not names:
            raise ValueError(f"parallelize: the plan's {pattern!r} matches no module of {type(model).__name__} "
                             f"(names are relative to the model, e.g. {_example(modules)!r})")
        record = _style(pattern, style)
        for name in names:
            if name in chosen:
                raise ValueError(f"parallelize: module {name!r} is matched by both {chosen[name][0]!r} and "
                                 f"{pattern!r}; give each module one style")
            _check_kind(name, modules[name], style)
            chosen[name] = (pattern, record)
    return [(name, modules[name], style) for name, (_, style) in chosen.items()]


def _example(modules: Mapping[str, torch.nn.Module]) -> str:
    return next((n for n, m in modules.items() if isinstance(m, torch.nn.Linear)), next(iter(modules)))


def _style(pattern: str, style: Any) -> Any:
    from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel

    if isinstance(style, ParallelStyle):
        return style
    makers: dict[str, Callable[[], Any]] = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel,
                                            "sequence": SequenceParallel}
    if isinstance(style, str) and style in makers:
        return makers[style]()
    raise ValueError(f"parallelize: unknown style {style!r} for {pattern!r}; expected one of: "
                     f"{', '.join(map(repr, STYLES))}, or a ParallelStyle object")


def _check_kind(name: str, module: torch.nn.Module, style: Any) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if isinstance(style, (str, ColwiseParallel, RowwiseParallel)) and style != "sequence":
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            text = style if isinstance(style, str) else type(style).__name__
            raise TypeError(f"parallelize: {text!r} splits a Linear or Embedding layer, but {name!r} is a "
                            f"{type(module).__name__}; use 'sequence' for norms, or name the layers inside it")


def _check_divisible(name: str, module: torch.nn.Module, style: Any, tp: int) -> None:
    """A split that does not divide a layer's features evenly would leave ranks with uneven heads."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    heads = getattr(style, "heads", None)  # (count, name): set by lt.plans on attention projections
    if heads is not None and heads[0] % tp:
        raise ValueError(f"parallelize: {name!r} holds {heads[0]} attention heads ({heads[1]}), which cannot be "
                         f"split evenly over {tp} tensor-parallel ranks; choose a tensor-parallel size dividing it")
    if not isinstance(module, torch.nn.Linear):
        return
    features = {ColwiseParallel: ("output", module.out_features), RowwiseParallel: ("input", module.in_features)}
    what, size = features.get(type(style), ("", 0))
    if what and size % tp:
        raise ValueError(f"parallelize: {name!r} has {size} {what} features, which {type(style).__name__} cannot "
                         f"split evenly over {tp} ranks")
