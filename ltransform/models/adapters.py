"""``add_adapters``: small trainable low-rank adapters (LoRA) on a frozen model's linear layers."""

from __future__ import annotations

import math
from typing import Any

import torch

from ltransform.core.compose import MISSING, Partial
from ltransform.models.select import selector


class LowRank(torch.nn.Module):
    """``scale * B(A(dropout(x)))`` with ``A: in -> rank`` (Kaiming-uniform) and ``B: rank -> out``
    (zeros), so a fresh adapter changes nothing."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.empty(rank, in_features))
        self.b = torch.nn.Parameter(torch.zeros(out_features, rank))
        torch.nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.a.dtype)
        return (x @ self.a.t() @ self.b.t()) * self.scale


def _add_output(layer: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    # (torch's stubs type a submodule attribute Tensor | Module, so it is not known callable)
    return output + layer.adapter(inputs[0]).to(output.dtype)  # type: ignore[operator]


def add_adapters(model: Any = MISSING, /, rank: Any = MISSING, *, alpha: float | None = None,
                 dropout: float = 0.0, targets: Any = None) -> Any:
    """Freeze ``model`` and give each targeted linear layer a trainable low-rank adapter (LoRA).

    Each adapter is a child module ``adapter`` of its layer (parameters ``<layer>.adapter.a`` /
    ``.b``), added to the layer's output by a forward hook: the layer itself, its parameter
    names and its checkpoints are unchanged. Works on ``nn.Linear``, on bitsandbytes' quantized
    layers and on torchao's NF4 layers (``lt.quantize(..., backend="torchao")``, which ``lt.shard``
    can shard): a frozen 4-bit base with adapters in float32, or in the base's dtype where that is
    a float (a bf16 NF4 base: bf16 adapters) — QLoRA.

    Args:
        model: the module; omit it for the partial form.
        rank: the adapters' rank.
        alpha: the scale numerator (``alpha / rank``); default ``rank`` (scale 1).
        dropout: dropout on the adapters' input.
        targets: which layers: names/glob patterns (``{"*.attn.*"}``) or a predicate
            ``(name, module) -> bool``; default every linear layer.

    Returns:
        The same module; only adapter parameters require grad. Save just them with
        ``lt.save(path, state, filter=lambda name, t: ".adapter." in name)`` and load with
        ``strict=False`` into the same base with adapters added.

    Example:
        >>> import torch, ltransform as lt
        >>> model = lt.add_adapters(torch.nn.Sequential(torch.nn.Linear(8, 8)), rank=2)
        >>> [n for n, p in model.named_parameters() if p.requires_grad]
        ['0.adapter.a', '0.adapter.b']
    """
    if rank is MISSING and not isinstance(model, torch.nn.Module) and model is not MISSING:
        model, rank = MISSING, model
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"add_adapters: rank must be a positive int, got {rank!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"add_adapters: dropout must be in [0, 1), got {dropout!r}")
    chosen = selector(targets, call="add_adapters", option="targets", default=True)
    if model is MISSING:
        return Partial(lambda m: add_adapters(m, rank, alpha=alpha, dropout=dropout, targets=targets),
                       f"add_adapters(rank={rank})")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"add_adapters: expected a torch.nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if _linear(m) and chosen(n, m)]
    if not layers:
        raise ValueError(f"add_adapters: targets {targets!r} match no linear layer of {type(model).__name__}")
    if any(isinstance(m, LowRank) for m in model.modules()):
        raise RuntimeError("add_adapters: the model already has adapters; add them once")
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in layers:
        weight = layer.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32  # quantized: float adapters
        layer.adapter = LowRank(layer.in_features, layer.out_features, rank, float(alpha or rank), dropout).to(
            device=weight.device, dtype=dtype)
        layer.register_forward_hook(_add_output)
    return model


def _linear(module: torch.nn.Module) -> bool:
    """``nn.Linear`` or a layer standing in for one (bitsandbytes' quantized linears, ``NF4Linear``)."""
    return isinstance(module, torch.nn.Linear) or (
        hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight"))
