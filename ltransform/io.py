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
import stat
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


def write_safetensors(weights: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write ``weights`` (names to tensors) as a safetensors file, atomically."""
    safetensors_torch = import_safetensors()
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    return _write_atomic(Path(path), lambda tmp: safetensors_torch.save_file(
        tensors, str(tmp), metadata={"format": "pt", "writer": "ltransform"}))


def _umask() -> int:
    """This process's umask (read by setting it: there is no getter; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as file:
            os.fchmod(file.fileno(), 0o666 & ~_umask())  # the usual mode (safetensors' writer makes 0600)
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
    # A user's own symlink (latest.pt -> step-100.pt) is a fine way to name a file, so it is
    # followed here; what a checkpoint directory names itself is checked without following any
    # (``ltransform.checkpoint.sharded``). Anything but a regular file is refused before it is
    # opened: reading a FIFO would block forever.
    kind = not_regular(path, follow_symlinks=True)
    if kind == "missing":
        raise CheckpointNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    if kind == "a directory":
        raise FileFormatError(f"checkpoint file {str(path)!r} is a directory, not a file; is it the right path?")
    if kind is not None:
        raise FileFormatError(f"checkpoint file {str(path)!r} is {kind}, not a regular file; is it the right path?")
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
    """Check every record of a torch zip file before torch parses any of it: each stored as is
    (torch never compresses one; a compressed record could inflate to any size: a zip bomb), no
    larger than the file, and but for tensor data matching its CRC-32 (a flipped byte in the pickle
    could otherwise load as a different value). Records are read in chunks, never whole."""
    where = f"checkpoint file {str(path)!r}"
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                    raise FileFormatError(f"{where}: record {info.filename!r} is compressed, which torch.save never "
                                          f"does: the file is corrupt or crafted; load an earlier checkpoint")
                if info.file_size > size:
                    raise FileFormatError(f"{where}: record {info.filename!r} claims {info.file_size} bytes, more "
                                          f"than the file's {size}: it is truncated or corrupt; load an earlier "
                                          f"checkpoint")
                if _STORAGE.search(info.filename) or info.CRC == 0:  # (0: saved with compute_crc32 off)
                    continue
                try:
                    with archive.open(info) as record:  # (the CRC-32 is checked at its end)
                        while record.read(_CHUNK):
                            pass
                except zipfile.BadZipFile as error:
                    if "CRC" in str(error):
                        raise ChecksumError(f"{where}: record {info.filename!r} does not match its CRC-32: the "
                                            f"file is corrupt; load an earlier checkpoint") from None
                    raise
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as error:
        raise FileFormatError(f"{where} is truncated or corrupt and cannot be read (its zip structure: "
                              f"{reason(error)}); load an earlier checkpoint") from None


_CHUNK = 1 << 20


def not_regular(path: Path, *, follow_symlinks: bool = False) -> str | None:
    """What ``path`` is if it is not a regular file: ``"missing"``, ``"a directory"``, ``"a
    symbolic link"`` (unless ``follow_symlinks``), ``"a FIFO"``, ...; None for a regular file.
    Nothing is opened (opening a FIFO for reading blocks until a writer comes)."""
    try:
        mode = (os.stat if follow_symlinks else os.lstat)(path).st_mode
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as error:  # (a name too long, a NUL byte, a dangling link followed, ...)
        return f"unreadable ({reason(error)})"
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISLNK: "a symbolic link", stat.S_ISFIFO: "a FIFO (named pipe)",
             stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    return next((kind for test, kind in kinds.items() if test(mode)), "not a regular file")


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
        odd = sorted(set(tensors) ^ set(recorded), key=str)[:5]
        raise ChecksumError(f"checkpoint file {str(file)!r}: its tensors are not the ones whose checksums it "
                            f"records (entries {odd}): the file is corrupt; load an earlier checkpoint")
    for name, crc in zip(tensors, _checksums(list(tensors.values()))):
        if crc != recorded[name]:
            raise ChecksumError(f"checkpoint file {str(file)!r}: entry {name!r} does not match its checksum "
                                f"(CRC-32 {crc:08x}, recorded {recorded[name]:08x}): the file is corrupt; load "
                                f"an earlier checkpoint")


def _tensors(value: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{path}/{_step(key)}" if path else _step(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{path}/{index}" if path else str(index))


_INTEGER = re.compile(r"-?\d+")


def _step(key: Any) -> str:
    """One key of a tensor's path, spelled so that no two keys of a dict share a path: a string
    as it is (``0.weight``), unless it could read as something else (``'0'`` beside the integer
    ``0``; ``'a/b'`` beside ``a`` then ``b``; empty, or starting with a quote or ``!``), then as
    its repr (a quoted literal); an integer as digits; any other key as ``!`` and the literal of
    its repr (``!'None'``). Each form starts differently, and a literal ends where its quote does."""
    if type(key) is int:
        return str(key)
    if type(key) is str:
        plain = key and "/" not in key and key[0] not in "'\"!" and not _INTEGER.fullmatch(key)
        return key if plain else repr(key)
    return "!" + repr(repr(key))


_PARALLEL_BYTES = 64 << 20


def _checksums(tensors: list[torch.Tensor]) -> list[int]:
    if len(tensors) < 2 or sum(t.numel() * t.element_size() for t in tensors) < _PARALLEL_BYTES:
        return [checksum(t) for t in tensors]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(checksum, tensors))


def file_checksum(path: Path) -> tuple[int, int]:
    """A regular file's size and the CRC-32 of its bytes (read through a memory map: no copies).

    Raises:
        OSError: ``path`` is not a regular file (a symlink, a FIFO, ...: opened without following
            a link or waiting for a writer, so nothing blocks).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb"):  # (closes fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{str(path)!r} is not a regular file")
        if info.st_size == 0:
            return 0, 0
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
            return info.st_size, crc32()(mapped)


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
