"""Sharded checkpoints: a ``torch.distributed.checkpoint`` (DCP) directory, each rank writing its
own shards; loadable on any number of ranks (resharding), or one process with no group.

Layout of ``DIR``: DCP's ``.metadata`` and ``*.distcp`` (models and optimizers), ``common.pt``
(counters, schedulers, extras, metadata; rank 0), ``rank-R.pt`` (each rank's RNG states and
data position) and ``manifest.pt`` (every other file's size and CRC-32, checked before a load
reads anything; format 1 checkpoints have none and load unchecked). It is written as
``.DIR.partial`` and renamed to ``DIR`` once every rank is done.
"""

from __future__ import annotations

import collections
import functools
import io
import pickle
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from ltransform.distributed import env
from ltransform.io import (CheckpointNotFoundError, ChecksumError, FileFormatError, UnsafeCheckpointError,
                          file_checksum, partial_path, read_file, safe_unpickler, write_file)

MANIFEST = "manifest.pt"
# DCP warns on every call without a process group, which is what a one-process save means here
_SINGLE_PROCESS = ".*assuming the intent is to (save|load) in a single process"


@functools.cache
def allowed_globals() -> dict[tuple[str, str], Any]:
    """The exact ``(module, name)`` pairs a DCP ``.metadata`` pickle may name, read from this torch
    (so they follow DCP across versions): the classes ``torch.distributed.checkpoint.metadata``
    defines (its dataclasses and enum), the file system's ``_StorageInfo``, torch's dtypes and
    ``Size``, its layout lookup, and the path classes a ``checkpoint_id`` may be."""
    import pathlib

    import torch.distributed.checkpoint.filesystem as filesystem
    import torch.distributed.checkpoint.metadata as metadata

    table: dict[tuple[str, str], Any] = {}
    classes = [v for v in vars(metadata).values() if isinstance(v, type) and v.__module__ == metadata.__name__]
    classes += [v for v in [getattr(filesystem, "_StorageInfo", None), torch.Size, collections.OrderedDict] if v]
    for cls in classes:
        table[(cls.__module__, cls.__qualname__)] = cls
    for cls in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath):
        for module in {cls.__module__, "pathlib", "pathlib._local"}:  # (Python 3.13 moved them)
            table[(module, cls.__qualname__)] = cls
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.memory_format)):
            table[("torch", name)] = value
    table[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    return table


def reader(path: Path) -> Any:
    """A DCP ``FileSystemReader`` that reads ``.metadata`` through an exact allowlist of classes
    (:func:`allowed_globals`) instead of a bare ``pickle.load`` (which would run whatever a
    crafted file asks for)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    unpickler = safe_unpickler(allowed_globals())

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            file = self._get_metadata_path(kwargs.get("rank"))
            where = f"the sharded checkpoint {str(path)!r}: its file {Path(file).name!r}"
            try:
                with self.fs.create_stream(file, "rb") as stream:
                    metadata = unpickler(stream).load()
            except pickle.UnpicklingError as error:
                if "is not allowed" in str(error):
                    raise UnsafeCheckpointError(
                        f"refusing to load {where} holds objects other than DCP's own records ({error}), "
                        f"which could run code when unpickled; it was not unpickled") from None
                raise FileFormatError(f"{where} is corrupt ({error}); load an earlier checkpoint") from None
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"{where} is missing: the checkpoint is incomplete; load an "
                                              f"earlier checkpoint") from None
            except Exception as error:
                raise FileFormatError(f"{where} is truncated or corrupt ({type(error).__name__}: {error}); "
                                      f"load an earlier checkpoint") from None
            if not isinstance(metadata, Metadata):
                raise FileFormatError(f"{where} holds a {type(metadata).__name__}, not DCP's Metadata: it is "
                                      f"corrupt; load an earlier checkpoint")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def write_manifest(directory: Path) -> None:
    """Record the size and CRC-32 of every file of a sharded checkpoint in its ``manifest.pt``
    (itself checked by the CRC-32 of its zip record). Every rank hashes a share of the files;
    call it on every rank once all have written."""
    sizes = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name != MANIFEST}
    mine = {name: file_checksum(directory / name) for name in _share(sizes)}
    files = {name: entry for part in env.all_gather_objects(mine) for name, entry in part.items()}
    if env.rank() == 0:
        write_file(directory / MANIFEST, {"format": "ltransform-manifest", "checksum": "crc32", "files": files})


def verify_files(path: Path) -> bool:
    """Check every file of the sharded checkpoint ``path`` against its manifest, the ranks each
    taking a share (every rank raises the same error); False if it has no manifest (format 1).

    Raises:
        ChecksumError: a file's size or CRC-32 differs from the manifest's.
        CheckpointNotFoundError: a file the manifest records is missing.
        FileFormatError: the manifest is corrupt, or a file is a directory.
    """
    if not (path / MANIFEST).exists():
        return False
    manifest = read_file(path / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, Mapping) else None
    if not isinstance(files, Mapping) or not all(
            isinstance(v, tuple) and len(v) == 2 and all(type(x) is int for x in v) for v in files.values()):
        raise FileFormatError(f"the sharded checkpoint {str(path)!r}: its {MANIFEST!r} is not a manifest "
                              f"ltransform wrote: it is corrupt; load an earlier checkpoint")
    found = [_check_file(path, n, files[n]) for n in _share({n: entry[0] for n, entry in files.items()})]
    errors = [e for part in env.all_gather_objects([e for e in found if e]) for e in part]
    if errors:
        kind, message = errors[0]
        raise {"missing": CheckpointNotFoundError, "format": FileFormatError}.get(kind, ChecksumError)(message)
    return True


def _share(sizes: Mapping[str, int]) -> list[str]:
    """This rank's share of the files to hash: the largest first to the least loaded rank (the
    same split on every rank)."""
    loads, shares = [0] * env.world_size(), [[] for _ in range(env.world_size())]
    for name in sorted(sizes, key=lambda n: (-int(sizes[n]), n)):
        least = loads.index(min(loads))
        loads[least] += int(sizes[name])
        shares[least].append(name)
    return shares[env.rank()]


def _check_file(path: Path, name: str, recorded: tuple[int, int]) -> tuple[str, str] | None:
    file = path / name
    where = f"the sharded checkpoint {str(path)!r}: its file {name!r}"
    if file.is_dir():
        return "format", f"{where} is a directory, not a file: the checkpoint is corrupt; load an earlier checkpoint"
    if not file.exists():
        return "missing", (f"{where} is missing (its {MANIFEST} records it): the checkpoint is incomplete; "
                           f"load an earlier checkpoint")
    size, crc = file_checksum(file)
    if size != recorded[0]:
        return "checksum", (f"{where} has {size} bytes, {recorded[0]} when saved: it is truncated or corrupt; "
                            f"load an earlier checkpoint")
    if crc != recorded[1]:
        return "checksum", (f"{where} does not match its checksum (CRC-32 {crc:08x}, recorded {recorded[1]:08x}): "
                            f"it is corrupt; load an earlier checkpoint")
    return None


def planner(strict: bool, *, rebuild: bool = False, keys: set[str] | None = None) -> Any:
    """DCP's load planner, reading non-tensor items with ``weights_only=True``; with
    ``rebuild`` the one that builds the whole state dict from the metadata (for conversion)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    base = _EmptyStateDictLoadPlanner if rebuild else DefaultLoadPlanner

    class SafePlanner(base):  # type: ignore[misc, valid-type]
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._nested_dict import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner(keys=keys) if rebuild else SafePlanner(allow_partial_load=not strict)


def _no_group() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


def _world() -> Any:
    import torch.distributed as dist

    return dist.group.WORLD


@functools.lru_cache(maxsize=1)
def _writer_group(world: Any) -> Any:
    """A gloo group of the same ranks for async saves (one per default group). DCP's background
    writer runs collectives; on the default group they would race the training's own (a barrier
    or a gradient all-reduce in the main thread), and the two could deadlock. torchtitan does the
    same. Created on the first async save, which every rank makes together."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


def save_tensors(tensors: dict[str, Any], path: Path, *, async_save: bool) -> Future | None:
    """Write the model/optimizer part into the partial directory of ``path``."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
        if async_save:
            result = dcp.async_save(tensors, checkpoint_id=str(partial_path(path)), no_dist=_no_group(),
                                    process_group=None if _no_group() else _writer_group(_world()))
            return getattr(result, "upload_completion", result)
        dcp.save(tensors, checkpoint_id=str(partial_path(path)), no_dist=_no_group())
    return None


def load_tensors(tensors: dict[str, Any], path: Path, *, strict: bool = True, rebuild: bool = False,
                 keys: set[str] | None = None) -> None:
    """Fill ``tensors`` from the DCP directory ``path`` (with ``rebuild``: an empty dict, filled
    in this process with everything stored, or with the subtrees named in ``keys``)."""
    import torch.distributed.checkpoint as dcp

    if rebuild:  # dcp.load keeps only the keys it was given; torch's own dcp_to_torch_save does this
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        _load_state_dict(tensors, storage_reader=reader(path),
                         planner=planner(strict, rebuild=True, keys=keys), no_dist=True)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
            dcp.load(tensors, storage_reader=reader(path), planner=planner(strict), no_dist=_no_group())
