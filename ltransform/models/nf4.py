"""``quantize(..., backend="torchao")``: ``nn.Linear`` layers with torchao's 4-bit ``NF4Tensor`` weights.

torchao's ``NF4Tensor`` implements FSDP2's all-gather hooks (``fsdp_pre_all_gather`` /
``fsdp_post_all_gather``), so ``lt.shard`` shards the packed 4-bit data and all-gathers it in
4 bits: QLoRA across ranks. bitsandbytes' parameters lose their quantization state there.
torchao is imported only when a layer is built or run, never by ``import ltransform``.
"""

from __future__ import annotations

from typing import Any

import torch

MODES = ("nf4", "nf4-dq")  # torchao's NF4 always quantizes the scalers too: both modes are the same
BLOCK, SCALER_BLOCK = 64, 256  # torchao's defaults (to_nf4), as in torchtune's QLoRA


class NF4Linear(torch.nn.Module):
    """A linear layer whose frozen weight is a torchao ``NF4Tensor`` (4-bit NormalFloat, blockwise
    scales, double-quantized scalers); the forward dequantizes it to ``compute_dtype``
    (torchao's ``linear_nf4``).

    Args:
        weight: the ``NF4Tensor`` (``torchao.dtypes.to_nf4`` of a 2-D weight).
        bias: the bias, kept as it was (None: no bias).
        compute_dtype: the dtype the matrix product runs in; None: the weight's dtype (its original
            dtype, or the one ``to_precision`` / ``module.to`` gave it later).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.nn.Parameter | None,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.dtypes.nf4tensor import linear_nf4

        out = linear_nf4(x.to(self.compute_dtype or self.weight.dtype), self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}")


def nf4_layer(weight: torch.Tensor, bias: torch.nn.Parameter | None,
              compute_dtype: torch.dtype | None) -> NF4Linear:
    """The :class:`NF4Linear` standing in for a linear layer of this weight and bias.

    Args:
        weight: the full-precision 2-D weight (not kept: only its 4-bit copy is).
        bias: the bias, kept as it is.
        compute_dtype: as for :class:`NF4Linear`.

    Returns:
        The new layer, on the weight's device.

    Raises:
        ValueError: the weight's size is not a multiple of torchao's block sizes.
        ImportError: torchao is not installed (names the pip command).
    """
    to_nf4 = _torchao().to_nf4
    out_features, in_features = weight.shape
    if weight.numel() % (BLOCK * SCALER_BLOCK) != 0:
        raise ValueError(f"quantize(backend='torchao'): a {out_features}x{in_features} weight cannot be quantized: "
                         f"torchao's NF4 needs a number of elements that is a multiple of {BLOCK * SCALER_BLOCK} "
                         f"(blocks of {BLOCK}, scalers in blocks of {SCALER_BLOCK}); skip the layer "
                         f"(skip={{name}}) or use backend='bitsandbytes'")
    with torch.no_grad():
        packed = to_nf4(weight.detach().contiguous(), block_size=BLOCK, scaler_block_size=SCALER_BLOCK)
    return NF4Linear(packed, bias, compute_dtype)


def is_nf4(tensor: Any) -> bool:
    """A torchao ``NF4Tensor`` (checked without importing torchao)."""
    return any(c.__name__ == "NF4Tensor" and c.__module__.startswith("torchao") for c in type(tensor).__mro__)


def has_nf4(module: torch.nn.Module) -> bool:
    """``module`` holds :class:`NF4Linear` layers."""
    return any(isinstance(m, NF4Linear) for m in module.modules())


def _torchao() -> Any:
    try:
        from torchao.dtypes import nf4tensor
    except ImportError as error:
        raise ImportError("quantize(backend='torchao') needs torchao: pip install torchao") from error
    return nf4tensor
