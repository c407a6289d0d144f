"""The process that runs the checks, one after another, for the supervisor (``runner.py``).

    python -m ltransform.gpucheck.worker --device cuda --size full --events EVENTS.jsonl --jobs a,b,benchmark

Before each job it appends ``{"event": "start", "name": ...}`` to the events file and after it
``{"event": "result", ...}`` (the benchmark also ``{"event": "partial", ...}`` after each of its
parts), flushed at once, so the supervisor can time each job out and can tell
which job a crash (a segfault in a kernel, an abort) happened in.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ltransform.gpucheck.runner import bench_errors

BENCHMARK = "benchmark"
# the module whose run_benchmark the "benchmark" job calls (another one in the tests: a fake slow benchmark)
BENCH_MODULE = os.environ.get("LTRANSFORM_GPUCHECK_BENCH", "ltransform.gpucheck.bench")


def jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it: tensors become numbers or lists, other objects their ``str``."""
    import torch

    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_benchmark_job(device: Any, smoke: bool, deadline: float | None,
                      emit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Call the GPU benchmark (``ltransform/gpucheck/bench.py``: ``run_benchmark(*, smoke, device,
    deadline, progress)``) if it is there; options it does not take are not passed. ``deadline``
    is a wall-clock time (``time.time()``): when the supervisor kills this worker. Each finished
    part is emitted at once (``{"event": "partial", "results": ..., "running": ...}``), so a kill
    keeps what finished. The job fails if any part or loop recorded an error."""
    start = time.perf_counter()
    if importlib.util.find_spec(BENCH_MODULE) is None:
        return {"name": BENCHMARK, "status": "skip", "reason": f"{BENCH_MODULE} is not there yet", "duration_s": 0.0}

    def progress(results: dict[str, Any], running: str | None) -> None:
        if emit is not None:
            emit({"event": "partial", "name": BENCHMARK, "running": running, "results": results})

    try:
        bench = importlib.import_module(BENCH_MODULE)
        run_benchmark = bench.run_benchmark
        accepted = inspect.signature(run_benchmark).parameters
        offered: dict[str, Any] = {"smoke": smoke, "device": str(device), "deadline": deadline, "progress": progress}
        if "deadline" not in accepted and deadline is not None:  # an older benchmark: the seconds left
            offered["budget_s"] = offered["time_budget_s"] = deadline - time.time()
        kwargs = {k: v for k, v in offered.items() if k in accepted}
        results = jsonable(run_benchmark(**kwargs))
        record = {"name": BENCHMARK, "status": "pass", "results": results}
        failed = bench_errors(results)
        if failed:
            record.update(status="fail", reason=f"{len(failed)} part(s) or loop(s) of the benchmark failed: "
                                                + "; ".join(failed)[:2000])
    except Exception as error:  # noqa: BLE001  (the benchmark failing is its result)
        record = {"name": BENCHMARK, "status": "fail", "reason": f"{type(error).__name__}: {error}"[:2000],
                  "traceback": traceback.format_exc()[-8000:]}
    record["duration_s"] = round(time.perf_counter() - start, 3)
    return record


def _exit_with_parent() -> None:
    """End this worker (and with it what it started) when the supervisor is gone, e.g. killed by
    an outer timeout: the worker runs in a session of its own, so nothing else would stop it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(75)

    threading.Thread(target=watch, name="gpucheck-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the GPU check's worker (started by python -m ltransform.gpucheck)")
    parser.add_argument("--device", required=True)
    parser.add_argument("--size", required=True, choices=("smoke", "full"))
    parser.add_argument("--events", required=True, type=Path)
    parser.add_argument("--jobs", required=True, help="comma-separated check names (and 'benchmark')")
    parser.add_argument("--bench-deadline", type=float, default=None,
                        help="wall-clock time (time.time()) when the supervisor stops this worker")
    args = parser.parse_args(argv)
    _exit_with_parent()

    def emit(event: dict[str, Any]) -> None:
        with args.events.open("a") as out:
            out.write(json.dumps(jsonable(event)) + "\n")
            out.flush()

    common = importlib.import_module("ltransform.gpucheck.common")
    checks = importlib.import_module("ltransform.gpucheck.checks")
    emit({"event": "ready", "time": time.time()})  # imports done (torch, ltransform, the checks)
    device = common.resolve_device(args.device)
    size = common.SIZES[args.size]
    for name in args.jobs.split(","):
        emit({"event": "start", "name": name, "time": time.time()})
        if name == BENCHMARK:
            result = run_benchmark_job(device, args.size == "smoke", args.bench_deadline, emit)
        else:
            result = checks.run_check(_resolve(checks, name), device, size)
        emit({"event": "result", **result})
        if result["status"] == "fail" and not checks.healthy(device):
            print(f"the device does not work after {name}: exiting so that a fresh worker runs the rest", flush=True)
            os._exit(70)


def _resolve(checks: Any, name: str) -> Any:
    """A check of the registry by name, or ``module:function`` (a check of your own, e.g. in a test)."""
    if name in checks.BY_NAME or ":" not in name:
        return checks.BY_NAME[name]
    module, _, function = name.partition(":")
    return checks.Check(name, getattr(importlib.import_module(module), function), timeout_s=60)


if __name__ == "__main__":
    main()
