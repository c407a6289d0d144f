"""Peak matmul throughput of known accelerators, for ``lt.throughput``'s MFU.

Dense figures (without structured sparsity), in TFLOP/s per device, from the vendors' datasheets:
NVIDIA prints the sparse figure with an asterisk for TF32, BF16, FP16 and FP8 tensor cores; the
dense one is half of it. TPUs: Google's figure per chip, bf16 (their MXUs multiply in bf16; fp32
and fp8 have no published peak, so none is known here).
"""

from __future__ import annotations

import re

import torch

DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")

# name -> {dtype: TFLOP/s}; the comment gives the source
PEAKS: dict[str, dict[str, float]] = {
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): H100 SXM 67 FP32, 989 TF32*,
    # 1,979 BF16*/FP16*, 3,958 FP8*; H100 NVL 60, 835*, 1,671*, 3,341*; H100 PCIe (the first
    # H100 datasheet, 2022) 51, 756*, 1,513*, 3,026*  (* with sparsity: dense is half)
    "H100 SXM": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5, "fp8": 1979.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5, "fp8": 1513.0},
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): H200 SXM as H100 SXM; H200 NVL as
    # H100 NVL. GH200 datasheet: its GPU has H100 SXM's figures.
    "H200 SXM": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5, "fp8": 1979.0},
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5},
    "GH200": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5, "fp8": 1979.0},
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): the same for SXM and PCIe, 40 and
    # 80 GB: 19.5 FP32, 156 TF32, 312 BF16/FP16 (dense figures printed as such); no FP8
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    # NVIDIA L4 datasheet (nvidia.com/en-us/data-center/l4): 30.3 FP32, 120 TF32*, 242 BF16*/FP16*,
    # 485 FP8*
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.5},
    # Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e):
    # peak bf16 compute per chip 275 (v4), 197 (v5e), 459 (v5p), 918 (v6e)
    "TPU v4": {"bf16": 275.0},
    "TPU v5e": {"bf16": 197.0},
    "TPU v5p": {"bf16": 459.0},
    "TPU v6e": {"bf16": 918.0},
}

# how TPUs are spelled: torch_xla's accelerator type ("v5litepod-8"), JAX's device kind ("TPU v5 lite")
_TPU_ALIASES = {"v4": "TPU v4", "v5e": "TPU v5e", "v5lite": "TPU v5e", "v5litepod": "TPU v5e",
                "v5p": "TPU v5p", "v5": "TPU v5p", "v6e": "TPU v6e", "v6lite": "TPU v6e"}


def device_model(name: str) -> str | None:
    """The :data:`PEAKS` entry a device name stands for (None if unknown).

    CUDA names as ``torch.cuda.get_device_name`` gives them (``"NVIDIA H100 80GB HBM3"`` is the SXM
    card, ``"NVIDIA A100-SXM4-80GB"``), TPUs as torch_xla's accelerator type (``"v5litepod-8"``) or
    JAX's device kind (``"TPU v5 lite"``).
    """
    low = name.lower()
    tpu = re.sub(r"[\s_]", "", low).removeprefix("tpu").split("-")[0]
    if tpu in _TPU_ALIASES:
        return _TPU_ALIASES[tpu]
    if "gh200" in low:
        return "GH200"
    for chip in ("h200", "h100"):
        if chip in low:
            kind = "NVL" if "nvl" in low else "PCIe" if "pcie" in low and chip == "h100" else "SXM"
            return f"{chip.upper()} {kind}"
    if "a100" in low:
        return "A100"
    if re.search(r"\bl4\b", low):  # not L40 / L40S
        return "L4"
    return None


def peak_tflops(device: str, dtype: str) -> float | None:
    """Peak dense matmul TFLOP/s of one ``device`` (a name) in ``dtype``; None if not known.

    Args:
        device: a device name (``"NVIDIA H100 PCIe"``, ``"NVIDIA L4"``, ``"v5p-8"``, ``"TPU v4"``).
        dtype: ``"fp32"``, ``"tf32"``, ``"bf16"``, ``"fp16"`` or ``"fp8"``.

    Raises:
        ValueError: an unknown ``dtype``.

    Example:
        >>> from ltransform.runner.hooks.peaks import peak_tflops
        >>> peak_tflops("NVIDIA H100 80GB HBM3", "bf16"), peak_tflops("NVIDIA A100-SXM4-80GB", "fp8")
        (989.5, None)
    """
    if dtype not in DTYPES:
        raise ValueError(f"peak_tflops: unknown dtype {dtype!r}; expected one of: {', '.join(map(repr, DTYPES))}")
    model = device_model(device)
    return None if model is None else PEAKS[model].get(dtype)


def matmul_dtype(precision: str | None) -> str | None:
    """The dtype the matmuls of a run in ``precision`` (an ``lt.with_precision`` name, None for
    none) run in: ``fp8`` for the fp8 precisions, the autocast or parameter dtype otherwise, fp32
    as ``tf32`` where torch lets fp32 matmuls use TF32 (``torch.set_float32_matmul_precision``);
    None for float64."""
    from ltransform.core.precisions import resolve_precision

    record = resolve_precision(precision or "32-true", "lt.throughput")
    if record.fp8 is not None:
        return "fp8"
    dtype = record.autocast_dtype or record.param_dtype
    if dtype == torch.float32:
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
