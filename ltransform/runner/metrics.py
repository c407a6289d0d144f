"""Metrics: tensors until a log point, then floats in one host sync, averaged across ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ltransform.distributed import env


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metrics as Python floats, with one host sync for all tensor metrics on a device."""
    names = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    values = {k: float(v) for k, v in metrics.items() if k not in names}
    if names:
        tensors = [metrics[k].detach().float().mean() for k in names]
        if len({t.device for t in tensors}) == 1:
            values.update(zip(names, torch.stack(tensors).tolist()))
        else:
            values.update((k, t.item()) for k, t in zip(names, tensors))
    return {k: values[k] for k in metrics}


def mean_across_ranks(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metrics (tensors or numbers) as floats averaged over every rank: one collective and one
    host sync for all of them together."""
    if not metrics:
        return {}
    device = env.collective_device()
    stacked = torch.stack([
        v.detach().float().mean().to(device, torch.float64) if isinstance(v, torch.Tensor)
        else torch.tensor(float(v), dtype=torch.float64, device=device)
        for v in metrics.values()
    ])
    return dict(zip(metrics, env.all_reduce(stacked).tolist()))
