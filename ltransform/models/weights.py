"""Reading a model's weights one tensor at a time, from a file or a state dict.

Used where a model built on the meta device is filled in place layer by layer (``quantize``
with ``weights=``), so the full-precision model never exists in memory at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from ltransform import io


class Weights(Protocol):
    def keys(self) -> Any: ...

    def get(self, key: str) -> torch.Tensor | None: ...


class _SafetensorsFile:
    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._keys = set(handle.keys())

    def keys(self) -> set[str]:
        return self._keys

    def get(self, key: str) -> torch.Tensor | None:
        return self._handle.get_tensor(key) if key in self._keys else None  # reads this tensor only


@contextlib.contextmanager
def open_weights(source: Any, *, call: str) -> Iterator[Weights]:
    """``source`` (a ``.safetensors`` path, a ``torch.save``-d state dict's path, or a mapping of
    names to tensors) as something to read tensors from by name, lazily: a safetensors file is
    read one tensor at a time, a torch file is memory-mapped."""
    if isinstance(source, Mapping):
        yield source
        return
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{call}: weights must be a path (.safetensors or a torch.save-d state dict) "
                        f"or a mapping of names to tensors, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{call}: weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        with io.open_safetensors(path) as handle:
            yield _SafetensorsFile(handle)
        return
    loaded = io.read_file(path)
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{call}: {str(path)!r} is not a state dict (a mapping of names to tensors); "
                         f"for an lt.save checkpoint, lt.load it into the built model instead")
    yield loaded


def aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """Every name of each parameter, keyed by each of its names: a tied weight (an output layer
    sharing the embedding's) is often stored once, under one of its names."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {name: group for group in names.values() for name in group}


def read(weights: Weights, name: str, tied: dict[str, list[str]]) -> torch.Tensor | None:
    """The tensor stored for ``name``, or for another name of the same (tied) parameter."""
    for candidate in tied.get(name, [name]):
        tensor = weights.get(candidate)
        if tensor is not None:
            return tensor
    return None


def fill(model: torch.nn.Module, weights: Weights, *, device: torch.device | None, call: str,
         done: AbstractSet[str] = frozenset()) -> None:
    """Give every parameter and buffer of ``model`` (except the names in ``done``) its stored
    tensor, in its own dtype, on ``device`` (default: where it is, or ``lt.device()`` for one on
    meta), one tensor at a time. Ties between parameters are kept.

    Raises:
        KeyError: tensors missing from ``weights``, all named at once.
        ValueError: a stored tensor of the wrong shape.
    """
    tied = aliases(model)
    missing: list[str] = []
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in done or id(param) in seen:
            continue
        seen.add(id(param))
        tensor = read(weights, name, tied)
        if tensor is None:
            missing.append(name)
            continue
        fresh = torch.nn.Parameter(placed(tensor, param, name, device, call), requires_grad=param.requires_grad)
        for alias in tied[name]:
            _set(model, alias, fresh, parameter=True)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if name in done:
            continue
        tensor = weights.get(name)
        if tensor is None:
            if buffer.is_meta or _persistent(model, name):
                missing.append(name)
            continue
        _set(model, name, placed(tensor, buffer, name, device, call), parameter=False)
    check_missing(missing, call)


def check_missing(missing: list[str], call: str) -> None:
    """KeyError naming the tensors the weights lack, if any."""
    if missing:
        raise KeyError(f"{call}: the weights have no tensor for {', '.join(map(repr, missing[:8]))}"
                       f"{f' (and {len(missing) - 8} more)' if len(missing) > 8 else ''}; the model's "
                       f"names and the file's must match (compare model.state_dict().keys())")


def placed(tensor: torch.Tensor, like: torch.Tensor, name: str, device: torch.device | None,
           call: str) -> torch.Tensor:
    """``tensor`` in ``like``'s dtype on the target device, never sharing the source's memory (a
    memory-mapped file, or the caller's own state dict)."""
    if tensor.shape != like.shape:
        raise ValueError(f"{call}: {name!r} is stored with shape {tuple(tensor.shape)}, but the model's "
                         f"is {tuple(like.shape)}")
    if device is None:
        if like.is_meta:
            from ltransform.distributed.env import device as this_device

            device = this_device()
        else:
            device = like.device
    moved = tensor.to(device=device, dtype=like.dtype if like.is_floating_point() else tensor.dtype)
    return moved.clone() if moved.data_ptr() == tensor.data_ptr() else moved


def _set(model: torch.nn.Module, name: str, value: torch.Tensor, *, parameter: bool) -> None:
    owner, attribute = _owner(model, name)
    if parameter:
        owner.register_parameter(attribute, cast(torch.nn.Parameter, value))  # (fill passes its Parameter)
    else:
        owner.register_buffer(attribute, value, persistent=_persistent(model, name))


def _persistent(model: torch.nn.Module, name: str) -> bool:
    owner, attribute = _owner(model, name)
    return attribute not in owner._non_persistent_buffers_set  # no public accessor in torch


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    owner_name, _, attribute = name.rpartition(".")
    return model.get_submodule(owner_name), attribute  # get_submodule("") is the model itself


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc's ``malloc_trim``). Quantizing layer after
    layer on the CPU frees a few layer-sized temporaries each time, which glibc keeps in the
    heap instead of unmapping; without this the process's memory grows by a full-precision
    layer or more per layer, as if the whole model had been loaded."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None
