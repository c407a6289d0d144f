"""The meta-device traces behind ``lt.estimate_memory``: what a forward saves for backward, in
order, and what an optimizer step holds and allocates. Nothing here allocates real memory."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# torch's autocast lists, the functions a Python-level trace sees: matmuls run in the low dtype;
# losses (and on CUDA normalisations and softmax) in float32. Autocast has no meta backend, so the
# trace casts the arguments itself.
_LOW = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
        torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm, torch.einsum, F.conv1d, F.conv2d, F.conv3d,
        F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.scaled_dot_product_attention}
_FLOAT32 = {"cpu": {F.cross_entropy, F.nll_loss, F.mse_loss, F.binary_cross_entropy_with_logits}}
_FLOAT32["cuda"] = _FLOAT32["cpu"] | {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.Tensor.softmax,
                                     torch.Tensor.log_softmax}


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) tuple, list or dict."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)


def nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


@attrs.define
class Event:
    """One point of the forward, in order: bytes first saved for backward there, the parameters
    whose gradients backward produces there, and what a checkpointed block recomputes there."""

    saved: int = 0
    params: list[torch.nn.Parameter] = attrs.Factory(list)
    recompute: int = 0
    largest: int = 0  # the largest tensor saved (or recomputed) there


@attrs.define
class ForwardTrace:
    """Records a meta forward (see :func:`trace_forward`)."""

    known: dict[int, Any]  # storages already counted (kept alive, so ids are not reused)
    checkpointed: set[int]  # ids of the modules whose activations are recomputed
    low: torch.dtype | None
    device: str
    events: list[Event] = attrs.Factory(lambda: [Event()])
    region: dict[int, Any] | None = None  # inside a checkpointed module: what it saves
    region_bytes: int = 0
    depth: int = 0
    region_largest: int = 0
    suspended: bool = False
    params: set[int] = attrs.Factory(set)  # ids of the parameters that train
    cached: dict[int, int] = attrs.Factory(dict)  # autocast's casts of parameters: bytes by parameter

    def cast(self, value: Any, dtype: torch.dtype) -> Any:
        """``value``'s floating tensors in ``dtype``, as autocast casts them. Autocast caches the
        casts of trainable parameters until it exits: they are not activations."""
        if isinstance(value, (tuple, list)):
            return type(value)(self.cast(v, dtype) for v in value)
        if isinstance(value, dict):
            return {k: self.cast(v, dtype) for k, v in value.items()}
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()
                and value.dtype not in (dtype, torch.float64)):
            return value
        cast = value.to(dtype)
        if id(value) in self.params:
            storage = cast.untyped_storage()
            self.known[id(storage)] = storage
            self.cached[id(value)] = storage.nbytes()
        return cast

    def save(self, t: torch.Tensor) -> torch.Tensor:
        if self.suspended:
            return t
        storage = t.untyped_storage()
        if id(storage) in self.known:
            return t
        size = storage.nbytes()
        if self.region is not None:  # recomputed in backward: alive only then
            if id(storage) not in self.region:
                self.region[id(storage)] = storage
                self.region_bytes += size
                self.region_largest = max(self.region_largest, size)
        else:
            self.known[id(storage)] = storage
            self.events[-1].saved += size
            self.events[-1].largest = max(self.events[-1].largest, size)
        return t

    def before(self, module: torch.nn.Module, args: Any) -> None:
        own = list(module.parameters(recurse=False))
        if own:
            self.events.append(Event(params=own))
        if id(module) in self.checkpointed:
            if self.depth == 0:
                for t in tensors(args):  # checkpoint keeps a block's inputs
                    self.save(t)
                self.region, self.region_bytes, self.region_largest = {}, 0, 0
            self.depth += 1

    def after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if id(module) in self.checkpointed:
            self.depth -= 1
            if self.depth == 0:
                self.events.append(Event(recompute=self.region_bytes, largest=self.region_largest))
                self.region = None


class TraceMode(TorchFunctionMode):
    """Casts like autocast (when ``trace.low`` is set) and saves what a fused attention kernel
    saves: meta runs attention's math path, which keeps the whole attention matrix."""

    def __init__(self, trace: ForwardTrace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func: Callable, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        low = self.trace.low
        if low is not None and (func in _LOW or func in _FLOAT32[self.trace.device]):
            dtype = low if func in _LOW else torch.float32
            args, kwargs = self.trace.cast(args, dtype), self.trace.cast(kwargs, dtype)
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.trace.suspended = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.trace.suspended = False
        if torch.is_grad_enabled():
            for t in (*tensors(args[:3]), out):  # flash attention's q, k, v, output, log-sum-exp
                self.trace.save(t)
            self.trace.events[-1].saved += out[..., 0].numel() * 4
        return out



def trace_forward(model: torch.nn.Module, run: Callable[[], torch.Tensor], *, known: dict[int, Any],
                  checkpointed: set[int], low: torch.dtype | None,
                  device: str) -> tuple[ForwardTrace, torch.Tensor]:
    """Run ``run()`` (a meta forward and loss) and record, in order, what it saves for backward;
    ``low``: the autocast dtype (None: no autocast), ``device``: whose autocast lists apply."""
    trace = ForwardTrace(known=known, checkpointed=checkpointed, low=low, device=device,
                         params={id(p) for p in model.parameters() if p.requires_grad})
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(trace.before))
        handles.append(module.register_forward_hook(trace.after))
    try:
        with torch.autograd.graph.saved_tensors_hooks(trace.save, lambda t: t), TraceMode(trace):
            loss = run()
    finally:
        for handle in handles:
            handle.remove()
    return trace, loss


class LiveBytes(TorchFunctionMode):
    """Bytes of the tensors created inside it that are still alive, and their peak; storages
    in ``known`` are not counted."""

    def __init__(self, known: dict[int, Any]) -> None:
        super().__init__()
        self.known = known
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_function__(self, func: Callable, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tensors(out):
            storage = t.untyped_storage()
            key = id(storage)
            if key not in self.known and key not in self.live:
                self.live[key] = storage.nbytes()
                self.now += self.live[key]
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def measure_optimizer(build: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
                      params: list[torch.nn.Parameter]) -> tuple[int, int]:
    """(bytes of state, peak bytes a step allocates beyond it) of the optimizer ``build(params)``
    makes over meta parameters, stepped twice: the second step is the steady one."""
    for p in params:
        p.grad = torch.empty_like(p)
    optimizer = build(params)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in tensors(dict(s))]
    known = {id(s): s for t in (*params, *(p.grad for p in params), *state)
             if t is not None for s in [t.untyped_storage()]}
    with LiveBytes(known) as live:
        optimizer.step()
    on_device = {id(t.untyped_storage()): t.untyped_storage() for t in state if t.device.type == "meta"}
    state_bytes = sum(s.nbytes() for s in on_device.values())  # (not Adam's step counts: on the host)
    for p in params:
        p.grad = None
    return state_bytes, live.peak


def on_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device) if batch.device.type != "meta" else torch.zeros_like(batch, device=device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(on_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: on_device(v, device) for k, v in batch.items()}
    return batch

def meta_copy(model: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The model again on ``meta``, its floating weights in ``dtype``; a real
    model's weights are not copied (deepcopy's memo hands it meta tensors instead)."""
    if not isinstance(model, torch.nn.Module):
        if not callable(model):
            raise TypeError(f"estimate_memory: model must be an nn.Module or a factory () -> nn.Module, "
                            f"got {type(model).__name__}")
        with torch.device("meta"):
            model = model()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"estimate_memory: the factory returned {type(model).__name__}, not an nn.Module")
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta", dtype=dtype if p.is_floating_point()
                                                          else p.dtype), p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)

def meta_batch(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return torch.empty_like(batch, device="meta")
    if isinstance(batch, (tuple, list)):
        return type(batch)(meta_batch(b) for b in batch)
    if isinstance(batch, dict):
        return {k: meta_batch(v) for k, v in batch.items()}
    return batch

def describe(batch: Any) -> str:
    shown = [f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in tensors(batch)]
    return ", ".join(shown) or repr(batch)
