"""The process group and the collectives: rank, world size, device, all_reduce, ...

Every function works in one plain process too (world size 1, no process group): the
collectives are then the identity, so the same script runs on one device or many.
The process group is created on first need from torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...), or from those of a SLURM step (``srun``) or
an Open MPI job (``mpirun``), see ``clusters``: ``gloo`` on CPU, ``nccl`` for CUDA tensors.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
from typing import Any

import torch
import torch.distributed as dist

from ltransform.distributed import clusters

_OPS = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN, "product": dist.ReduceOp.PRODUCT}


def ensure_process_group() -> bool:
    """Join the process group torchrun's (or srun's, mpirun's) environment describes, once;
    True if a group is in use.

    A process with no ``WORLD_SIZE`` (or ``WORLD_SIZE=1``) and no group stays a plain single
    process (False). A group the user created (any size, e.g. one GPU) is used as it is.
    Collectives time out after ``LTRANSFORM_COLLECTIVE_TIMEOUT`` seconds (``lt.launch(timeout=)``
    sets it; default torch's, 30 minutes). Under torch's elastic agent each restart attempt
    meets under its own prefix of the agent's store, which outlives restarts: without it a
    restarted group would read the previous attempt's (dead) peer addresses.

    Raises:
        ValueError: ``LTRANSFORM_COLLECTIVE_TIMEOUT`` is not a positive number of seconds.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if on_xla():
        return _xla_hosts_group()
    if int(_launcher("WORLD_SIZE", "1")) <= 1:
        return False
    name = accelerator()
    for key, value in clusters.environment().items():  # srun/mpirun: what init's env:// reads
        os.environ.setdefault(key, value)
    cuda = name == "cuda"
    if cuda:
        torch.cuda.set_device(device())
    elif name == "xpu":
        torch.xpu.set_device(device())
    timeout = collective_timeout()
    backend = {"cuda": "cpu:gloo,cuda:nccl", "xpu": "cpu:gloo,xpu:xccl"}.get(name, "gloo")
    dist.init_process_group(backend, device_id=device() if cuda else None,
                            timeout=timeout, **_attempt_store(timeout))
    atexit.register(_destroy_process_group)
    return True


XLA_LAUNCH = (
    "XLA runs one process per host (SPMD: that process drives all of the host's chips), so it is not "
    "started with lt.launch, ltransform run or torchrun (on XLA their processes could not reach each "
    "other): run the script itself, `python train.py`, on each host (on a TPU pod slice: "
    "`gcloud compute tpus tpu-vm ssh NAME --worker=all --command='python train.py'`), with "
    "lt.distribute(step, 'xla') or 'auto'")


def _xla_hosts_group() -> bool:
    """On XLA: no group on one host; on several, a gloo group of the hosts' processes (one each),
    met through torch_xla's ``xla://`` rendezvous, for what crosses hosts outside the compiled
    step: checkpoint coordination, data lengths, logged metrics (torch_xla's own advice for
    SPMD checkpoints). Not run here: no TPU pod is reachable."""
    if int(_launcher("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(XLA_LAUNCH)
    from ltransform.distributed import xla

    if xla.process_count() <= 1:
        return False
    import torch_xla.distributed.xla_backend  # noqa: F401  (registers the xla:// rendezvous)

    dist.init_process_group("gloo", init_method="xla://", timeout=collective_timeout())
    atexit.register(_destroy_process_group)
    return True


def collective_device() -> torch.device:
    """Where tensors for ltransform's own collectives live: the GPU for nccl, else the CPU (gloo;
    on XLA too, whose hosts meet over gloo)."""
    name = accelerator()
    return device() if name in ("cuda", "xpu") else torch.device("cpu")


def collective_timeout() -> datetime.timedelta | None:
    """``LTRANSFORM_COLLECTIVE_TIMEOUT`` (seconds) as a timedelta; None if unset (torch's default).

    Raises:
        ValueError: the variable is not a positive number.
    """
    value = os.environ.get("LTRANSFORM_COLLECTIVE_TIMEOUT")
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"LTRANSFORM_COLLECTIVE_TIMEOUT={value!r}: expected a positive number of seconds, "
                         f"e.g. LTRANSFORM_COLLECTIVE_TIMEOUT=600")
    return datetime.timedelta(seconds=seconds)


def _attempt_store(timeout: datetime.timedelta | None) -> dict[str, Any]:
    """Under torch's elastic agent, the agent's store with a prefix for this restart attempt
    (``init_process_group``'s ``store``, ``rank``, ``world_size``); else ``{}`` (``env://``).

    The agent's store outlives a restart, and gloo finds its peers' addresses in it: a group
    restarted under the same keys reads the dead attempt's addresses and fails with
    "Connection refused" or waits forever.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    world = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout or datetime.timedelta(minutes=30))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"ltransform/attempt-{attempt}/", store), "rank": int(os.environ["RANK"]),
            "world_size": world}


class CollectiveError(RuntimeError):
    """A collective did not complete: it timed out (a rank is stuck) or a peer closed its
    connection (a rank died). ``rank`` is this process's rank, ``operation`` what it was doing."""

    def __init__(self, message: str, rank: int, operation: str) -> None:
        super().__init__(message)
        self.rank, self.operation = rank, operation


_TIMED_OUT = ("Timed out", "timed out", "Watchdog caught collective operation timeout")
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
_FROM_TORCH = ("gloo", "NCCL", "c10d", "ProcessGroup")  # an error of a collective, not of user code


def collective_error(error: BaseException, operation: str) -> CollectiveError | None:
    """``error`` (from torch.distributed) as a :class:`CollectiveError` naming this rank,
    ``operation`` and the fix; None if it is not a timed-out or broken collective."""
    if isinstance(error, CollectiveError):
        return None  # named already (by an lt.run inside this one)
    text = str(error)
    timed_out = any(word in text for word in _TIMED_OUT)
    if not (timed_out or any(word in text for word in _PEER_GONE)) or not isinstance(error, RuntimeError):
        return None
    if not (isinstance(error, dist.DistError) or any(word in text for word in _FROM_TORCH)):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    me, first = rank(), text.strip().splitlines()[0] if text.strip() else type(error).__name__
    limit = collective_timeout()
    if timed_out:
        import re

        from ltransform.distributed.strategies import gradient_group_timeouts

        # which group timed out: gloo says "Timed out waiting 3000ms", NCCL "Timeout(ms)=3000"
        waited = re.search(r"waiting (\d+) ?ms|Timeout\(ms\)=(\d+)", text)
        ms = int(waited.group(1) or waited.group(2)) if waited else None
        strategy = "lt.Strategy(name='ddp', timeout=SECONDS)"
        default_ms = round(limit.total_seconds() * 1000) if limit is not None else None
        if ms is not None and ms != default_ms and ms in {round(t.total_seconds() * 1000)
                                                          for t in gradient_group_timeouts()}:
            seconds = f"{ms / 1000:g} s (the gradient all-reduce's timeout, lt.Strategy(timeout=))"
            fix = f"raise that limit: {strategy}"
        else:
            seconds = f"{limit.total_seconds():g} s" if limit is not None else "the process group's timeout"
            fix = ("raise the limit: lt.launch(..., timeout=SECONDS), ltransform run --timeout SECONDS or "
                   "LTRANSFORM_COLLECTIVE_TIMEOUT=SECONDS"
                   + (f" (the gradient all-reduce's group: {strategy})" if gradient_group_timeouts() else ""))
        why = (f"did not complete within {seconds}: another rank is stuck or gone. Look for the first "
               f"failure in the other ranks' output; if a rank legitimately takes longer (a long "
               f"evaluation or save on one rank), {fix}")
    else:
        why = ("failed: another rank closed its connection (it died or exited); its own error, in its "
               "output, is the cause")
    return CollectiveError(f"rank {me}: {operation} {why} ({type(error).__name__}: {first})", me, operation)


def _destroy_process_group() -> None:
    """Tear down the group we created before the interpreter exits. Left to the interpreter's
    own teardown, gloo's threads sometimes die mid-destruction and abort the process
    ("terminate called without an active exception", SIGABRT) after the script has finished.
    The same happens when a DDP model that only a reference cycle keeps alive (one trained in
    a ``main()``) is freed by that teardown, holding the group: collect it first (under srun
    or mpirun, 1 exit in 5 aborted without the collect, 0 in 32 with it)."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def rank() -> int:
    """This process's global rank (0 in a single process; on XLA, its host's index).

    Example:
        >>> import ltransform as lt
        >>> lt.rank(), lt.world_size(), lt.local_rank()
        (0, 1, 0)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    if on_xla():
        from ltransform.distributed import xla

        return xla.process_index()
    return int(_launcher("RANK", "0"))


def world_size() -> int:
    """How many processes train together (1 in a single process); on XLA, how many devices
    (SPMD: one process per host drives them all, each batch split over them)."""
    if on_xla():  # (before the group: on several hosts it is one of processes, not devices)
        from ltransform.distributed import xla

        return xla.device_count()
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(_launcher("WORLD_SIZE", "1"))


def on_xla() -> bool:
    """Whether XLA is the accelerator, from the environment alone (no CUDA probe, no torch_xla
    import): what ``rank``, ``world_size`` and the launchers ask."""
    chosen = _chosen()
    if chosen:
        return _ALIASES.get(chosen, chosen) == "xla"
    from ltransform.distributed import xla

    return xla.requested()


def _chosen() -> str:
    """``LTRANSFORM_ACCELERATOR``, lower-cased; "" when unset or ``"auto"`` (the rule decides)."""
    chosen = os.environ.get(_CHOSEN, "").lower()
    return "" if chosen == "auto" else chosen


def local_rank() -> int:
    """This process's rank on its node (its GPU index)."""
    return int(_launcher("LOCAL_RANK", "0"))


def _launcher(key: str, default: str) -> str:
    """torchrun's variable ``key``, else the one the SLURM step or Open MPI job implies."""
    value = os.environ.get(key)
    return value if value is not None else clusters.environment().get(key, default)


ACCELERATORS = ("cpu", "cuda", "xla", "mps", "xpu")
_ALIASES = {"gpu": "cuda", "tpu": "xla", "rocm": "cuda"}  # Lightning's names, and AMD's
_CHOSEN = "LTRANSFORM_ACCELERATOR"


def accelerator() -> str:
    """The accelerator this process trains on: ``"cuda"``, ``"xla"``, ``"mps"``, ``"xpu"`` or ``"cpu"``.

    The one rule every part of ltransform asks (``lt.device()``, ``distribute("auto")``, where
    the runner puts models and batches): ``LTRANSFORM_ACCELERATOR`` if set (``lt.use_accelerator``,
    ``lt.launch(accelerator=)`` and ``ltransform run --accelerator`` set it; ``"auto"`` is the
    rule below); else XLA when the process was started for it (``PJRT_DEVICE`` set, as on a TPU
    VM), else the first available of CUDA (ROCm builds of torch present AMD GPUs as CUDA),
    Intel's XPU, Apple's MPS, and the CPU.

    Raises:
        ValueError: ``LTRANSFORM_ACCELERATOR`` names no accelerator (the message lists them).

    Example:
        >>> import ltransform as lt
        >>> lt.accelerator() in ("cpu", "cuda", "xla", "mps", "xpu")
        True
    """
    chosen = _chosen()
    if chosen:
        return canonical(chosen, f"{_CHOSEN}={os.environ[_CHOSEN]!r}")
    if on_xla():
        return "xla"
    if torch.cuda.is_available():
        return "cuda"
    if _xpu_available():
        return "xpu"
    if _mps_available():
        return "mps"
    return "cpu"


def use_accelerator(name: str, where: str | None = None) -> str:
    """Train on ``name`` from now on in this process and the ones it launches: ``"auto"``, ``"cpu"``,
    ``"cuda"`` (or ``"gpu"``), ``"xla"`` (or ``"tpu"``), ``"mps"``, ``"xpu"``; returns the accelerator
    chosen. Call it before building the model (it sets ``LTRANSFORM_ACCELERATOR``).

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
        RuntimeError: the accelerator is not available on this machine.
        ImportError: ``"xla"`` with torch_xla missing, or built for another torch (the message
            names both versions and the pip command).

    Example:
        >>> import ltransform as lt
        >>> lt.use_accelerator("cpu")
        'cpu'
        >>> lt.device()
        device(type='cpu')
        >>> _ = lt.use_accelerator("auto")
    """
    if isinstance(name, str) and name.lower() == "auto":
        os.environ[_CHOSEN] = "auto"
        return accelerator()
    chosen = canonical(name, where or f"lt.use_accelerator({name!r})")
    check_available(chosen)
    os.environ[_CHOSEN] = chosen
    return chosen


def canonical(name: Any, where: str) -> str:
    """``name``'s accelerator (``"gpu"`` is ``"cuda"``, ``"tpu"`` is ``"xla"``); ``where`` names the
    caller in the error."""
    canonical = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if canonical not in ACCELERATORS:
        raise ValueError(f"{where}: unknown accelerator; expected one of: 'auto', "
                         f"{', '.join(map(repr, ACCELERATORS))} (or 'gpu' for 'cuda', 'tpu' for 'xla')")
    return canonical


def check_available(name: str) -> None:
    """Raise ``RuntimeError`` unless accelerator ``name`` can be used in this process (``ImportError``
    for ``"xla"`` without a torch_xla built for this torch)."""
    from ltransform.distributed import xla

    if name == "xla":  # (without PJRT_DEVICE, torch_xla picks a TPU if there is one, else the CPU)
        xla.check_versions()
        return
    if not (name == "cpu" or _available(name)):
        raise RuntimeError(f"accelerator {name!r} is not available on this machine (torch {torch.__version__}); "
                           f"available: {', '.join(a for a in ('cuda', 'xpu', 'mps') if _available(a)) or 'cpu only'}")


def _available(name: str) -> bool:
    return {"cuda": torch.cuda.is_available, "mps": _mps_available, "xpu": _xpu_available}[name]()


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _xpu_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def device() -> torch.device:
    """The device this process trains on, by :func:`accelerator`: its CUDA GPU (by local rank), the
    XLA device (SPMD's one virtual device over all chips), Apple's MPS or Intel's XPU device, else
    the CPU.

    Example:
        >>> import torch, ltransform as lt
        >>> lt.device() == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
        True
    """
    name = accelerator()
    if name == "cuda":
        check_available(name)
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    if name == "xla":
        from ltransform.distributed import xla

        return xla.device()
    if name == "xpu":
        check_available(name)
        return torch.device("xpu", local_rank() % torch.xpu.device_count())
    if name == "mps":
        check_available(name)
        return torch.device("mps")
    return torch.device("cpu")


def process_count() -> int:
    """Processes in the job: the world size, but on XLA one process per host (SPMD)."""
    if on_xla():
        from ltransform.distributed import xla

        return xla.process_count()
    return world_size()


def process_index() -> int:
    """This process's index among :func:`process_count` (its rank; on XLA, its host's)."""
    if on_xla():
        from ltransform.distributed import xla

        return xla.process_index()
    return rank()


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested lists, tuples, dicts) moved to ``device``."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x, batch)


def _group_size(group: Any = None) -> int:
    return dist.get_world_size(group) if ensure_process_group() else 1


def _leaves(value: Any, fn: Any, call: str) -> Any:
    """``fn`` applied to every tensor and Python number in ``value`` (nested dicts, lists,
    tuples), the structure kept; ``TypeError`` for any other leaf."""
    from torch.utils._pytree import tree_map

    def one(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) or (isinstance(leaf, (int, float)) and not isinstance(leaf, bool)):
            return fn(leaf)
        raise TypeError(f"{call}: expected tensors or numbers (in dicts, lists, tuples), got "
                        f"{type(leaf).__name__} {leaf!r}; lt.broadcast carries any picklable value, "
                        f"torch.distributed.all_gather_object gathers one")

    return tree_map(one, value)


def _as_tensor(leaf: Any) -> torch.Tensor:
    """A Python number as a one-element tensor where the collectives run (float64 / int64)."""
    return torch.tensor([leaf], dtype=torch.float64 if isinstance(leaf, float) else torch.int64,
                        device=collective_device())


def all_reduce(value: Any, op: str = "mean", *, group: Any = None) -> Any:
    """Reduce ``value`` across ranks (``"mean"``, ``"sum"``, ``"max"``, ``"min"``, ``"product"``):
    a tensor, a Python number, or a dict/list/tuple of them (the structure is kept).

    A tensor comes back as a new tensor (the input is left unchanged, no autograd), a number
    as a number (``"mean"`` of ints as a float). In a single process the value is returned
    unchanged (a tensor as a detached copy).

    Args:
        value: a tensor, an int or float, or a nested dict/list/tuple of them.
        op: the reduction.
        group: a process group (``torch.distributed.new_group``) of the ranks to reduce over;
            default all ranks. ``"mean"`` divides by the group's size.

    Returns:
        ``value``'s structure with each leaf reduced.

    Raises:
        ValueError: an unknown ``op`` (the message lists the valid ones).
        TypeError: a leaf that is neither a tensor nor a number.

    Example:
        >>> import torch, ltransform as lt
        >>> lt.all_reduce(torch.tensor([1.0, 3.0]), "mean")
        tensor([1., 3.])
        >>> lt.all_reduce({"loss": 0.5, "seen": [3, torch.tensor(2.0)]}, "sum")
        {'loss': 0.5, 'seen': [3, tensor(2.)]}
    """
    if op not in _OPS:
        raise ValueError(f"all_reduce: unknown op {op!r}; expected one of: {', '.join(map(repr, _OPS))}")
    size = _group_size(group)

    def reduce(leaf: Any) -> Any:
        if size == 1:
            return leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf
        out = leaf.detach().clone() if isinstance(leaf, torch.Tensor) else _as_tensor(leaf)
        dist.all_reduce(out, op=_OPS[op], group=group)
        if op == "mean":
            out = out / size
        return out if isinstance(leaf, torch.Tensor) else out.item()

    return _leaves(value, reduce, "all_reduce")


def all_gather(value: Any, *, group: Any = None, sync_grads: bool = False) -> Any:
    """Every rank's ``value``, in rank order: for a tensor (same shape on all ranks) a list of
    the ranks' tensors; for a number a list of numbers; for a dict/list/tuple of them the same
    structure with each leaf such a list.

    Without ``sync_grads`` the gathered tensors are detached. With ``sync_grads=True`` the
    gather is autograd-aware (as ``torch.distributed.nn.functional.all_gather``): a loss over
    the gathered batch (a contrastive loss) sends each rank's share of the gradient back to the
    rank that computed it, so N ranks with lt.distribute train as one process with the whole
    batch.

    Args:
        value: a tensor, an int or float, or a nested dict/list/tuple of them.
        group: a process group of the ranks to gather from; default all ranks.
        sync_grads: keep the autograd graph through the gather (tensors only).

    Returns:
        ``value``'s structure with each leaf a list over the group's ranks.

    Raises:
        TypeError: a leaf that is neither a tensor nor a number.

    Example:
        >>> import torch, ltransform as lt
        >>> lt.all_gather(torch.tensor([7]))
        [tensor([7])]
        >>> lt.all_gather({"n": 3})
        {'n': [3]}
    """
    size = _group_size(group)

    def gather(leaf: Any) -> list[Any]:
        if size == 1:
            if isinstance(leaf, torch.Tensor):
                return [leaf if sync_grads else leaf.detach().clone()]
            return [leaf]
        if not isinstance(leaf, torch.Tensor):
            return [t.item() for t in _gather_tensor(_as_tensor(leaf), group, False)]
        return _gather_tensor(leaf, group, sync_grads)

    return _leaves(value, gather, "all_gather")


def _gather_tensor(tensor: torch.Tensor, group: Any, sync_grads: bool) -> list[torch.Tensor]:
    if sync_grads:
        return list(_GatherWithGrads.apply(tensor, group))
    out = [torch.empty_like(tensor) for _ in range(_group_size(group))]
    dist.all_gather(out, tensor.detach().contiguous(), group=group)
    return out


class _GatherWithGrads(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for each rank's piece and hands each
    rank its own: what ``torch.distributed.nn.functional.all_gather`` does, which torch 2.13
    deprecates in favour of a private module. The backward all-reduces the stacked gradients
    (every backend has all_reduce; gloo has no reduce_scatter): N times the traffic of a
    reduce-scatter, on embeddings, not weights."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, tensor.contiguous(), group=group)
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        summed = torch.stack(grads).contiguous()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=ctx.group)
        return summed[dist.get_rank(ctx.group)], None


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable ``value``, in rank order (``[value]`` in a single process)."""
    size = _group_size()
    if size == 1:
        return [value]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, value)
    return out


def broadcast(value: Any, src: int = 0, *, group: Any = None) -> Any:
    """Rank ``src``'s ``value`` on every rank: a tensor, or any picklable object.

    Args:
        value: a tensor (same shape and dtype on every rank), or any picklable object (a
            pytree of tensors too: it travels pickled).
        src: the global rank whose value wins.
        group: a process group holding ``src``; default all ranks.

    Example:
        >>> import ltransform as lt
        >>> lt.broadcast({"seed": 3})
        {'seed': 3}
    """
    if _group_size(group) == 1:
        return value
    if isinstance(value, torch.Tensor):
        out = value.detach().clone().contiguous()
        dist.broadcast(out, src=src, group=group)
        return out
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group: Any = None) -> None:
    """Wait until every rank (of ``group``, e.g. one from ``torch.distributed.new_group``)
    reaches this point (nothing in a single process).

    Example:
        >>> import ltransform as lt
        >>> lt.barrier()
    """
    if _group_size(group) > 1:
        dist.barrier(group=group)
