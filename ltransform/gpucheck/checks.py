"""The checks, in the order they run, and how one is run and recorded.

Each check is a plain function ``fn(device, size) -> dict`` of measured numbers: it raises
``Skip(reason)`` when it cannot run here and fails by raising (an ``AssertionError`` naming what
differed from its hand-written reference). The CPU smoke run, the GPU run and ``tests/test_cuda.py``
call the same functions with another ``device`` and ``size``.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ltransform.gpucheck import distributed, lowbit, memory, precision
from ltransform.gpucheck.common import Size, Skip, sync

CheckFn = Callable[[torch.device, Size], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Check:
    """A named check, its timeout on a GPU (full size) and whether it runs only on CUDA."""

    name: str
    fn: CheckFn
    timeout_s: float
    cuda_only: bool = False


def _quantize(mode: str) -> Check:
    fn = functools.partial(lowbit.check_quantize, mode)
    functools.update_wrapper(fn, lowbit.check_quantize)
    return Check(f"quantize-{mode}", fn, 60)


CHECKS: tuple[Check, ...] = (
    Check("bf16-mixed", precision.check_bf16_mixed, 60),
    Check("16-mixed", precision.check_16_mixed, 60),
    Check("bf16-true", precision.check_bf16_true, 60),
    Check("materialize", distributed.check_materialize, 90),
    Check("fsdp", distributed.check_fsdp, 90),
    Check("checkpoint-async", distributed.check_checkpoint_async, 90),
    Check("fsdp-checkpoint-async", distributed.check_fsdp_checkpoint, 90),
    *(_quantize(mode) for mode in ("int8", "int8-training", "nf4", "nf4-dq", "fp4", "fp4-dq")),
    Check("quantize-from-weights", lowbit.check_quantize_from_weights, 60),
    Check("qlora", lowbit.check_qlora, 90),
    Check("torchao-float8", lowbit.check_torchao_float8, 120, cuda_only=True),
    Check("launch", distributed.check_launch, 150),
    Check("memory-estimate", memory.check_memory_estimate, 120),
)
BY_NAME = {c.name: c for c in CHECKS}


def cleanup(device: torch.device) -> None:
    """Free what the last check left: Python garbage, then the CUDA caching allocator."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def healthy(device: torch.device) -> bool:
    """Whether the device still works: a CUDA error such as an illegal memory access is sticky and
    would fail every later check of this process, so the worker is restarted after one."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return (torch.ones(1, device=device) + 1).item() == 2.0
    except Exception:  # noqa: BLE001  (any error here means the context is gone)
        return False


def run_check(check: Check, device: torch.device, size: Size) -> dict[str, Any]:
    """Run one check, isolated: a failure is recorded with its traceback, never raised (also a
    sticky CUDA error surfacing in the clean-up: the worker then restarts, see ``healthy``)."""
    record: dict[str, Any] = {"name": check.name, "doc": (check.fn.__doc__ or "").strip().split("\n\n")[0]}
    try:
        cleanup(device)
    except Exception as error:  # noqa: BLE001  (the device broke before: this check cannot run on it)
        record.update(status="fail", reason=f"the device failed before the check: {type(error).__name__}: "
                                            f"{error}"[:2000], traceback=traceback.format_exc()[-8000:],
                      duration_s=0.0)
        return record
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            record.update(status="pass", numbers=check.fn(device, size))
        except Skip as skip:
            record.update(status="skip", reason=str(skip))
        except Exception as error:  # noqa: BLE001  (any failure of a check is its result)
            record.update(status="fail", reason=f"{type(error).__name__}: {error}"[:2000],
                          traceback=traceback.format_exc()[-8000:])
    try:
        sync(device)
    except Exception as error:  # noqa: BLE001  (an asynchronous CUDA error surfaces here)
        record.update(status="fail", reason=f"CUDA error after the check: {error}"[:2000],
                      traceback=traceback.format_exc()[-8000:])
    record["duration_s"] = round(time.perf_counter() - start, 3)
    messages = list(dict.fromkeys(f"{w.category.__name__}: {w.message}"[:300] for w in caught))
    if messages:
        record["warnings"] = messages[:10]
    try:
        if device.type == "cuda":
            record["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        cleanup(device)
    except Exception as error:  # noqa: BLE001  (a sticky CUDA error raises again here: record it, do not die)
        if record["status"] != "fail":
            record.update(status="fail", reason=f"CUDA error in the clean-up after the check: {error}"[:2000],
                          traceback=traceback.format_exc()[-8000:])
        else:
            record["cleanup_error"] = f"{type(error).__name__}: {error}"[:500]
    return record
