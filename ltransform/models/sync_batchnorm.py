"""``sync_batchnorm``: batch norm statistics computed over the batches of every rank."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ltransform.core.compose import MISSING, Partial
from ltransform.models.order import check_order


def sync_batchnorm(model: Any = MISSING, /) -> Any:
    """Make every BatchNorm layer of ``model`` normalise with the statistics of the whole global
    batch (all ranks' parts together), not of this rank's part alone.

    Uses torch's ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (same parameters, buffers and
    ``state_dict`` keys; the layers become ``SyncBatchNorm``). With N ranks of batch B under
    ``lt.distribute``, the model then trains, running statistics included, as one process with
    batch N·B. The statistics are shared in training mode only; in eval mode each rank uses the
    running statistics, as plain BatchNorm.

    On one process (no process group, or a group of one rank) the layers run plain BatchNorm's
    forward, bit for bit, so a model converted once runs both ways. torch's ``SyncBatchNorm``
    synchronises only GPU (CUDA, XPU, HPU) tensors, and refuses CPU ones; on the CPU (gloo) the
    layers share the same sums with ``torch.distributed.all_reduce`` inside an autograd function
    instead (two all-reduces per layer forward, two in backward), the same math, with the
    statistics in float32 for float16 and bfloat16 inputs (as torch's GPU kernels).

    Args:
        model: the model to convert in place; omit it for the partial form.

    Returns:
        The model with its BatchNorm layers converted (a bare BatchNorm layer is returned as a new
        module: use the return value).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        RuntimeError: the model was already sharded, replicated (``lt.distribute``) or compiled:
            apply ``sync_batchnorm`` first (it swaps layers).

    Example:
        >>> import torch, ltransform as lt
        >>> model = lt.pipe(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4)), lt.sync_batchnorm())
        >>> type(model[1]).__name__
        'SyncBatchNorm'
        >>> model(torch.randn(8, 2)).shape  # one process: plain BatchNorm
        torch.Size([8, 4])

    Note:
        Order: ``lt.pipe(model, lt.sync_batchnorm(), lt.quantize(...) or lt.checkpoint_activations(...),
        lt.compile(...), lt.shard(...))``, then ``lt.distribute``.
    """
    if model is MISSING:
        return Partial(sync_batchnorm, "sync_batchnorm()")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sync_batchnorm: expected a torch.nn.Module, got {type(model).__name__}")
    check_order(model, "sync_batchnorm")
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in converted.modules():
        if type(module) is torch.nn.SyncBatchNorm:
            # (no state of its own: only a forward for the CPU; torch's replicate swaps classes the same way)
            module.__class__ = SyncBatchNorm
    return converted


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """torch's ``SyncBatchNorm``, which also synchronises CPU tensors (over gloo): torch's own refuses them."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.device.type != "cpu" or not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        if dist.get_world_size(self.process_group or dist.group.WORLD) == 1:
            # one rank: plain BatchNorm's forward (torch's SyncBatchNorm would refuse the CPU tensor)
            return super(torch.nn.SyncBatchNorm, self).forward(input)
        return _synchronised(self, input)


def _synchronised(layer: torch.nn.SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch norm in training mode over every rank's ``x``: the mean, then the (biased) variance around
    it, each summed over the ranks with a differentiable all-reduce (its backward sums the gradients
    of every rank's loss, as torch's ``SyncBatchNorm`` does); the running statistics as F.batch_norm
    updates them (the unbiased variance), from the same numbers on every rank.

    Computed in float32 (float64 stays float64), as torch's GPU kernels do: a float16 count or sum would
    overflow (above 65504), a bfloat16 one round; the output is cast back to the input's dtype."""
    layer._check_input_dim(x)
    layer._check_non_zero_input_channels(x)
    group = layer.process_group or dist.group.WORLD
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    dtype = torch.promote_types(x.dtype, torch.float32)
    wide = x.to(dtype)
    count = torch.full((1,), x.numel() // x.size(1), dtype=dtype, device=x.device)
    sums = _AllReduceSum.apply(torch.cat([wide.sum(dims), count]), group)
    n = sums[-1]
    mean = sums[:-1] / n
    centred = wide - mean.view(shape)
    var = _AllReduceSum.apply((centred * centred).sum(dims), group) / n
    y = centred * torch.rsqrt(var + layer.eps).view(shape)
    if layer.weight is not None:
        y = y * layer.weight.to(dtype).view(shape)
    if layer.bias is not None:
        y = y + layer.bias.to(dtype).view(shape)
    if layer.track_running_stats and layer.running_mean is not None and layer.running_var is not None:
        with torch.no_grad():
            factor: float | torch.Tensor = layer.momentum if layer.momentum is not None else 0.0
            tracked = layer.num_batches_tracked
            if tracked is not None:
                tracked.add_(1)
                if layer.momentum is None:  # a cumulative average (a tensor factor: no host sync)
                    factor = 1.0 / tracked.double()
            running_mean, running_var = layer.running_mean, layer.running_var
            running_mean.copy_(running_mean.to(dtype) * (1 - factor) + mean * factor)
            running_var.copy_(running_var.to(dtype) * (1 - factor) + var * (n / (n - 1)) * factor)
    return y.to(x.dtype)


class _AllReduceSum(torch.autograd.Function):
    """A sum over the ranks whose gradient is the sum of every rank's gradient (each rank's loss depends on
    every rank's input). (``torch.distributed.nn.functional.all_reduce`` does this, deprecated in torch 2.13 for a
    private module; this is the public ``all_reduce`` on both sides.)"""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        summed = tensor.clone()
        dist.all_reduce(summed, group=group)
        return summed

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        summed = grad.contiguous().clone()
        dist.all_reduce(summed, group=ctx.group)
        return summed, None
