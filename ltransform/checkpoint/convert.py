"""Conversions: a sharded checkpoint to one file (``ltransform consolidate``), and model weights
to and from safetensors."""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch

from ltransform import io
from ltransform.checkpoint import contents, sharded
from ltransform.checkpoint.read import check_keys, dcp_errors, read_full, read_sharded_common, write_full


def consolidate(sharded_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Turn a sharded checkpoint directory into one full checkpoint file (or, if ``out`` ends
    in ``.safetensors``, the model weights alone), in one process with no process group.

    Example:
        >>> import tempfile, torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> root = tempfile.mkdtemp()
        >>> _ = lt.save(root + "/sharded", lt.State(model=model), sharded=True)
        >>> path = lt.consolidate(root + "/sharded", root + "/full.pt")
        >>> torch.equal(lt.load(path, lt.State(model=torch.nn.Linear(2, 1))).model.weight, model.weight)
        True
    """
    source = Path(sharded_dir)
    if not (source / "common.pt").is_file():
        raise io.CheckpointNotFoundError(f"consolidate: {str(source)!r} is not a complete sharded ltransform "
                                         f"checkpoint (no common.pt)")
    common = read_sharded_common(source)
    tensors: dict[str, Any] = {}
    with dcp_errors(source):
        sharded.load_tensors(tensors, source, rebuild=True)
    out = Path(out)
    if out.suffix == ".safetensors":
        if len(tensors["models"]) != 1:
            raise ValueError(f"consolidate: the checkpoint has models {sorted(tensors['models'])}; a "
                             f"safetensors file holds one: export each with lt.export_safetensors")
        return io.write_safetensors(next(iter(tensors["models"].values())), out)
    ranks = [io.read_file(p) for p in sorted(source.glob("rank-*.pt"), key=_rank_number)]
    meta = {**common["meta"], "sharded": False}
    extra = {**common["extra"], **{k: {"stateful": v} for k, v in tensors.get("extras", {}).items()}}  # (gathered)
    return write_full(out, {**common, "meta": {**meta, "version": contents.VERSION}, "extra": extra,
                            "models": tensors["models"],
                            "optimizers": tensors.get("optimizers", {}), "ranks": ranks})


def _rank_number(path: Path) -> int:
    return int(path.stem.removeprefix("rank-"))


def export_safetensors(source: Any, out: str | os.PathLike[str], *, model: str = "model") -> Path:
    """Write model weights as a safetensors file.

    Args:
        source: a module, or the path of an ltransform checkpoint (file or sharded directory).
        out: the ``.safetensors`` file to write.
        model: which model of a checkpoint (its field name in the state).
    """
    weights: Any  # names to tensors: torch's or a checkpoint's state dict of the model
    if isinstance(source, torch.nn.Module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(source, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        path = Path(source)
        if path.is_dir():
            read_sharded_common(path)
            tensors: dict[str, Any] = {}
            with dcp_errors(path):
                sharded.load_tensors(tensors, path, rebuild=True)
            models = tensors["models"]
        else:
            models = read_full(path)["models"]
        if model not in models:
            raise io.CheckpointKeyError(f"export_safetensors: no model {model!r} in {str(path)!r}; it has "
                                        f"{sorted(models)}")
        weights = models[model]
    return io.write_safetensors(weights, Path(out))


def load_raw(path: str | os.PathLike[str], target: Any, *, strict: bool = True) -> Any:
    """Load a file written by plain PyTorch (``torch.save(model.state_dict())``, an optimizer's
    state dict, or a safetensors file) into a module or optimizer; returns ``target``.

    Example:
        >>> import tempfile, torch, ltransform as lt
        >>> path = tempfile.mkdtemp() + "/weights.pt"
        >>> torch.save(torch.nn.Linear(2, 1).state_dict(), path)
        >>> _ = lt.load_raw(path, torch.nn.Linear(2, 1))
    """
    path = Path(path)
    sd: Any
    if path.suffix == ".safetensors":
        sd = io.read_safetensors(path)
    else:
        sd = io.read_file(path)
    if isinstance(sd, Mapping) and isinstance(sd.get("meta"), Mapping) and sd["meta"].get("format") == contents.FORMAT:
        raise ValueError(f"lt.load_raw: {str(path)!r} is an ltransform checkpoint; use lt.load(path, state)")
    if isinstance(target, torch.nn.Module):
        if strict:
            check_keys(path, type(target).__name__, set(target.state_dict()), set(sd))
        target.load_state_dict(sd, strict=strict)
    elif isinstance(target, torch.optim.Optimizer):
        target.load_state_dict(sd)
    else:
        raise TypeError(f"lt.load_raw: target must be a torch.nn.Module or an optimizer, got {type(target).__name__}")
    return target
