"""Monitors: throughput and MFU, device memory, learning rates, logged at log points only.

Each is a hook due only at its log points (``run.log_every`` unless given ``every``), so between
them the loop does not call it: no per-step work, no host sync. At a log point it may synchronize
the device (the throughput monitor does, so that queued kernels are counted in its window).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from ltransform.core.inventory import inventory
from ltransform.distributed import env, wrappers
from ltransform.runner.hooks import NEVER, say
from ltransform.runner.hooks.peaks import matmul_dtype, peak_tflops

_RECOUNTS = 2  # counting again when an evaluation ran inside the counted step, at most


class _Monitor:
    """Due every ``cadence`` steps (``every``, else the run's ``log_every``) and at the end."""

    reads_state = False
    __name__ = "monitor"

    def __init__(self, every: int | None, call: str) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"{call}: every must be a positive int (optimizer steps) or None, got {every!r}")
        self.every = every
        self.cadence: int | None = every
        self._logged_at = -1

    def start(self, state: Any, run: Any) -> None:
        self.cadence = self.every or run.log_every
        self._logged_at = run.step

    def next_step(self, step: int) -> float:
        return (step // self.cadence + 1) * self.cadence if self.cadence else NEVER

    def __call__(self, state: Any, run: Any) -> None:
        self._logged_at = run.step
        values = self.measure(state, run)
        if values:
            run.log(values)

    def end(self, state: Any, run: Any) -> None:
        if self.cadence and self._logged_at != run.step:
            self(state, run)

    def measure(self, state: Any, run: Any) -> dict[str, float]:
        raise NotImplementedError


def _compiled(model: torch.nn.Module) -> bool:
    """Whether ``torch.compile`` compiled the model or one of its modules (``torch.compile(m)``
    wraps it; ``m.compile()`` and ``lt.compile`` compile in place)."""
    return any(wrappers.compiled_original(m) is not None or wrappers.is_compiled_in_place(m) for m in model.modules())


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``: a log point's sync, so the window holds it."""
    if device.type in ("cuda", "xpu"):
        getattr(torch, device.type).synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.wait_device_ops()


def _training_device(models: Any) -> torch.device:
    for model in models:
        for param in model.parameters():
            return param.device
    return env.device()


def _max_across_ranks(values: dict[str, float], run: Any) -> dict[str, float]:
    """Each value's maximum over the ranks (one collective), so every rank logs the same."""
    if not run.distributed or not values:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=env.collective_device())
    return dict(zip(values, env.all_reduce(stacked, "max").tolist()))


def _batch_size(batch: Any) -> int | None:
    return next((t.shape[0] for t in tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim()), None)


def _token_count(batch: Any) -> int | None:
    for t in tree_leaves(batch):
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and not (t.is_floating_point() or t.is_complex()
                                                                 or t.dtype == torch.bool):
            return t.numel()
    return None


def _shapes(batch: Any) -> tuple[Any, ...]:
    return tuple(tuple(t.shape) for t in tree_leaves(batch) if isinstance(t, torch.Tensor))


class Throughput(_Monitor):
    __name__ = "throughput"

    def __init__(self, *, flops: int | float | bool | None, peak: float | None, samples: Callable[[Any], int] | None,
                 tokens: Callable[[Any], int] | None, every: int | None) -> None:
        super().__init__(every, "lt.throughput")
        if flops is not None and flops is not False and (isinstance(flops, bool) or not isinstance(flops, (int, float))
                                                         or flops <= 0):
            raise ValueError(f"lt.throughput: flops must be None (count them), False (none) or a positive "
                             f"number (FLOPs per optimizer step per process), got {flops!r}")
        if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float)) or peak <= 0):
            raise ValueError(f"lt.throughput: peak must be a positive number (TFLOP/s per device) or None, "
                             f"got {peak!r}")
        for name, fn in (("samples", samples), ("tokens", tokens)):
            if fn is not None and not callable(fn):
                raise TypeError(f"lt.throughput: {name} must be a function batch -> int or None, got {fn!r}")
        self.count = flops is None
        self.flops: float | None = None if flops is None or flops is False else float(flops)
        self.given_peak, self.peak = peak, peak
        self.samples_fn, self.tokens_fn = samples, tokens
        self._counter: Any = None  # the FlopCounterMode, while it counts
        self._counted_for: tuple[Any, ...] | None = None  # (step, models, batch shapes) self.flops is for
        self._evaluated: Any = None
        self._recounts = 0
        self._window: tuple[float, int, int] | None = None  # (time, step, micro) it began at
        self._device = torch.device("cpu")
        self._devices = self._processes = 1

    def start(self, state: Any, run: Any) -> None:
        super().start(state, run)
        self._window, self._recounts = None, 0
        models = list(inventory(state).models.values())
        self._device = _training_device(models)
        processes = env.process_count()
        self._processes = processes if run.distributed else 1
        self._devices = max(1, env.world_size() // processes)  # devices a process drives (XLA SPMD)
        if self.given_peak is None:
            self.peak = _device_peak(self._device, run.precision)
        counting_for = (id(run.bound.step), tuple(id(m) for m in models))
        if self.count and any(_compiled(m) for m in models):
            # a step run under FlopCounterMode (a dispatch mode) makes torch.compile skip the model
            # for good: counting would leave it eager; the FLOPs must be given
            self.count = False
            say("lt.throughput: the model is compiled (torch.compile), which counting FLOPs with "
                "FlopCounterMode would undo; pass flops= (FLOPs per optimizer step per process) for "
                "TFLOP/s and MFU")
        if self.cadence and self.count and (self._counted_for is None or self._counted_for[:2] != counting_for):
            self._counted_for = (*counting_for, None)
            self._begin_count(run)

    def next_step(self, step: int) -> float:
        if self.cadence and self._window is None:
            return step + 1  # the first step: the FLOPs counted, the window starts
        return super().next_step(step)

    def __call__(self, state: Any, run: Any) -> None:
        _synchronize(self._device)
        now = time.perf_counter()
        if self._window is None:
            if self._counter is not None:
                self._end_count(run)
            elif (self.count and self._counted_for is not None and not run.distributed
                  and self._counted_for[2] != _shapes(run.batch)):
                # the FLOPs of an earlier run were for other batch shapes (one process only: ranks'
                # shapes may differ, and counting again on some would split the collectives)
                self._begin_count(run)
            if self._counter is None:  # counted (or nothing to count): time from here
                self._window = (now, run.step, run.micro)
            return
        values = self._values(run, now)
        self._window = (now, run.step, run.micro)
        run.log(values)

    def end(self, state: Any, run: Any) -> None:
        if self._window is not None and self._window[1] != run.step:
            self(state, run)

    def _values(self, run: Any, now: float) -> dict[str, float]:
        assert self._window is not None
        began, step, micro = self._window
        seconds = _max_across_ranks({"s": now - began}, run)["s"]
        steps, micros = run.step - step, run.micro - micro
        values = {"throughput/seconds": seconds}
        size = self.samples_fn(run.batch) if self.samples_fn is not None else _batch_size(run.batch)
        if size is not None:
            values["throughput/samples_per_s"] = micros * size * self._processes / seconds
        tokens = self.tokens_fn(run.batch) if self.tokens_fn is not None else _token_count(run.batch)
        if tokens is not None:
            values["throughput/tokens_per_s"] = micros * tokens * self._processes / seconds
        if self.flops is not None:
            tflops = self.flops * steps / seconds / self._devices / 1e12
            values["throughput/flops_per_step"] = self.flops
            values["throughput/tflops"] = tflops
            if self.peak is not None:
                values["throughput/mfu"] = tflops / self.peak
        return values

    def _begin_count(self, run: Any) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self._evaluated = run.evaluated
        self._counter = FlopCounterMode(display=False)
        self._counter.__enter__()

    def _end_count(self, run: Any) -> None:
        counter, self._counter = self._counter, None
        counter.__exit__(None, None, None)
        assert self._counted_for is not None
        self._counted_for = (*self._counted_for[:2], _shapes(run.batch))
        self.flops = float(counter.get_total_flops())
        if run.evaluated is not self._evaluated:  # an evaluation ran while counting: its FLOPs are in
            if self._recounts < _RECOUNTS:
                self._recounts += 1
                self._begin_count(run)
                return
            warnings.warn(f"lt.throughput: an evaluation ran at each of the {_RECOUNTS + 1} steps its FLOPs "
                          f"were counted at, so they include it; pass flops=... (per optimizer step)",
                          RuntimeWarning, stacklevel=2)
        if not self.flops:
            self.flops = None  # nothing counted (no matmul FlopCounterMode knows): no tflops

    def close(self, run: Any = None) -> None:
        if self._counter is not None:  # stopped (an error, an interrupt) while counting
            counter, self._counter = self._counter, None
            counter.__exit__(None, None, None)
            self._counted_for = None


def _device_peak(device: torch.device, precision: str | None) -> float | None:
    """The table's peak for the device trained on, in the run's precision (None if not known)."""
    dtype = matmul_dtype(precision)
    if dtype is None:
        return None
    if device.type == "cuda":
        return peak_tflops(torch.cuda.get_device_name(device), dtype)
    if device.type == "xla":
        name = _tpu_type()
        return None if name is None else peak_tflops(name, dtype)
    return None


def _tpu_type() -> str | None:
    """torch_xla's TPU type (``"v5litepod"``), None off TPUs or where it cannot be read."""
    if os.environ.get("PJRT_DEVICE", "").upper() != "TPU":
        return None
    accelerator = os.environ.get("TPU_ACCELERATOR_TYPE")
    if accelerator:
        return accelerator.split("-")[0]
    try:
        from torch_xla._internal import tpu

        return str(tpu.get_tpu_type())
    except Exception:  # noqa: BLE001 (the metadata server unreachable: no peak, no MFU)
        return None


class Memory(_Monitor):
    __name__ = "memory_monitor"

    def __init__(self, every: int | None) -> None:
        super().__init__(every, "lt.memory_monitor")
        self._device = torch.device("cpu")

    def start(self, state: Any, run: Any) -> None:
        super().start(state, run)
        self._device = _training_device(inventory(state).models.values())
        if self.cadence and self._device.type in ("cuda", "xpu"):
            getattr(torch, self._device.type).reset_peak_memory_stats(self._device)

    def measure(self, state: Any, run: Any) -> dict[str, float]:
        values: dict[str, float] = {}
        if self._device.type in ("cuda", "xpu"):
            module = getattr(torch, self._device.type)
            values["memory/max_allocated_gb"] = module.max_memory_allocated(self._device) / 1e9
            values["memory/max_reserved_gb"] = module.max_memory_reserved(self._device) / 1e9
            module.reset_peak_memory_stats(self._device)
        elif self._device.type == "cpu":
            try:
                import resource
            except ImportError:  # Windows
                return {}
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            values["memory/max_rss_gb"] = peak * (1 if sys.platform == "darwin" else 1024) / 1e9
        return _max_across_ranks(values, run)


class LearningRates(_Monitor):
    __name__ = "lr_monitor"

    def __init__(self, every: int | None, momentum: bool) -> None:
        super().__init__(every, "lt.lr_monitor")
        self.momentum = momentum
        self._optimizers: dict[str, Any] = {}
        self._found_for: Any = None  # the binding they were found for (a new one: walk the state again)

    def measure(self, state: Any, run: Any) -> dict[str, float]:
        if run.bound is not self._found_for or self._found_for is None:  # walk the state once per binding
            self._optimizers, self._found_for = dict(inventory(state).optimizers), run.bound
        optimizers = self._optimizers
        values: dict[str, float] = {}
        for path, optimizer in optimizers.items():
            groups = optimizer.param_groups
            for i, group in enumerate(groups):
                name = group.get("name") if isinstance(group.get("name"), str) else str(i)
                parts = ((path, len(optimizers) > 1), (name, len(groups) > 1))
                where = "".join(f"/{part}" for part, shown in parts if shown)
                values[f"lr{where}"] = float(group["lr"])
                if self.momentum and ("momentum" in group or "betas" in group):
                    values[f"momentum{where}"] = float(group["momentum"] if "momentum" in group else group["betas"][0])
        return values


def throughput(*, flops: int | float | bool | None = None, peak: float | None = None,
               samples: Callable[[Any], int] | None = None, tokens: Callable[[Any], int] | None = None,
               every: int | None = None) -> Throughput:
    """A hook logging samples/s, tokens/s, TFLOP/s and MFU at log points.

    Logged, for the window since the previous log point (the first window starts after the first
    optimizer step of the run, so warm-up and compilation are left out; on a GPU the device is
    synchronized at each log point, so the window holds the kernels queued in it; it holds all
    that ran in it: an evaluation or a checkpoint between two log points lowers the rates):

    - ``throughput/seconds``: the window's wall-clock time (the longest rank's);
    - ``throughput/samples_per_s``: micro-steps in it × the batch size × processes / seconds. The
      batch size is dim 0 of the batch's first tensor, or ``samples(batch)``, read from the last
      batch: every batch of the window is taken to have its size;
    - ``throughput/tokens_per_s``: likewise with ``tokens(batch)``, or the number of elements of
      the batch's first integer tensor of 2 or more dims (token ids); not logged without either;
    - ``throughput/flops_per_step`` and ``throughput/tflops``: FLOPs of one optimizer step (all its
      micro-steps, forward and backward) of one process, and the TFLOP/s each device achieves:
      flops × steps / seconds / devices per process (1 except on XLA SPMD);
    - ``throughput/mfu``: tflops / the device's peak (a fraction); not logged where the peak is
      not known (the CPU, an unknown GPU, float64) and ``peak`` is not given.

    The FLOPs are counted once, by ``torch.utils.flop_counter.FlopCounterMode`` over the run's first
    optimizer step (matmuls, convolutions and attention: what dominates a model's FLOPs). They are
    the FLOPs that run, activation-checkpointing recomputation included (pass ``flops=`` the model's
    own, e.g. 6 × parameters × tokens, for MFU in its usual sense). The count is kept for later
    runs of the same step, models and batch shapes. Hooks before this one that run at the first
    step are counted too (an evaluation there makes it count at the next step).

    Args:
        flops: None to count them, a number to give them (per optimizer step per process), False
            for none (no tflops, no MFU).
        peak: the device's peak, TFLOP/s; default: from a table (H100/H200 SXM, PCIe and NVL,
            GH200, A100, L4, TPU v4/v5e/v5p/v6e) for the run's precision: bf16/fp16, fp32 or TF32
            (``torch.set_float32_matmul_precision``), fp8 for the fp8 precisions.
        samples: ``batch -> int``, a process's samples in a batch (default: dim 0 of its first tensor).
        tokens: ``batch -> int``, a process's tokens in a batch (default: see above).
        every: log every this many optimizer steps (default: the run's ``log_every``).

    Returns:
        The hook, for ``lt.run(..., hooks=[...])``.

    Raises:
        ValueError: ``flops``, ``peak`` or ``every`` is not a positive number (or None).
        TypeError: ``samples`` or ``tokens`` is not callable.

    Example:
        >>> import csv, tempfile, torch, ltransform as lt
        >>> model = torch.nn.Linear(4, 4, bias=False)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> log = lt.CSVLogger(tempfile.mkdtemp())
        >>> _ = lt.run(lt.train_step(lambda m, x: m(x).pow(2).mean()), state, [torch.randn(8, 4)] * 10,
        ...            log_every=5, loggers=[log], hooks=[lt.throughput(peak=1.0)], progress=False)
        >>> next(csv.DictReader(open(log.path)))["throughput/flops_per_step"]  # 2 * 8 * 4 * 4, twice
        '512.0'
    """
    return Throughput(flops=flops, peak=peak, samples=samples, tokens=tokens, every=every)


def memory_monitor(*, every: int | None = None) -> Memory:
    """A hook logging the peak memory of each interval between log points.

    On CUDA (and XPU): ``memory/max_allocated_gb`` and ``memory/max_reserved_gb``, torch's
    ``max_memory_allocated``/``max_memory_reserved`` of the training device in GB (10^9 bytes);
    the peak is reset at the run's start and after each reading, so each interval has its own
    (a ``torch.cuda.max_memory_allocated`` of your own sees the same resets). On the CPU:
    ``memory/max_rss_gb``, the process's peak resident memory since it started (the OS keeps no
    per-interval peak); nothing where ``resource`` is missing (Windows) or on other devices. On
    several ranks each value is the maximum over the ranks (one collective), so every rank logs
    the same.

    Args:
        every: log every this many optimizer steps (default: the run's ``log_every``).

    Example:
        >>> import ltransform as lt
        >>> hooks = [lt.memory_monitor()]  # lt.run(..., hooks=hooks)
    """
    return Memory(every)


def lr_monitor(*, every: int | None = None, momentum: bool = False) -> LearningRates:
    """A hook logging every optimizer's learning rate per parameter group at log points.

    Names: ``lr`` for one optimizer with one group (as ``lt.run``'s logging does for the first);
    ``lr/<group>`` with several groups (the group's ``"name"`` if it has one, else its index);
    ``lr/<optimizer path>`` or ``lr/<optimizer path>/<group>`` with several optimizers (the path
    in the state, e.g. ``extra.disc``).

    Args:
        every: log every this many optimizer steps (default: the run's ``log_every``).
        momentum: also log ``momentum/...``: the group's ``momentum`` (SGD) or ``betas[0]`` (Adam).

    Example:
        >>> import ltransform as lt
        >>> hooks = [lt.lr_monitor(momentum=True)]  # lt.run(..., hooks=hooks)
    """
    return LearningRates(every, momentum)
