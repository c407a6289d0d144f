"""XLA (TPU) through torch_xla's SPMD: one process per host, one program over a mesh of its devices.

torch_xla is imported here only, and only when XLA is the accelerator (``PJRT_DEVICE`` set,
``LTRANSFORM_ACCELERATOR=xla``, or a model already on an XLA device). SPMD is switched on when
the runtime is first used, before any XLA tensor exists (torch_xla requires it): every XLA
tensor then lives on one virtual device, ``xla:0``, that spans all of the host's chips (and
all hosts'); a tensor no one marks is replicated, a marked one is split over a ``Mesh``.

- ``distribute(step, "xla")``: the parameters stay replicated, each batch is split along its
  first dimension over the mesh's ``"data"`` axis, and the XLA compiler inserts the gradient
  all-reduce (no process group, no hand-written collective).
- ``shard(model, policy)``: torch_xla's FSDPv2 (``SpmdFullyShardedDataParallel``) on a
  ``("data", "fsdp")`` mesh, ``policy`` as its ``auto_wrap_policy``; the batch is split over
  both axes.
- Checkpoints: DCP with torch_xla's SPMD planners (each host writes its own shards), read back
  through ltransform's checked, allowlisted path.

torch_xla's multi-process runtime (``torch_xla.launch``, ``xm.all_reduce``) is not used: on
one host SPMD needs one process, and on a pod slice one process per host joins through
``PJRT``'s own coordinator.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from collections.abc import Callable
from typing import Any

import torch

from ltransform.distributed import wrappers

INSTALL = "pip install 'torch=={v}.*' 'torch_xla=={v}.*'"
DATA, FSDP = "data", "fsdp"  # the mesh axes: data parallel (replicas), fully sharded
_WRAPPED = "_orig_module."  # the prefix FSDPv2 adds to every name under it


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check_versions(torch_version: str | None = None, xla_version: str | None = None) -> None:
    """Raise unless torch_xla is installed and built for this torch (same major.minor).

    Checked from the installed packages' metadata, before ``import torch_xla``: torch_xla declares
    no torch requirement, so pip installs torch_xla 2.9 next to torch 2.13 without complaint, and
    the import then fails with an undefined C++ symbol that names neither.

    Raises:
        ImportError: torch_xla is missing, or built for another torch; the message names both
            versions and the pip command that installs a matching pair.
    """
    torch_version = torch_version or torch.__version__
    if xla_version is None:
        try:
            xla_version = importlib.metadata.version("torch_xla")
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(
                f"XLA needs torch_xla, which is not installed; install the release that matches torch "
                f"{torch_version}: {INSTALL.format(v=_major_minor(torch_version))}") from None
    mine, theirs = _major_minor(torch_version), _major_minor(xla_version)
    if mine != theirs:
        raise ImportError(
            f"torch_xla {xla_version} is built for torch {theirs}, but torch {torch_version} is installed: "
            f"they must have the same major.minor version (torch_xla declares no torch requirement, so "
            f"pip does not check it). Install a matching pair: {INSTALL.format(v=theirs)} (or "
            f"{INSTALL.format(v=mine)} if torch_xla {mine} exists)")


@functools.lru_cache(maxsize=1)
def runtime() -> Any:
    """torch_xla's modules, imported once, with SPMD switched on (before any XLA tensor exists)."""
    check_versions()
    import torch_xla
    import torch_xla.runtime as xr

    if not xr.is_spmd():
        xr.use_spmd()
    return torch_xla


def requested() -> bool:
    """Whether this process was started for XLA: ``PJRT_DEVICE`` is set (``TPU``, or ``CPU`` with
    ``CPU_NUM_DEVICES`` for tests), or torch_xla is already in use."""
    import sys

    return bool(os.environ.get("PJRT_DEVICE")) or "torch_xla.runtime" in sys.modules and _in_use()


def _in_use() -> bool:
    import torch_xla.runtime as xr

    return xr.is_spmd()


def device() -> torch.device:
    """The SPMD virtual device (``xla:0``): every tensor of the program lives there."""
    return runtime().device()


def device_count() -> int:
    """Devices in the whole program (all hosts)."""
    runtime()
    import torch_xla.runtime as xr

    return xr.global_runtime_device_count()


def process_index() -> int:
    """This host's process (0 on one host)."""
    runtime()
    import torch_xla.runtime as xr

    return xr.process_index()


def process_count() -> int:
    """Processes in the program: one per host."""
    runtime()
    import torch_xla.runtime as xr

    return xr.process_count()


def sync() -> None:
    """Cut the traced graph here: compile it (once per shape) and run it on the devices."""
    runtime().sync()


def seed(value: int) -> None:
    """Seed XLA's generator (``torch.manual_seed`` does not)."""
    runtime()
    import torch_xla.core.xla_model as xm

    xm.set_rng_state(value)


def cut(ctx: Any, frame: Any, value: Any, *, proceed: Callable[..., Any]) -> Any:
    """The step-call handler that cuts the graph once the step (its optimizer update) is traced:
    ``distribute("xla")``'s, and the one a step bound on XLA without ``distribute`` gets."""
    result = proceed(frame, value)
    sync()
    return result


def move(module: torch.nn.Module, moved: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Put ``module`` on the XLA device, its weight ties kept; returns ``moved``, each old parameter's
    (and buffer's) id -> its new one, updated. ``Module.to`` cannot keep the Parameter objects here (an
    XLA tensor cannot take a CPU one's place), and it makes a new one for every module that holds
    one, so a tied embedding and head would come out as two (GPT-2's would train untied). Pass the
    same ``moved`` for several models that share a tensor: each holder gets the first one moved."""
    moved = {} if moved is None else moved
    places: dict[int, list[tuple[str, bool]]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        places.setdefault(id(param), []).append((name, True))
    for name, buffer in module.named_buffers(remove_duplicate=False):
        if buffer is not None:
            places.setdefault(id(buffer), []).append((name, False))
    module.to(device())
    for old, names in places.items():
        first, is_param = names[0]
        tensor = moved.setdefault(old, module.get_parameter(first) if is_param else module.get_buffer(first))
        for name, _ in names:
            owner, _, attribute = name.rpartition(".")
            holder = module.get_submodule(owner)
            if getattr(holder, attribute) is not tensor:
                setattr(holder, attribute, tensor)  # (a registered buffer stays one, as persistent as it was)
    return moved


def is_xla(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.device.type == "xla"


# --- meshes and batches -------------------------------------------------------------------------

_STATE: dict[str, Any] = {"mesh": None}  # the mesh batches are split over (distribute / shard set it)


def make_mesh(shape: tuple[int, ...] | None = None, names: tuple[str, ...] = (DATA,)) -> Any:
    """A ``Mesh`` over every device: ``shape`` (default: all devices on one axis), named ``names``.

    Raises:
        ValueError: the shape does not cover the devices.
    """
    import numpy as np
    import torch_xla.distributed.spmd as xs

    count = device_count()
    shape = shape or (count,)
    if int(np.prod(shape)) != count:
        raise ValueError(f"XLA mesh shape {shape} covers {int(np.prod(shape))} devices, but there are {count}")
    return xs.Mesh(np.arange(count), shape, names)


def use_mesh(mesh: Any) -> None:
    """Split every batch from now on along its first dimension over all of ``mesh``'s axes."""
    _STATE["mesh"] = mesh
    _batch_spec.cache_clear()


@functools.lru_cache(maxsize=16)
def _batch_spec(ndim: int) -> Any:
    import torch_xla.distributed.spmd as xs

    mesh = _STATE["mesh"]
    # on several hosts each holds its own part of the batch (lt.run splits a DataLoader by host)
    return xs.ShardingSpec(mesh, (tuple(mesh.axis_names),) + (None,) * (ndim - 1), minibatch=process_count() > 1)


def batch_mover(device: torch.device) -> Callable[[Any], Any]:
    """A function that puts a batch's tensors on the XLA device: split along the first dimension
    over the active mesh (no mesh: replicated), in one host-to-device transfer per tensor.

    A tensor whose first dimension the mesh's size does not divide, and a scalar, are replicated.
    """
    import torch_xla.core.xla_model as xm
    from torch.utils._pytree import tree_map

    hosts = process_count()

    def move(tensor: Any) -> Any:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "xla":
            return tensor
        mesh = _STATE["mesh"]
        spec = None
        if mesh is not None and tensor.dim() > 0:
            if tensor.shape[0] % (mesh.size() // hosts) == 0:
                spec = _batch_spec(tensor.dim())
            elif hosts > 1:  # each host's part would be taken for the whole batch
                raise ValueError(f"XLA on {hosts} hosts: a batch tensor of shape {tuple(tensor.shape)} does not "
                                 f"split over this host's {mesh.size() // hosts} devices; use a batch size they "
                                 f"divide, and drop_last=True in the DataLoader")
        return xm.send_cpu_data_to_device([tensor.cpu()], device, input_sharding=spec)[0]

    return lambda batch: tree_map(move, batch)


# --- FSDPv2 -------------------------------------------------------------------------------------


def fsdp(model: torch.nn.Module, match: Callable[[torch.nn.Module], bool] | None,
         shape: tuple[int, int] | None) -> torch.nn.Module:
    """``model`` wrapped in torch_xla's FSDPv2 (``SpmdFullyShardedDataParallel``): parameters split
    over the ``"fsdp"`` axis of a ``("data", "fsdp")`` mesh of ``shape`` = (replicas, shards)
    (default: ``(1, all devices)``), each submodule ``match`` selects wrapped on its own. Its state
    dict keys are those of the unwrapped model (FSDPv2's ``_orig_module.`` is taken out on save
    and put back on load), so a checkpoint moves between XLA, CPU and GPU."""
    from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel as FSDPv2

    count = device_count()
    shape = shape or (1, count)
    mesh = make_mesh(shape, (DATA, FSDP))
    move(model)  # (FSDPv2's own .to would untie tied weights)

    def policy(module: torch.nn.Module, recurse: bool, **_: Any) -> bool:
        return True if recurse else match is not None and bool(match(module))  # descend everywhere; wrap what matches

    def output(out: Any, mesh: Any) -> None:  # the batch dimension of each output, over both axes
        import torch_xla.distributed.spmd as xs
        from torch.utils._pytree import tree_leaves

        for leaf in tree_leaves(out):
            if is_xla(leaf) and leaf.dim() > 0 and leaf.shape[0] % mesh.size() == 0:
                xs.mark_sharding(leaf, mesh, ((DATA, FSDP),) + (None,) * (leaf.dim() - 1))

    options = dict(mesh=mesh, shard_output=output, extra_data_axis=DATA)
    if match is not None:
        options["auto_wrap_policy"] = policy
    wrapped = FSDPv2(model, **options)
    for module in wrapped.modules():
        if isinstance(module, FSDPv2):
            module.register_state_dict_post_hook(_unwrapped_keys)
            module.register_load_state_dict_pre_hook(_wrapped_keys)
            module.register_load_state_dict_post_hook(functools.partial(_reshard, mesh))
    use_mesh(mesh)
    return wrapped


def _fsdp_spec(param: torch.Tensor) -> tuple[Any, ...]:
    """FSDPv2's split of a parameter: its largest dimension over the ``"fsdp"`` axis."""
    spec: list[Any] = [None] * param.dim()
    if spec:
        spec[list(param.shape).index(max(param.shape))] = FSDP
    return tuple(spec)


def _reshard(mesh: Any, module: torch.nn.Module, incompatible: Any) -> None:
    """Split the parameters again after ``load_state_dict``: copying into an XLA tensor gives it new,
    replicated data, so a loaded model would otherwise train unsharded (correct, but whole on every
    device)."""
    import torch_xla.distributed.spmd as xs

    for param in module.parameters():
        if param.dim() and not wrappers.xla_sharded(param):
            xs.mark_sharding(param, mesh, _fsdp_spec(param))


def reshard_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Give each optimizer state tensor shaped like its parameter the parameter's FSDPv2 split again:
    ``Optimizer.load_state_dict`` puts a loaded state on the parameter's device replicated, which
    would hold the whole Adam moments on every device."""
    mesh = _STATE["mesh"]
    if mesh is None or FSDP not in mesh.axis_names:
        return
    import torch_xla.distributed.spmd as xs

    for group in optimizer.param_groups:
        for param in group["params"]:
            if not (is_xla(param) and wrappers.xla_sharded(param)):
                continue
            for value in optimizer.state.get(param, {}).values():
                if is_xla(value) and value.shape == param.shape and not wrappers.xla_sharded(value):
                    xs.mark_sharding(value, mesh, _fsdp_spec(param))


def is_fsdp(module: torch.nn.Module) -> bool:
    """A module wrapped by torch_xla's FSDPv2 (checked without importing torch_xla)."""
    from ltransform.distributed.wrappers import is_xla_sharded

    return is_xla_sharded(module)


def _unwrapped_keys(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _WRAPPED)]:
        state_dict[prefix + key[len(prefix) + len(_WRAPPED):]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)  # module versions, keyed by module path
    if metadata is not None:
        for key in [k for k in metadata if k == prefix + _WRAPPED[:-1] or k.startswith(prefix + _WRAPPED)]:
            value = metadata.pop(key)
            unwrapped = prefix[:-1] if key == prefix + _WRAPPED[:-1] else prefix + key[len(prefix) + len(_WRAPPED):]
            metadata[unwrapped] = value


def _wrapped_keys(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _WRAPPED)]:
        state_dict[prefix + _WRAPPED + key[len(prefix):]] = state_dict.pop(key)


def unwrapped_name(name: str) -> str:
    """A parameter name without FSDPv2's ``_orig_module.`` parts (what the plain model calls it)."""
    return name.replace(_WRAPPED, "")


def checkpoint(module: torch.nn.Module) -> None:
    """Recompute ``module``'s activations in backward with torch_xla's checkpoint (in place): XLA's
    compiler would merge torch's recomputation with the forward and keep the activations anyway;
    torch_xla's puts an optimization barrier in between."""
    runtime()
    from torch_xla.distributed.fsdp.utils import checkpoint_module

    checkpoint_module(module)




# --- checkpoints --------------------------------------------------------------------------------


def holds_xla(tree: Any) -> bool:
    """Whether a (nested) state dict holds XLA tensors: DCP then goes through the SPMD planners."""
    from torch.utils._pytree import tree_leaves

    return any(is_xla(leaf) for leaf in tree_leaves(tree))


def save_planner() -> Any:
    """torch_xla's ``SPMDSavePlanner``: each host writes the shards its devices hold (a replicated
    tensor once)."""
    runtime()
    from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

    return SPMDSavePlanner()


def load_planner_class() -> type:
    """torch_xla's ``SPMDLoadPlanner`` (reads each host's shards into the live sharded tensors),
    reading non-tensor items with ``weights_only=True`` (its own reads them with torch's default)."""
    runtime()
    from torch.distributed.checkpoint._nested_dict import set_element
    from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

    class SafeSPMDLoadPlanner(SPMDLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            self.set_bytes(read_item, torch.load(value, weights_only=True))

        def set_bytes(self, read_item: Any, loaded: Any) -> None:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)

    return SafeSPMDLoadPlanner
