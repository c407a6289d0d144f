"""``find_batch_size``: the largest batch that fits (Lightning's ``scale_batch_size``, Accelerate's
``find_executable_batch_size``), telling an out-of-memory error from any other by its type and message."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from ltransform.distributed import env

_OOM_MESSAGES = (
    "out of memory",  # CUDA ("CUDA out of memory", "CUDA error: out of memory"), XPU, MPS
    "can't allocate memory",  # torch's CPU allocator (DefaultCPUAllocator) on Linux and macOS
    "not enough memory",  # the same on Windows
    "resource_exhausted",  # XLA ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate ...")
    "resource exhausted",
    "cudnn_status_not_supported",  # cuDNN's answer to too large an input (Lightning's and Accelerate's checks)
    "cublas_status_alloc_failed",  # cuBLAS could not allocate (Accelerate's: "... `cublasCreate(handle)`")
)
_FINDER_MODES = ("power", "binsearch")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that memory ran out: ``torch.OutOfMemoryError`` (CUDA and other
    accelerators), Python's ``MemoryError``, or a ``RuntimeError`` from torch's CPU allocator
    ("DefaultCPUAllocator: can't allocate memory" / "not enough memory"), MPS or XLA
    ("RESOURCE_EXHAUSTED"), cuDNN ("CUDNN_STATUS_NOT_SUPPORTED", its answer to too large an
    input) or cuBLAS ("CUBLAS_STATUS_ALLOC_FAILED"), as Lightning's and Accelerate's checks.

    Example:
        >>> from ltransform.runner.batch_size import is_out_of_memory
        >>> try:
        ...     torch.empty(2**62, dtype=torch.uint8)
        ... except RuntimeError as error:
        ...     print(is_out_of_memory(error), is_out_of_memory(RuntimeError("shape mismatch")))
        True False
    """
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(error, RuntimeError):
        message = str(error).lower()
        return any(text in message for text in _OOM_MESSAGES)
    return False


def find_batch_size(fn: Callable[[int], Any], *, start: int = 1, max_size: int | None = None,
                    mode: str = "power") -> int:
    """The largest batch size for which ``fn(batch_size)`` runs without running out of memory.

    ``fn`` is called with ``start``, then double that, and so on, until it runs out of memory
    (see :func:`is_out_of_memory`) or ``max_size`` ran. With ``mode="binsearch"`` the sizes
    between the last that ran and the first that did not are then bisected. Between tries the
    garbage collector runs and the accelerator's cache is emptied. Any other error propagates
    unchanged. On several ranks (call it on every rank) the ranks agree after each try (one
    ``all_reduce``): a size fails if it failed on any rank, so every rank returns the same size,
    the largest that ran everywhere; an error other than running out of memory on one rank is
    raised there, and the others raise a ``RuntimeError`` naming the size, instead of waiting.

    Args:
        fn: ``fn(batch_size)``: e.g. build a loader of that batch size and run a few steps.
        start: the first size to try, a positive int.
        max_size: stop at this size (returned if it runs); None: no limit.
        mode: ``"power"`` (doubling; the answer is a power of two times ``start``) or
            ``"binsearch"`` (doubling, then bisecting after the first failure).

    Returns:
        The largest size that ran.

    Raises:
        ValueError: a bad option (the message names the valid values).
        TypeError: ``fn`` is not callable.
        RuntimeError: even ``start`` runs out of memory; or another rank's ``fn`` raised.

    Warning:
        On several ranks the ranks agree only after ``fn`` returns. If ``fn`` trains with DDP
        (or FSDP) and only some ranks run out of memory in the middle of a forward or backward,
        the others wait in the gradient all-reduce until the process group's collective
        timeout (Accelerate's ``find_executable_batch_size`` has the same limit) instead of
        agreeing on a smaller size. Probe with no collective inside ``fn`` (a forward, or a
        forward and backward of the bare model rather than the DDP-wrapped one, leaving a
        margin for DDP's gradient buckets, about one more copy of the gradients), or give the
        collectives a short timeout while probing (``lt.launch(..., timeout=60)``).

    Example:
        >>> import torch, ltransform as lt
        >>> def fn(batch_size):  # more than 24 samples do not fit
        ...     torch.empty(batch_size * (2**10 if batch_size <= 24 else 2**48), dtype=torch.uint8)
        >>> lt.find_batch_size(fn), lt.find_batch_size(fn, mode="binsearch")
        (16, 24)
    """
    if not callable(fn):
        raise TypeError(f"lt.find_batch_size: fn must be callable as fn(batch_size), got {type(fn).__name__}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 1:
        raise ValueError(f"lt.find_batch_size: start must be a positive int, got {start!r}")
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < start):
        raise ValueError(f"lt.find_batch_size: max_size must be an int >= start ({start}) or None, got {max_size!r}")
    if mode not in _FINDER_MODES:
        raise ValueError(f"lt.find_batch_size: unknown mode {mode!r}; expected one of: "
                         f"{', '.join(map(repr, _FINDER_MODES))}")
    distributed = env.ensure_process_group() and env.process_count() > 1
    good, size = None, start
    while True:
        if not _fits(fn, size, distributed):
            break
        good = size
        if size == max_size:
            return size
        size = size * 2 if max_size is None else min(size * 2, max_size)
    if good is None:
        raise RuntimeError(f"lt.find_batch_size: batch_size={start} already runs out of memory; try a smaller "
                           f"start, or lower the memory fn needs (precision, activation checkpointing)")
    if mode == "binsearch":
        bad = size
        while bad - good > 1:
            middle = (good + bad) // 2
            if _fits(fn, middle, distributed):
                good = middle
            else:
                bad = middle
    return good


def _fits(fn: Callable[[int], Any], size: int, distributed: bool) -> bool:
    """Run ``fn(size)``: True if it ran (on every rank), False if it ran out of memory (on any)."""
    error: BaseException | None = None
    try:
        fn(size)
        outcome = 0
    except Exception as caught:  # noqa: BLE001  (decided below: out of memory, or raised again)
        if is_out_of_memory(caught):
            outcome = 1
        else:
            outcome, error = 2, caught
    _free(collect=outcome != 0)  # (a caught error's frames hold tensors in cycles: collect them)
    if distributed:
        outcome = int(env.all_reduce(outcome, "max"))
    if outcome == 2:
        if error is not None:
            raise error
        raise RuntimeError(f"lt.find_batch_size: fn({size}) raised an error other than running out of memory "
                           f"on another rank (its traceback is in that rank's output)")
    return outcome == 0


def _free(collect: bool) -> None:
    """Give memory back between tries: Python's garbage (after a failure), then the accelerators'
    caches."""
    if collect:
        gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        xpu.empty_cache()
    if torch.backends.mps.is_available():
        torch.mps.empty_cache()
