"""The meta-device traces behind ``lt.estimate_memory``: what a forward saves for backward, in
order, and what an optimizer step holds and allocates. Nothing here allocates real memory."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ltransform.models.memory_inputs import map_tensors, tensors

# torch's autocast lists, the functions a Python-level trace sees: matmuls run in the low dtype;
# losses (and on CUDA normalisations and softmax) in float32. Autocast has no meta backend, so the
# trace casts the arguments itself.
_LOW = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
        torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm, torch.einsum, F.conv1d, F.conv2d, F.conv3d,
        F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.scaled_dot_product_attention}
_FLOAT32 = {"cpu": {F.cross_entropy, F.nll_loss, F.mse_loss, F.binary_cross_entropy_with_logits}}
_FLOAT32["cuda"] = _FLOAT32["cpu"] | {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.Tensor.softmax,
                                     torch.Tensor.log_softmax}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


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
    rehook: set[int] = attrs.Factory(set)  # ids of the modules torch's checkpoint was applied to
    inner: list[Any] = attrs.Factory(list)  # the saved-tensor hooks pushed inside those
    cached: dict[int, int] = attrs.Factory(dict)  # autocast's casts of parameters: bytes by parameter

    def cast(self, value: Any, dtype: torch.dtype) -> Any:
        """``value``'s floating tensors in ``dtype``, as autocast casts them. Autocast caches the
        casts of trainable parameters until it exits: they are not activations."""
        def one(t: torch.Tensor) -> torch.Tensor:
            if not t.is_floating_point() or t.dtype in (dtype, torch.float64):
                return t
            cast = t.to(dtype)
            if id(t) in self.params:
                storage = cast.untyped_storage()
                self.known[id(storage)] = storage
                self.cached[id(t)] = storage.nbytes()
            return cast

        return map_tensors(one, value)

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
        if id(module) in self.rehook:  # torch's checkpoint pushed its hooks, which hide the saves: ours go above
            self.inner.append(torch.autograd.graph.saved_tensors_hooks(self.save, _unpack))
            self.inner[-1].__enter__()

    def after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if id(module) in self.rehook:
            self.inner.pop().__exit__(None, None, None)
        if id(module) in self.checkpointed:
            self.depth -= 1
            if self.depth == 0:
                self.events.append(Event(recompute=self.region_bytes, largest=self.region_largest))
                self.region = None


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


class TraceMode(TorchFunctionMode):
    """Casts like autocast (when ``trace.low`` is set) and, where torch runs attention as a fused
    kernel, saves what that kernel saves: meta runs attention's math path, which keeps the whole
    attention matrix (as the CPU does where its fused kernel does not apply)."""

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
        given = {**dict(zip(_SDPA_ARGS, args)), **kwargs}
        if not (torch.is_grad_enabled() and fused_attention(self.trace.device, given)):
            return func(*args, **kwargs)  # nothing kept, or the math path's own saves, traced as they are
        self.trace.suspended = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.trace.suspended = False
        q, mask = given["query"], given.get("attn_mask")
        lse = torch.empty(out.shape[:-1], dtype=torch.float32, device="meta")
        for t in (q, given["key"], given["value"], out, lse):  # what flash attention keeps
            self.trace.save(t)
        if isinstance(mask, torch.Tensor):  # and the mask, a boolean one as q's dtype
            self.trace.save(mask if mask.is_floating_point() else torch.empty_like(mask, dtype=q.dtype))
        return out


def fused_attention(device: str, given: dict[str, Any]) -> bool:
    """Whether torch runs ``scaled_dot_product_attention(**given)`` as a fused kernel. On CUDA,
    flash or memory-efficient attention takes dropout and masks; the CPU's flash kernel takes
    neither dropout nor some shapes, dtypes, strides and masks (torch's ``sdp_utils_cpp``),
    and the math path runs instead."""
    if device != "cpu":
        return True
    q, k, v, mask = given["query"], given["key"], given["value"], given.get("attn_mask")
    qkv = (q, k, v)
    if given.get("dropout_p", 0.0) > 0 or not torch.backends.cuda.flash_sdp_enabled() or q.dtype not in _FLASH_DTYPES:
        return False
    if any(t.dim() != 4 or t.dtype != q.dtype or t.size(-2) == 0 or t.stride(-1) != 1 for t in qkv):
        return False
    if len({t.size(0) for t in qkv}) > 1 or len({t.size(-1) for t in qkv}) > 1 or k.size(1) != v.size(1):
        return False
    if q.size(1) != k.size(1) and not (given.get("enable_gqa") and q.size(1) % k.size(1) == 0):
        return False
    if mask is None:
        return True
    batched = mask.dim() == 4 and mask.size(0) in (1, q.size(0)) and mask.size(1) in (1, q.size(1))
    return (not mask.requires_grad and mask.stride(-1) == 1 and mask.size(-2) in (1, q.size(2))
            and mask.size(-1) in (1, k.size(2)) and (mask.dim() == 2 or batched))


def trace_forward(model: torch.nn.Module, run: Callable[[], torch.Tensor], *, known: dict[int, Any],
                  checkpointed: set[int], rehook: set[int], low: torch.dtype | None,
                  device: str) -> tuple[ForwardTrace, torch.Tensor]:
    """Run ``run()`` (a meta forward and loss) and record, in order, what it saves for backward;
    ``low``: the autocast dtype (None: no autocast), ``device``: whose autocast lists apply;
    ``rehook``: the modules torch's checkpoint was applied to. Compiled code runs eagerly, and
    tensors the forward creates without a device are created on ``meta``."""
    trace = ForwardTrace(known=known, checkpointed=checkpointed, low=low, device=device, rehook=rehook,
                         params={id(p) for p in model.parameters() if p.requires_grad})
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(trace.before))
        # first of the forward hooks: it pops its hooks before torch's checkpoint pops its own
        handles.append(module.register_forward_hook(trace.after, prepend=True, always_call=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(trace.save, _unpack), TraceMode(trace), \
                torch.compiler.set_stance("force_eager"), torch.device("meta"):
            loss = run()
    finally:
        for handle in handles:
            handle.remove()
        while trace.inner:
            trace.inner.pop().__exit__(None, None, None)
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
