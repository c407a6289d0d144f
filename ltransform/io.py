"""Reading and writing files: safe reads, atomic writes, safetensors.

The one module that touches checkpoint and weight files (a leaf: it imports only the standard
library and torch). Reads never unpickle arbitrary code: ``torch.load`` runs with
``weights_only=True``, other pickles go through an exact table of allowed classes
(``safe_unpickler``). Reads check checksums: the CRC-32 torch's zip keeps for each record, and
(``verify_checksums``) one per tensor that the writer recorded. Writes are atomic: a file is
written aside as ``.name.partial``, synced, and renamed over the target only when complete, so a
process killed mid-write leaves the previous file as it was. Every error is a
``CheckpointError`` naming the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import pickle
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

_ZIP = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (torch.save's format since torch 1.6), or an empty one
# torch.save's legacy format (_use_new_zipfile_serialization=False): a pickle (PROTO 2 or 3) of
# torch's magic number (LONG1, 10 bytes) first
_LEGACY = re.compile(rb"\x80[\x02\x03]\x8a\x0a" + re.escape((0x1950A86A20F9469CFC6C).to_bytes(10, "little")))
# What torch's weights_only unpickler says when it meets a class or function outside its allowlist
# (and only then): the one case in which loading with weights_only=False could help.
_DISALLOWED_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*) (?:was not an allowed global|whose module)")


class CheckpointError(Exception):
    """A checkpoint (or weights file) that cannot be loaded, ``lt.CheckpointError``: every failure
    of ``lt.load`` is one, naming the checkpoint and the file or key at fault, with the fix where
    there is one. Each subclass is also the builtin error that fits, so ``except KeyError`` (or
    ``ValueError``, ``FileNotFoundError``, ``pickle.UnpicklingError``) keeps working.

    Example:
        >>> import tempfile, torch, ltransform as lt
        >>> try:
        ...     lt.load(tempfile.mkdtemp() + "/missing.pt", lt.State(model=torch.nn.Linear(2, 1)))
        ... except lt.CheckpointError as error:
        ...     print(type(error).__name__, isinstance(error, FileNotFoundError))
        CheckpointNotFoundError True
    """

    def __str__(self) -> str:  # the message itself (a KeyError would print its repr)
        return str(self.args[0]) if self.args else ""


class FileFormatError(CheckpointError, ValueError, RuntimeError):
    """A file that is not what it should be: empty, truncated, corrupt, or of another format.

    A ``ValueError`` (the file's content is a bad value) and, as these errors always were, a
    ``RuntimeError``, so code catching either keeps working.
    """


class ChecksumError(FileFormatError):
    """A file (or an entry of it) whose bytes differ from the checksum recorded when it was saved."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint, or a file of a sharded one, that does not exist."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A file holding Python objects that could run code when unpickled (it was not unpickled)."""


class CheckpointKeyError(CheckpointError, KeyError):
    """A checkpoint whose models, optimizers or keys do not match the state's (``strict``)."""


class CheckpointMismatchError(CheckpointError, ValueError, RuntimeError):
    """A checkpoint that does not fit the state: a shape, an optimizer's parameter groups, an extra
    the state lacks (a ``ValueError``; a ``RuntimeError`` as the missing-extra error always was)."""


def partial_path(path: Path) -> Path:
    """Where a write of ``path`` goes before it is published."""
    return path.with_name(f".{path.name}.partial")


def write_file(path: str | os.PathLike[str], payload: Any) -> Path:
    """``torch.save`` ``payload`` to ``path`` atomically (write aside, fsync, rename, fsync the directory).

    Example:
        >>> import tempfile, torch
        >>> from ltransform import io
        >>> path = io.write_file(tempfile.mkdtemp() + "/x.pt", {"w": torch.ones(2)})
        >>> io.read_file(path)["w"].tolist()
        [1.0, 1.0]
    """
    return _write_atomic(Path(path), lambda tmp: torch.save(payload, tmp))


def write_safetensors(weights: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write ``weights`` (names to tensors) as a safetensors file, atomically."""
    safetensors_torch = import_safetensors()
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    return _write_atomic(Path(path), lambda tmp: safetensors_torch.save_file(
        tensors, str(tmp), metadata={"format": "pt", "writer": "ltransform"}))


def _write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_file(path: str | os.PathLike[str], *, mmap: bool = True) -> Any:
    """``torch.load`` with ``weights_only=True`` on the CPU and, for zip files, ``mmap`` (tensors
    paged in lazily), with errors that name the file. A zip file's records other than tensor data
    (the pickle, its byte order, ...) are checked against the CRC-32 torch's zip holds for each
    before anything is unpickled; tensors are checked by :func:`verify_checksums`.

    Raises:
        CheckpointNotFoundError (a FileNotFoundError): there is no such file.
        FileFormatError: the file is empty, truncated, corrupt, a directory, or not one ``torch.save``
            wrote; ChecksumError (one of them): a record's CRC-32 does not match.
        UnsafeCheckpointError (a pickle.UnpicklingError): it holds Python objects other than
            tensors and plain data.
    """
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"checkpoint file {str(path)!r} is a directory, not a file; is it the right path?")
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    with open(path, "rb") as file:
        head = file.read(14)
    if not head:
        raise FileFormatError(f"checkpoint file {str(path)!r} is empty (0 bytes): truncated or corrupt; "
                              f"load an earlier checkpoint")
    is_zip = head.startswith(_ZIP)
    if not (is_zip or _LEGACY.match(head) or tarfile.is_tarfile(path)):  # (tar: torch < 0.4's format)
        what = "a pickle, but not one torch.save wrote" if head.startswith(b"\x80") else f"it starts with {head[:8]!r}"
        raise FileFormatError(f"{str(path)!r} is not an ltransform checkpoint (nor any file torch.save writes): "
                              f"{what}; is it the right path? If it is, the file is corrupt")
    if is_zip:
        _check_records(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except MemoryError:
        raise
    except Exception as error:
        raise _read_error(path, error, is_zip) from error


_STORAGE = re.compile(r"/data/\d+$")  # a zip record holding a tensor's bytes (checked per tensor instead)


def _check_records(path: Path) -> None:
    """Check the CRC-32 of every record of a torch zip file but the tensor data, before torch
    parses any of it (a flipped byte in the pickle could otherwise load as a different value)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if _STORAGE.search(info.filename) or info.CRC == 0:  # (0: saved with compute_crc32 off)
                    continue
                try:
                    archive.read(info)
                except zipfile.BadZipFile as error:
                    if "CRC" in str(error):
                        raise ChecksumError(f"checkpoint file {str(path)!r}: record {info.filename!r} does not "
                                            f"match its CRC-32: the file is corrupt; load an earlier "
                                            f"checkpoint") from None
                    raise
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as error:
        raise FileFormatError(f"checkpoint file {str(path)!r} is truncated or corrupt and cannot be read "
                              f"(its zip structure: {reason(error)}); load an earlier checkpoint") from None


def _read_error(path: Path, error: Exception, is_zip: bool) -> Exception:
    disallowed = _DISALLOWED_GLOBAL.search(str(error)) if isinstance(error, pickle.UnpicklingError) else None
    if disallowed:
        return UnsafeCheckpointError(
            f"refusing to load {str(path)!r}: it holds Python objects other than tensors and plain data "
            f"(global '{disallowed.group(1)}'), which could run code when unpickled (loaded with "
            f"weights_only=True). Only if you trust its source, load it with torch.load(path, "
            f"weights_only=False), or allowlist the class with torch.serialization.add_safe_globals")
    why = f"{type(error).__name__}: {reason(error)}"
    if is_zip and zipfile.is_zipfile(path) and not _torch_zip(path):
        return FileFormatError(f"{str(path)!r} is not an ltransform checkpoint: it is a zip archive, but not "
                               f"one torch.save wrote (it has no data.pkl)")
    return FileFormatError(f"checkpoint file {str(path)!r} is truncated or corrupt and cannot be read "
                           f"({why}); load an earlier checkpoint")


def _torch_zip(path: Path) -> bool:
    with contextlib.suppress(zipfile.BadZipFile, OSError), zipfile.ZipFile(path) as archive:
        return any(name.endswith("/data.pkl") for name in archive.namelist())
    return False


def reason(error: Exception) -> str:
    """The gist of a reader's error: its first sentence, and of torch's long weights_only message
    only the unpickler's own words (the rest advises weights_only=False, which is wrong here)."""
    text = str(error).strip()
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    line = (found.group(1) if found else text).strip().splitlines()[0] if text else "no details"
    return re.split(r"(?<=\.)\s", line, maxsplit=1)[0][:200]


def safe_unpickler(allowed: Mapping[tuple[str, str], Any]) -> type[pickle.Unpickler]:
    """An ``Unpickler`` class that resolves a global only through ``allowed``, an exact table of
    ``(module, name)`` pairs to objects: nothing is imported or looked up by attribute (pickle's
    own lookup walks dotted names, so ``'torch.os.system'`` would reach ``os.system``), and any
    pair not in the table raises ``pickle.UnpicklingError``.

    Example:
        >>> import io as stdlib_io, pickle, collections
        >>> from ltransform import io
        >>> unpickler = io.safe_unpickler({("collections", "OrderedDict"): collections.OrderedDict})
        >>> dict(unpickler(stdlib_io.BytesIO(pickle.dumps(collections.OrderedDict(a=1)))).load())
        {'a': 1}
    """

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            found = allowed.get((module, name), _MISSING)
            if found is _MISSING:
                raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
            return found

    return Restricted


_MISSING = object()


def checksum(tensor: torch.Tensor) -> int:
    """The CRC-32 of a tensor's bytes (as laid out contiguously on the CPU)."""
    tensor = tensor.detach()
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    tensor = tensor.cpu().contiguous()
    size = tensor.numel() * tensor.element_size()
    if size == 0:
        return 0
    return crc32()((ctypes.c_char * size).from_address(tensor.data_ptr()))


@functools.cache
def crc32() -> Callable[..., int]:
    """``crc32(data, value=0)``: zlib-ng's (a dependency: the same CRC-32, 6-7x faster than the
    standard library's), else ``zlib.crc32`` where it is missing. Both release the GIL."""
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        return zlib.crc32
    return zlib_ng.crc32


def tensor_checksums(payload: Any) -> dict[str, int]:
    """The :func:`checksum` of every tensor in a nested structure of dicts, lists and tuples, by
    its path (``"models/model/0.weight"``); the tensors are hashed in parallel (zlib releases the GIL)."""
    tensors = dict(_tensors(payload, ""))
    return dict(zip(tensors, _checksums(list(tensors.values()))))


def verify_checksums(payload: Mapping[str, Any], recorded: Any, file: Path) -> None:
    """Check every tensor of ``payload`` against the checksums ``tensor_checksums`` recorded.

    Raises:
        ChecksumError: an entry's bytes differ, or the tensors are not the ones recorded; it names
            the file and the entry.
    """
    tensors = dict(_tensors(payload, ""))
    if not (isinstance(recorded, Mapping) and all(type(v) is int for v in recorded.values())):
        raise ChecksumError(f"checkpoint file {str(file)!r} records no checksums (or malformed ones), which its "
                            f"format has: it is corrupt; load an earlier checkpoint")
    if set(recorded) != set(tensors):
        odd = sorted(set(tensors) ^ set(recorded))[:5]
        raise ChecksumError(f"checkpoint file {str(file)!r}: its tensors are not the ones whose checksums it "
                            f"records (entries {odd}): the file is corrupt; load an earlier checkpoint")
    for (name, tensor), crc in zip(tensors.items(), _checksums(list(tensors.values()))):
        if crc != recorded[name]:
            raise ChecksumError(f"checkpoint file {str(file)!r}: entry {name!r} does not match its checksum "
                                f"(CRC-32 {crc:08x}, recorded {recorded[name]:08x}): the file is corrupt; load "
                                f"an earlier checkpoint")


def _tensors(value: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{path}/{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{path}/{index}" if path else str(index))


_PARALLEL_BYTES = 64 << 20


def _checksums(tensors: list[torch.Tensor]) -> list[int]:
    if len(tensors) < 2 or sum(t.numel() * t.element_size() for t in tensors) < _PARALLEL_BYTES:
        return [checksum(t) for t in tensors]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(checksum, tensors))


def file_checksum(path: Path) -> tuple[int, int]:
    """A file's size and the CRC-32 of its bytes (read through a memory map: no copies)."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            return 0, 0
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return size, crc32()(mapped)


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU."""
    with _naming(path):
        return import_safetensors().load_file(str(path))


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike[str]) -> Iterator[Any]:
    """A safetensors file opened for reading one tensor at a time (``keys()``, ``get_tensor(name)``)."""
    with _naming(path):
        handle = import_safetensors().safe_open(str(path), framework="pt", device="cpu")
    with handle:
        yield handle


@contextlib.contextmanager
def _naming(path: str | os.PathLike[str]) -> Iterator[None]:
    try:
        yield
    except (ImportError, FileNotFoundError):
        raise
    except Exception as error:  # safetensors raises its own SafetensorError on a bad header
        raise FileFormatError(f"safetensors file {str(path)!r} is truncated or corrupt ({error})") from error


def import_safetensors() -> Any:
    """``safetensors.torch``, or an ImportError naming the pip command."""
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError("safetensors files need the safetensors package: pip install 'ltransform[safetensors]' "
                          "(or pip install safetensors)") from error
    return safetensors.torch
