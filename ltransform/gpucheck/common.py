"""What every check shares: sizes, the model and data, comparisons, the accelerator and a group."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

import ltransform as lt


class Skip(Exception):
    """Raised by a check that cannot run here; its message is the reason."""


@dataclasses.dataclass(frozen=True)
class Size:
    """How big a check's models and runs are: tiny for the CPU smoke run, real for a GPU."""

    name: str
    width: int  # the MLP's width (a multiple of 16: fp8 matmuls need it)
    rows: int  # rows per batch
    steps: int  # training steps of the precision / distributed checks
    quant_width: int  # width of the quantized MLP
    qlora_steps: int


SMOKE = Size("smoke", width=32, rows=16, steps=3, quant_width=512, qlora_steps=12)
FULL = Size("full", width=1024, rows=1024, steps=8, quant_width=4096, qlora_steps=30)
SIZES = {s.name: s for s in (SMOKE, FULL)}


def mlp(width: int, seed: int = 0) -> torch.nn.Sequential:
    """The model of the checks, built on the CPU from ``seed`` (so every device starts equal)."""
    torch.manual_seed(seed)
    return build_mlp(width)


def build_mlp(width: int) -> torch.nn.Sequential:
    """The same model, built where the caller says (``lt.init_module`` builds it on ``meta``)."""
    return torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width),
                               torch.nn.LayerNorm(width), torch.nn.Linear(width, width))


def batches(device: torch.device, size: Size, n: int | None = None, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """``n`` batches ``(x, y)`` drawn on the CPU, then put on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size.rows, size.width, generator=gen).to(device),
             torch.randn(size.rows, size.width, generator=gen).to(device)) for _ in range(n or size.steps)]


def mse(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch[0], batch[1]
    return F.mse_loss(model(x).float(), y.float())


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def run_lt(step: Any, state: Any, data: list[Any]) -> Any:
    """``lt.run`` with nothing around the steps: no progress bar, logging or signal handlers."""
    return lt.run(step, state, data, progress=False, log_every=None, preemption=None)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a sharded DTensor gathered), detached."""
    gather = getattr(tensor, "full_tensor", None)
    return (gather() if callable(gather) else tensor).detach()


def compare(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, Any]:
    """Bitwise equality and the largest difference of two lists of tensors."""
    assert len(ours) == len(reference), (len(ours), len(reference))
    diffs, bitwise = [], True
    for a, b in zip(ours, reference):
        a, b = full(a), full(b)
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        bitwise = bitwise and torch.equal(a, b)
        diffs.append((a.float() - b.float()).abs().max().item() if a.numel() else 0.0)
    return {"bitwise": bitwise, "max_abs_diff": max(diffs, default=0.0)}


def assert_close(ours: list[torch.Tensor], reference: list[torch.Tensor], *, atol: float, rtol: float,
                 what: str) -> dict[str, Any]:
    """``compare``, then fail unless every tensor is within ``atol + rtol * |reference|``."""
    result = compare(ours, reference)
    for i, (a, b) in enumerate(zip(ours, reference)):
        a, b = full(a).float(), full(b).float()
        bad = (a - b).abs() > atol + rtol * b.abs()
        assert not bad.any(), (f"{what}: tensor {i} differs from the reference by up to "
                               f"{(a - b).abs().max().item():.3g} (atol {atol}, rtol {rtol}); {result}")
    return result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its seconds, with the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def median_ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1e3, 4) if seconds else float("nan")


def clone_params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [full(p).clone() for p in model.parameters()]


def memory_allocated(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    return int(torch.cuda.memory_allocated(device))


def require(module: str, pip: str) -> Any:
    """Import an optional package, or skip the check naming the pip command and why: not
    installed, or failing as it imports (a build for another torch or CUDA raises
    AttributeError, RuntimeError, OSError, ...)."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as error:  # noqa: BLE001  (whatever the import raises: the check cannot run here)
        raise Skip(f"{module.split('.')[0]} is not installed or does not import ({type(error).__name__}: "
                   f"{str(error)[:500]}); pip install {pip}") from None


@contextlib.contextmanager
def accelerator(device: torch.device) -> Iterator[None]:
    """Train on ``device``'s kind (``lt.use_accelerator``) while the check runs, then restore the rule."""
    key = "LTRANSFORM_ACCELERATOR"  # what lt.use_accelerator sets
    before = os.environ.get(key)
    lt.use_accelerator(device.type)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def backend_for(device: torch.device) -> str:
    """nccl for CUDA tensors, with gloo beside it for the CPU (DCP's async writer needs one)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def one_rank_group(device: torch.device) -> Iterator[str]:
    """A real process group of one rank in this process (so ``lt.shard`` really shards); yields
    its backend and destroys it afterwards."""
    import torch.distributed as dist

    if not dist.is_available():
        raise Skip("torch.distributed is not available in this build of torch")
    if dist.is_initialized():
        raise RuntimeError("a process group exists already; the check needs a fresh one")
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield str(dist.get_backend())
    finally:
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """``"cuda"`` with its index (``torch.device("cuda", i)``), or the CPU."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
