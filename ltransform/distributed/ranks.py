"""Rank-zero helpers: ``print``, ``rank_zero_only``, ``rank_zero_first``, ``node_rank``.

What Lightning's ``fabric.print``, ``rank_zero_only``, ``fabric.rank_zero_first`` and
``fabric.node_rank`` do, as functions. Each works in a plain single process too (rank 0 of 1).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ltransform.distributed import clusters, env

R = TypeVar("R")

# default process group -> (it, this rank's node group): every rank must create every node's group,
# in the same order, so they are built once per default group and kept
_NODE_GROUPS: dict[int, tuple[Any, Any, int]] = {}


def print(*args: Any, **kwargs: Any) -> None:  # (lt.print, as fabric.print; builtins.print below)
    """``print(*args, **kwargs)`` on global rank 0 only; nothing on the other ranks.

    Example:
        >>> import ltransform as lt
        >>> lt.print("loss", 0.5)
        loss 0.5
    """
    if env.rank() == 0:
        builtins.print(*args, **kwargs)


def rank_zero_only(fn: Callable[..., R], /) -> Callable[..., R | None]:
    """Decorate ``fn`` to run on global rank 0 only; on the other ranks a call does nothing and
    returns None.

    No collective is involved, so the other ranks do not wait for rank 0: what they need from
    it, they get with ``lt.broadcast``.

    Args:
        fn: the function to guard.

    Returns:
        ``fn`` wrapped (its name, docstring and signature kept).

    Raises:
        TypeError: ``fn`` is not callable.

    Example:
        >>> import ltransform as lt
        >>> @lt.rank_zero_only
        ... def report(step):
        ...     return f"step {step}"
        >>> report(3)
        'step 3'
    """
    if not callable(fn):
        raise TypeError(f"rank_zero_only: expected a function to decorate, got {type(fn).__name__} {fn!r}")

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> R | None:
        return fn(*args, **kwargs) if env.rank() == 0 else None

    return guarded


def node_rank() -> int:
    """This process's node index, 0 to the number of nodes - 1 (0 in a single process).

    From the launcher: torchrun's ``GROUP_RANK`` (``lt.launch`` is torchrun's agent), a
    ``NODE_RANK`` set by the user or Lightning's scripts, a SLURM step's ``SLURM_NODEID``, else
    ``RANK // LOCAL_WORLD_SIZE`` (Open MPI, which numbers ranks node by node).

    Example:
        >>> import ltransform as lt
        >>> lt.node_rank()
        0
    """
    for key in ("GROUP_RANK", "NODE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    if clusters.name() == "slurm" and os.environ.get("SLURM_NODEID", "").isdigit():
        return int(os.environ["SLURM_NODEID"])
    launcher = clusters.environment()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or launcher.get("LOCAL_WORLD_SIZE", "0"))
    return env.rank() // local_world if local_world > 0 else 0


def node_group() -> tuple[Any, int]:
    """The process group of this node's ranks and its first rank (global); ``(None, 0)`` in a
    single process. Built (collectively, on first call) for every node at once, from each
    rank's :func:`node_rank`, and kept for the default group's lifetime."""
    if not env.ensure_process_group():
        return None, 0
    world = dist.group.WORLD
    cached = _NODE_GROUPS.get(id(world))
    if cached is None or cached[0] is not world:
        nodes = env.all_gather_objects(node_rank())
        mine: tuple[Any, int] = (None, 0)
        for node in sorted(set(nodes)):  # every rank creates every group, in the same order
            ranks = [r for r, n in enumerate(nodes) if n == node]
            group = dist.new_group(ranks)
            if node == nodes[env.rank()]:
                mine = (group, ranks[0])
        cached = _NODE_GROUPS[id(world)] = (world, *mine)
    return cached[1], cached[2]


@contextlib.contextmanager
def rank_zero_first(local: bool = False) -> Iterator[None]:
    """Run the block on global rank 0 first, then on the other ranks (which wait for it).

    For work one process should do before the others read its result: download a data set,
    build a cache, then every rank opens it. With ``local=True`` the first rank of each node
    (its local rank 0) goes first and the node's other ranks wait for it alone: one download
    per node, for nodes that do not share a file system.

    If the block raises on the first rank, the waiting ranks are released with a
    ``RuntimeError`` (they do not run the block, and do not hang) and the first rank's own
    error propagates there. Call it on every rank (of the node, with ``local=True``): it
    meets the others in a collective.

    Args:
        local: per node (each node's first rank goes first) instead of once for the job.

    Raises:
        RuntimeError: on a waiting rank, when the block failed on the rank that went first.

    Example:
        >>> import ltransform as lt
        >>> with lt.rank_zero_first():
        ...     data = list(range(3))  # e.g. download once, then every rank loads
        >>> data
        [0, 1, 2]

    Note:
        With ``local=True`` the first call builds one process group per node (every rank takes
        part), kept for later calls.
    """
    if local:
        group, first = node_group()
    else:
        group, first = None, 0
    if env._group_size(group) <= 1:
        yield
        return
    flag = torch.zeros(1, dtype=torch.int32, device=env.collective_device())
    if env.rank() == first:
        try:
            yield
        except BaseException:
            flag.fill_(1)
            dist.broadcast(flag, src=first, group=group)  # release the waiting ranks
            raise
        dist.broadcast(flag, src=first, group=group)
        return
    dist.broadcast(flag, src=first, group=group)  # wait until the first rank is through
    if int(flag.item()):
        where = f"its node's first rank, {first}" if local else "rank 0"
        raise RuntimeError(f"rank_zero_first: the block failed on {where} (its error is in its output), "
                           f"so rank {env.rank()} does not run it")
    yield
