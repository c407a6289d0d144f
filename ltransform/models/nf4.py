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
        ImportError: torchao is not installed (names the pip command).
    """
    to_nf4 = _torchao().to_nf4
    with torch.no_grad():
        packed = to_nf4(weight.detach().contiguous(), block_size=BLOCK, scaler_block_size=SCALER_BLOCK)
    return NF4Linear(packed, bias, compute_dtype)


def check_sizes(targets: list[tuple[str, torch.nn.Linear]]) -> None:
    """Raise, naming the layers, if any weight is not whole NF4 blocks: before any layer is
    replaced, so that a refused model is left as it was."""
    whole = BLOCK * SCALER_BLOCK
    bad = [(name, linear.weight.shape) for name, linear in targets if linear.weight.numel() % whole]
    if bad:
        shape = "x".join(map(str, bad[0][1]))
        raise ValueError(f"quantize(backend='torchao'): torchao's NF4 needs weights of a multiple of {whole} "
                         f"elements (blocks of {BLOCK}, scalers in blocks of {SCALER_BLOCK}); {bad[0][0]!r} is {shape}"
                         f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}: keep them unquantized, "
                         f"skip={ {name for name, _ in bad}!r}, or use backend='bitsandbytes'")


def _torchao() -> Any:
    try:
        from torchao.dtypes import nf4tensor
    except ImportError as error:
        raise ImportError("quantize(backend='torchao') needs torchao: pip install torchao") from error
    return nf4tensor
