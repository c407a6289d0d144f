"""What the machine is: torch, CUDA, the driver, the GPU, and the versions of the optional packages."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
import sys
from typing import Any

# distribution names (read from metadata: nothing is imported)
PACKAGES = ("torch", "ltransform", "bitsandbytes", "torchao", "transformer_engine", "lightning", "pytorch-lightning",
            "transformers", "accelerate", "triton", "numpy", "safetensors", "attrs", "einops", "tqdm", "zlib-ng")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _nvidia_smi() -> dict[str, Any]:
    if shutil.which("nvidia-smi") is None:
        return {"nvidia_smi": None}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"nvidia_smi": f"failed: {error}"}
    rows = [line.split(", ") for line in out.stdout.strip().splitlines()]
    return {"nvidia_smi": out.stdout.strip() or out.stderr.strip()[:500],
            "driver": rows[0][1] if rows and len(rows[0]) > 1 else None}


def _nccl() -> str | None:
    import torch

    try:
        version = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001  (a torch built without NCCL)
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def collect(device: str) -> dict[str, Any]:
    """The environment, each part guarded: a broken CUDA install is recorded, not raised."""
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
                            "cudnn": None, "device": device, "packages": versions()}
    try:
        info["cuda_available"] = torch.cuda.is_available()
        if info["cuda_available"]:
            index = (torch.device(device).index or 0) if device.startswith("cuda") else 0
            props = torch.cuda.get_device_properties(index)
            info.update(gpu=torch.cuda.get_device_name(index), capability=list(torch.cuda.get_device_capability(index)),
                        gpu_memory_bytes=int(props.total_memory), gpu_count=torch.cuda.device_count(),
                        multiprocessors=getattr(props, "multi_processor_count", None),
                        bf16_supported=torch.cuda.is_bf16_supported(),
                        nccl=_nccl())
            info["cudnn"] = torch.backends.cudnn.version()
            info.update(_nvidia_smi())
    except Exception as error:  # noqa: BLE001  (recorded: the checks will show what it breaks)
        info["cuda_error"] = f"{type(error).__name__}: {error}"
    return info
