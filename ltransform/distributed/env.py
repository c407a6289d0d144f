"""The process group and the collectives: rank, world size, device, all_reduce, ...

Every function works in one plain process too (world size 1, no process group): the
collectives are then the identity, so the same script runs on one device or many.
The process group is created on first need from torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...): ``gloo`` on CPU, ``nccl`` for CUDA tensors.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch
import torch.distributed as dist

_OPS = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN, "product": dist.ReduceOp.PRODUCT}


def ensure_process_group() -> bool:
    """Join the process group torchrun's environment describes, once; True if a group is in use.

    A process with no ``WORLD_SIZE`` (or ``WORLD_SIZE=1``) and no group stays a plain single
    process (False). A group the user created (any size, e.g. one GPU) is used as it is.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(device())
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", device_id=device() if cuda else None)
    atexit.register(_destroy_process_group)
    return True


def _destroy_process_group() -> None:
    """Tear down the group we created before the interpreter exits. Left to the interpreter's
    own teardown, gloo's threads sometimes die mid-destruction and abort the process
    ("terminate called without an active exception", SIGABRT) after the script has finished."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's global rank (0 in a single process).

    Example:
        >>> import ltransform as lt
        >>> lt.rank(), lt.world_size(), lt.local_rank()
        (0, 1, 0)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes train together (1 in a single process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank on its node (its GPU index)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    """The device this process trains on: its CUDA GPU if there is one, else the CPU.

    Example:
        >>> import torch, ltransform as lt
        >>> lt.device() == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
        True
    """
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested lists, tuples, dicts) moved to ``device``."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x, batch)


def _group_size() -> int:
    return dist.get_world_size() if ensure_process_group() else 1


def all_reduce(tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """Reduce ``tensor`` across ranks (``"mean"``, ``"sum"``, ``"max"``, ``"min"``, ``"product"``).

    Returns a new tensor; the input is left unchanged.

    Example:
        >>> import torch, ltransform as lt
        >>> lt.all_reduce(torch.tensor([1.0, 3.0]), "mean")
        tensor([1., 3.])
    """
    if op not in _OPS:
        raise ValueError(f"all_reduce: unknown op {op!r}; expected one of: {', '.join(map(repr, _OPS))}")
    out = tensor.detach().clone()
    size = _group_size()
    if size == 1:
        return out
    dist.all_reduce(out, op=_OPS[op])
    return out / size if op == "mean" else out


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in rank order.

    Example:
        >>> import torch, ltransform as lt
        >>> lt.all_gather(torch.tensor([7]))
        [tensor([7])]
    """
    size = _group_size()
    if size == 1:
        return [tensor.detach().clone()]
    out = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(out, tensor.detach().contiguous())
    return out


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable ``value``, in rank order (``[value]`` in a single process)."""
    size = _group_size()
    if size == 1:
        return [value]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, value)
    return out


def broadcast(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank: a tensor, or any picklable object.

    Example:
        >>> import ltransform as lt
        >>> lt.broadcast({"seed": 3})
        {'seed': 3}
    """
    if _group_size() == 1:
        return value
    if isinstance(value, torch.Tensor):
        out = value.detach().clone().contiguous()
        dist.broadcast(out, src=src)
        return out
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait until every rank reaches this point (nothing in a single process)."""
    if _group_size() > 1:
        dist.barrier()
