"""``ltransform inspect CKPT``: what a checkpoint holds, read without loading its tensor data."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ltransform import io
from ltransform.checkpoint import contents, sharded


def describe(path: str | os.PathLike[str]) -> str:
    """A report of the checkpoint ``path`` (a full file or a sharded directory): its format, the
    ltransform and torch that wrote it, world size, precision, counters, and every tensor's name,
    shape, dtype and size, with the total. A full file is mapped, not read (its pages are not
    touched); of a sharded one only the metadata and ``common.pt`` are read. Nothing is checked
    against checksums (``lt.load`` does that).

    Raises:
        CheckpointError: the path is not an ltransform checkpoint, or cannot be read.

    Example:
        >>> import tempfile, torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> path = lt.save(tempfile.mkdtemp() + "/c.pt", lt.State(model=model, optimizer=None))
        >>> print(lt.describe_checkpoint(path).splitlines()[-3:])  # doctest: +NORMALIZE_WHITESPACE
        ['  models.model.bias  [1]  torch.float32  4 B',
         '  models.model.weight  [1, 2]  torch.float32  8 B', 'total: 2 tensors, 12 B']
    """
    path = Path(path)
    if io.not_regular(path) == "missing" and not path.is_dir():
        raise io.CheckpointNotFoundError(f"ltransform inspect: {str(path)!r} does not exist")
    if path.is_dir():
        common = io.read_file(sharded.member(path, "common.pt"))
        contents.check_metadata(common.get("meta") if isinstance(common, Mapping) else None, repr(str(path)))
        stored = sharded.reader(path).read_metadata().state_dict_metadata
        tensors = [(name, tuple(entry.size), entry.properties.dtype) for name, entry in stored.items()
                   if hasattr(entry, "properties")]
        files = [p for p in path.iterdir() if p.is_file()]
        kind = f"sharded directory, {len(files)} files, {_size(sum(p.stat().st_size for p in files))}"
    else:
        common = io.read_file(path)  # mapped: the tensors' pages are not read
        contents.check_metadata(common.get("meta") if isinstance(common, Mapping) else None, repr(str(path)))
        tensors = [(name, tuple(t.shape), t.dtype) for name, t in _tensors(common, "")]
        kind = f"full file, {_size(path.stat().st_size)}"
    meta, counters = common["meta"], common.get("counters", {})
    lines = [f"checkpoint: {path} ({kind})",
             (f"format: ltransform checkpoint version {meta.get('version', 1)}, written by ltransform "
              f"{meta.get('ltransform', '?')} with torch {meta.get('torch', '?')} at {meta.get('time', '?')}"),
             (f"world size {meta.get('world_size', '?')}, precision {meta.get('precision') or 'not recorded'}, "
              f"step {counters.get('step', '?')}, micro-step {counters.get('micro_step', '?')}, "
              f"epoch {counters.get('epoch', '?')}"),
             f"tensors ({len(tensors)}):"]
    total = 0
    for name, shape, dtype in sorted(tensors):
        size = math.prod(shape) * (dtype.itemsize if isinstance(dtype, torch.dtype) else 0)
        total += size
        lines.append(f"  {name}  {list(shape)}  {dtype}  {_size(size)}")
    lines.append(f"total: {len(tensors)} tensors, {_size(total)}")
    return "\n".join(lines)


def _tensors(tree: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a full checkpoint's models and optimizers, by dotted path."""
    if prefix == "":
        for part in ("models", "optimizers"):
            yield from _tensors(tree.get(part, {}), part)
        return
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}.{key}")
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _tensors(value, f"{prefix}.{index}")


def _size(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"
