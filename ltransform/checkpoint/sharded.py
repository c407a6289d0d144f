"""Sharded checkpoints: a ``torch.distributed.checkpoint`` (DCP) directory, each rank writing its
own shards; loadable on any number of ranks (resharding), or one process with no group.

Layout of ``DIR``: DCP's ``.metadata`` and ``*.distcp`` (models and optimizers), ``common.pt``
(counters, schedulers, extras, metadata; rank 0), ``rank-R.pt`` (each rank's RNG states and
data position) and ``manifest.pt`` (every other file's size and CRC-32, checked before a load
reads anything; format 1 checkpoints have none and load unchecked). It is written as
``.DIR.partial`` and renamed to ``DIR`` once every rank is done. A load opens only regular files
(never a symlink or a FIFO) that the checkpoint names by bare name, and reads DCP's shards into
buffers before anything is copied in (:func:`stage_tensors`).
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
import pickle
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from ltransform.distributed import env
from ltransform.io import (CheckpointNotFoundError, ChecksumError, FileFormatError, UnsafeCheckpointError,
                          file_checksum, not_regular, partial_path, read_file, safe_unpickler, write_file)

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


def reader(path: Path, checked: Any = None) -> Any:
    """A DCP ``FileSystemReader`` that reads ``.metadata`` through an exact allowlist of classes
    (:func:`allowed_globals`) instead of a bare ``pickle.load`` (which would run whatever a
    crafted file asks for), and checks where it stores each entry (:func:`_check_storage`)
    before DCP opens any file: DCP joins each entry's file name onto the directory, so an
    absolute name would read any file on the machine, and a FIFO would block the load forever.
    Given ``checked`` (the metadata such a reader of ``path`` read and checked earlier in the
    same load), it hands that out instead of reading and checking the file again."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    unpickler = safe_unpickler(allowed_globals())

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if checked is not None:
                checked.storage_meta.load_id = self.load_id
                return checked
            file = member(path, Path(self._get_metadata_path(kwargs.get("rank"))).name)
            where = f"the sharded checkpoint {str(path)!r}: its file {file.name!r}"
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
            except Exception as error:  # noqa: BLE001 - any other failure to unpickle: a corrupt file
                raise FileFormatError(f"{where} is truncated or corrupt ({type(error).__name__}: {error}); "
                                      f"load an earlier checkpoint") from None
            if not isinstance(metadata, Metadata):
                raise FileFormatError(f"{where} holds a {type(metadata).__name__}, not DCP's Metadata: it is "
                                      f"corrupt; load an earlier checkpoint")
            _check_storage(metadata, path, where)
            storage = getattr(metadata, "storage_meta", None)
            if storage is None:
                storage = metadata.storage_meta = StorageMeta()
            storage.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _check_storage(metadata: Any, directory: Path, where: str) -> None:
    """Check a DCP metadata's records of where each chunk is stored, so that DCP reads only
    regular files of the checkpoint, and within them: every entry's file a bare name of a regular
    file in ``directory`` (listed in the manifest, where there is one), its byte range inside that
    file, no stream transforms (ltransform writes none), and at least as many bytes as its
    chunk's data (DCP stores a chunk as a ``torch.save`` of it: the raw bytes plus a small zip
    around them; the exact overhead varies across torch versions, so only this bound is checked);
    and every tensor's chunks covering it, within its bounds (which caps what is allocated).

    Raises:
        UnsafeCheckpointError: an entry's file is not a bare name (it would read outside the checkpoint).
        CheckpointNotFoundError: an entry's file is missing.
        FileFormatError: anything else out of place; each names ``where`` and the entry.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    entries: Any = getattr(metadata, "state_dict_metadata", None)  # (checked by _chunk_sizes)
    chunks = _chunk_sizes(entries, where)
    storage, listed, sizes = getattr(metadata, "storage_data", None), manifest_files(directory), {}
    if not isinstance(storage, Mapping):
        raise FileFormatError(f"{where} records no storage of its entries: it is corrupt; load an earlier checkpoint")
    for index, info in storage.items():
        if not (isinstance(index, MetadataIndex) and type(index.fqn) is str and isinstance(info, _StorageInfo)):
            raise FileFormatError(f"{where}: its storage record {index!r} is malformed: the checkpoint is corrupt; "
                                  f"load an earlier checkpoint")
        entry, name = f"{where}: entry {index.fqn!r}", info.relative_path
        if not bare_name(name):
            raise UnsafeCheckpointError(f"refusing to load {entry} stores its data in {name!r}, which is not a file "
                                        f"of the checkpoint (a checkpoint names its files by bare name): it is "
                                        f"crafted or corrupt; nothing was read")
        if listed is not None and name not in listed:
            raise FileFormatError(f"{entry} stores its data in {name!r}, which its {MANIFEST!r} does not record: "
                                  f"the checkpoint is corrupt; load an earlier checkpoint")
        if name not in sizes:
            kind = not_regular(directory / name)
            if kind is not None:
                error, what = ((CheckpointNotFoundError, "missing") if kind == "missing" else
                               (FileFormatError, f"{kind}, not a regular file"))
                raise error(f"{entry} stores its data in {name!r}, which is {what}: the checkpoint is incomplete "
                            f"or corrupt; load an earlier checkpoint")
            sizes[name] = (directory / name).stat().st_size
        offset, length = info.offset, info.length
        if not (type(offset) is int and type(length) is int and 0 <= offset and 0 <= length
                and offset + length <= sizes[name]):
            raise FileFormatError(f"{entry}: its bytes {offset!r}+{length!r} lie outside its file {name!r} "
                                  f"({sizes[name]} bytes): the checkpoint is corrupt; load an earlier checkpoint")
        if info.transform_descriptors:
            raise FileFormatError(f"{entry} is stored through stream transforms {info.transform_descriptors!r}, "
                                  f"which ltransform never writes: the checkpoint is corrupt or not one "
                                  f"ltransform wrote")
        if isinstance(entries.get(index.fqn), BytesStorageMetadata):
            continue
        needed = chunks.get((index.fqn, tuple(index.offset or ())))
        if needed is None or length < needed:
            what = "matches no chunk of a tensor" if needed is None else f"has {length} bytes for {needed} of data"
            raise FileFormatError(f"{entry}: its stored chunk {what}: the checkpoint is corrupt; load an earlier "
                                  f"checkpoint")


def _chunk_sizes(entries: Any, where: str) -> dict[tuple[str, tuple[int, ...]], int]:
    """The bytes of data of every tensor chunk, by ``(fqn, offsets)``, each tensor's chunks checked:
    within its bounds, and covering it (as DCP's own save checks; a tensor of huge declared size
    with tiny chunks would otherwise make a load allocate it)."""
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata,
                                                       TensorStorageMetadata)

    if not isinstance(entries, Mapping):
        raise FileFormatError(f"{where} records no entries: it is corrupt; load an earlier checkpoint")
    out = {}
    for fqn, entry in entries.items():
        if isinstance(entry, BytesStorageMetadata):
            continue
        # (Any: read from the file, checked just below)
        dtype: Any = getattr(getattr(entry, "properties", None), "dtype", None)
        size: Any = getattr(entry, "size", None)
        chunks: Any = getattr(entry, "chunks", None)
        good = isinstance(entry, TensorStorageMetadata) and isinstance(dtype, torch.dtype) and _dims(size, size)
        good = good and isinstance(chunks, list) and all(
            isinstance(c, ChunkStorageMetadata) and _dims(c.offsets, size) and _dims(c.sizes, size)
            and all(o + n <= s for o, n, s in zip(c.offsets, c.sizes, size)) for c in chunks)
        if not (good and sum(math.prod(c.sizes) for c in chunks) >= math.prod(size)):
            raise FileFormatError(f"{where}: entry {fqn!r} has a malformed record of its chunks: the checkpoint "
                                  f"is corrupt; load an earlier checkpoint")
        for chunk in chunks:
            out[(fqn, tuple(chunk.offsets))] = math.prod(chunk.sizes) * dtype.itemsize
    return out


def _dims(value: Any, like: Any) -> bool:
    return (isinstance(value, tuple) and len(value) == len(like)
            and all(type(n) is int and n >= 0 for n in value))


def bare_name(name: Any) -> bool:
    """A file name alone: not a path (no separator), not absolute, not ``.`` or ``..``."""
    seps = {sep for sep in (os.sep, "/", os.altsep) if sep is not None}
    return (type(name) is str and name not in ("", ".", "..") and "\0" not in name
            and not any(sep in name for sep in seps))


def member(path: Path, name: str) -> Path:
    """The file ``name`` of the sharded checkpoint ``path``, checked to be a regular file there
    (not a symlink, a FIFO, ...) before anything opens it.

    Raises:
        CheckpointNotFoundError: it is missing.
        FileFormatError: it is something other than a regular file.
    """
    kind = not_regular(path / name)
    where = f"the sharded checkpoint {str(path)!r}: its file {name!r}"
    if kind == "missing":
        raise CheckpointNotFoundError(f"{where} is missing: the checkpoint is incomplete; load an earlier checkpoint")
    if kind is not None:
        raise FileFormatError(f"{where} is {kind}, not a regular file: the checkpoint is corrupt; load an "
                              f"earlier checkpoint")
    return path / name


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
        FileFormatError: the manifest is corrupt or names a path rather than a file, or a file is
            a directory, a symlink, a FIFO or anything else but a regular file.
    """
    files = manifest_files(path)
    if files is None:
        return False
    found = [_check_file(path, n, files[n]) for n in _share({n: entry[0] for n, entry in files.items()})]
    errors = [e for part in env.all_gather_objects([e for e in found if e]) for e in part]
    if errors:
        kind, message = errors[0]
        raise {"missing": CheckpointNotFoundError, "format": FileFormatError}.get(kind, ChecksumError)(message)
    return True


def manifest_files(path: Path) -> Mapping[str, tuple[int, int]] | None:
    """The files the manifest of the sharded checkpoint ``path`` records (each a bare name, with
    its size and CRC-32), or None if it has none (format 1).

    Raises:
        FileFormatError: the manifest is not a regular file, or not one ltransform wrote.
    """
    if not_regular(path / MANIFEST) == "missing":
        return None
    manifest = read_file(member(path, MANIFEST))
    files = manifest.get("files") if isinstance(manifest, Mapping) else None
    if not isinstance(files, Mapping) or not all(
            bare_name(n) and isinstance(v, tuple) and len(v) == 2 and all(type(x) is int for x in v)
            for n, v in files.items()):
        raise FileFormatError(f"the sharded checkpoint {str(path)!r}: its {MANIFEST!r} is not a manifest "
                              f"ltransform wrote: it is corrupt; load an earlier checkpoint")
    return files


def _share(sizes: Mapping[str, int]) -> list[str]:
    """This process's share of the files to hash: the largest first to the least loaded process (the
    same split on every process; on XLA one process per host drives several devices)."""
    count = env.process_count()
    loads = [0] * count
    shares: list[list[str]] = [[] for _ in range(count)]
    for name in sorted(sizes, key=lambda n: (-int(sizes[n]), n)):
        least = loads.index(min(loads))
        loads[least] += int(sizes[name])
        shares[least].append(name)
    return shares[env.process_index()]


def _check_file(path: Path, name: str, recorded: tuple[int, int]) -> tuple[str, str] | None:
    file = path / name
    where = f"the sharded checkpoint {str(path)!r}: its file {name!r}"
    kind = not_regular(file)  # (before opening it: reading a FIFO would block forever)
    if kind == "missing":
        return "missing", (f"{where} is missing (its {MANIFEST} records it): the checkpoint is incomplete; "
                           f"load an earlier checkpoint")
    if kind is not None:
        return "format", (f"{where} is {kind}, not a regular file: the checkpoint is corrupt; load an earlier "
                          f"checkpoint")
    try:
        size, crc = file_checksum(file)
    except OSError as error:
        return "format", f"{where} cannot be read ({error}): the checkpoint is corrupt; load an earlier checkpoint"
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
            self.set_bytes(read_item, torch.load(value, weights_only=True))

        def set_bytes(self, read_item: Any, loaded: Any) -> None:
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._nested_dict import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner(keys=keys) if rebuild else SafePlanner(allow_partial_load=not strict)


def stage_tensors(tensors: dict[str, Any], path: Path, *, strict: bool = True,
                  metadata: Any = None) -> Callable[[], None]:
    """Read from the DCP directory ``path`` everything that belongs in ``tensors`` (a state dict
    whose tensors are live ones: parameters, optimizer state) into new buffers on the CPU, and
    return the copy-in that writes them into ``tensors``.

    DCP reads a chunk straight into its target tensor, so a read that fails half-way (a chunk
    that does not fit its tensor, a file that fails to read) would leave some tensors loaded and
    others not. Read into buffers first, nothing changes until every chunk is read; the copy-in
    then only copies same-shaped tensors, which cannot fail. It costs one more copy of this
    rank's shards in CPU memory for the length of the load, and one memory copy of each.
    XLA tensors are read through torch_xla's SPMD planner (this host's shards only), whose
    commit, once a tensor's every chunk is in, is what writes them to the devices.
    """
    from ltransform.distributed import xla

    on_xla = xla.holds_xla(tensors)
    base: Any = xla.load_planner_class() if on_xla else type(planner(strict))
    staged: list[tuple[Any, Any, bool]] = []  # (read item, buffer or value, is a tensor)

    class Staging(base):
        def resolve_tensor(self, read_item: Any) -> torch.Tensor:
            target = super().resolve_tensor(read_item)
            buffer = torch.empty(target.shape, dtype=target.dtype, device="cpu")
            staged.append((read_item, buffer, True))
            return buffer

        def commit_tensor(self, read_item: Any, tensor: Any) -> None:
            pass  # at copy-in

        def set_bytes(self, read_item: Any, loaded: Any) -> None:
            staged.append((read_item, loaded, False))

    staging = Staging() if on_xla else Staging(allow_partial_load=not strict)
    # (an empty part, e.g. no sharded optimizer, is left out: torch_xla's planner takes it for a key)
    _dcp_load({k: v for k, v in tensors.items() if v}, reader(path, metadata), staging)

    def copy_in() -> None:
        for read_item, value, is_tensor in staged:
            if is_tensor:
                target = base.resolve_tensor(staging, read_item)
                target.copy_(value)
                base.commit_tensor(staging, read_item, target)
            else:
                base.set_bytes(staging, read_item, value)

    return copy_in


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

    from ltransform.distributed import xla

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
        if xla.holds_xla(tensors):  # each host its own shards
            if async_save:
                warnings.warn("async_save on XLA: the sharded save is written before lt.save returns (DCP's "
                              "background writer cannot stage XLA tensors)", RuntimeWarning, stacklevel=4)
            dcp.save(tensors, checkpoint_id=str(partial_path(path)), no_dist=_no_group(), planner=xla.save_planner())
            return None
        if async_save:
            # (a Future; from torch 2.9 an AsyncSaveResponse holding it)
            staging = {"async_stager": _pinned_stager()} if _on_cuda(tensors) else {}  # (torch >= 2.9)
            result: Any = dcp.async_save(tensors, checkpoint_id=str(partial_path(path)), no_dist=_no_group(),
                                         process_group=None if _no_group() else _writer_group(_world()), **staging)
            return getattr(result, "upload_completion", result)
        dcp.save(tensors, checkpoint_id=str(partial_path(path)), no_dist=_no_group())
    return None


def _on_cuda(tree: Any) -> bool:
    from torch.utils._pytree import tree_leaves

    return any(isinstance(leaf, torch.Tensor) and leaf.device.type == "cuda" for leaf in tree_leaves(tree))


@functools.cache
def _pinned_stager() -> Any:
    """The one staging area of this process for async saves from the GPU: DCP's ``DefaultStager``
    copying into pinned host memory, which it keeps and reuses from one save to the next (pinning
    is slow; a pinned copy runs at the bus's full speed). The copy finishes before ``lt.save``
    returns; the write to storage runs in the background. (Without a stager DCP copies into
    pageable memory, anew at each save.) The pinned copy stays for the life of the process: host
    memory the size of this rank's saved state. Some torch releases clear the stager's cache after
    each save, which makes every save pin anew: slower, still correct."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    return DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=False))


def load_tensors(tensors: dict[str, Any], path: Path, *, strict: bool = True, rebuild: bool = False,
                 keys: set[str] | None = None, metadata: Any = None) -> None:
    """Fill ``tensors`` from the DCP directory ``path`` (with ``rebuild``: an empty dict, filled
    in this process with everything stored, or with the subtrees named in ``keys``)."""
    if rebuild:  # dcp.load keeps only the keys it was given; torch's own dcp_to_torch_save does this
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        _load_state_dict(tensors, storage_reader=reader(path, metadata),
                         planner=planner(strict, rebuild=True, keys=keys), no_dist=True)
    else:
        _dcp_load(tensors, reader(path, metadata), planner(strict))


def _dcp_load(tensors: dict[str, Any], storage_reader: Any, load_planner: Any) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
        dcp.load(tensors, storage_reader=storage_reader, planner=load_planner, no_dist=_no_group())
