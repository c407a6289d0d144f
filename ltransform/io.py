"""Reading and writing files: safe reads, atomic writes, safetensors.

The one module that touches checkpoint and weight files (a leaf: it imports only the standard
library and torch). Reads never unpickle arbitrary code: ``torch.load`` runs with
``weights_only=True``, other pickles go through an allowlist (``safe_unpickler``). Writes are
atomic: a file is written aside as ``.name.partial``, synced, and renamed over the target only
when complete, so a process killed mid-write leaves the previous file as it was. Every error
names the file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator
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


class FileFormatError(ValueError, RuntimeError):
    """A file that is not what it should be: empty, truncated, corrupt, or of another format.

    A ``ValueError`` (the file's content is a bad value) and, as these errors always were, a
    ``RuntimeError``, so code catching either keeps working.
    """


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
    paged in lazily), with errors that name the file.

    Raises:
        FileNotFoundError: there is no such file.
        FileFormatError: the file is empty, truncated, corrupt, or not one ``torch.save`` wrote.
        pickle.UnpicklingError: it holds Python objects other than tensors and plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
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
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except MemoryError:
        raise
    except Exception as error:
        raise _read_error(path, error, is_zip) from error


def _read_error(path: Path, error: Exception, is_zip: bool) -> Exception:
    disallowed = _DISALLOWED_GLOBAL.search(str(error)) if isinstance(error, pickle.UnpicklingError) else None
    if disallowed:
        return pickle.UnpicklingError(
            f"refusing to load {str(path)!r}: it holds Python objects other than tensors and plain data "
            f"(global '{disallowed.group(1)}'), which could run code when unpickled (loaded with "
            f"weights_only=True). Only if you trust its source, load it with torch.load(path, "
            f"weights_only=False), or allowlist the class with torch.serialization.add_safe_globals")
    reason = f"{type(error).__name__}: {_reason(error)}"
    if is_zip and zipfile.is_zipfile(path) and not _torch_zip(path):
        return FileFormatError(f"{str(path)!r} is not an ltransform checkpoint: it is a zip archive, but not "
                               f"one torch.save wrote (it has no data.pkl)")
    return FileFormatError(f"checkpoint file {str(path)!r} is truncated or corrupt and cannot be read "
                           f"({reason}); load an earlier checkpoint")


def _torch_zip(path: Path) -> bool:
    with contextlib.suppress(zipfile.BadZipFile, OSError), zipfile.ZipFile(path) as archive:
        return any(name.endswith("/data.pkl") for name in archive.namelist())
    return False


def _reason(error: Exception) -> str:
    """The gist of a reader's error: its first sentence, and of torch's long weights_only message
    only the unpickler's own words (the rest advises weights_only=False, which is wrong here)."""
    text = str(error).strip()
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    line = (found.group(1) if found else text).strip().splitlines()[0] if text else "no details"
    return re.split(r"(?<=\.)\s", line, maxsplit=1)[0][:200]


def safe_unpickler(allowed: Callable[[str, str], bool]) -> type[pickle.Unpickler]:
    """An ``Unpickler`` class that refuses any global ``allowed(module, name)`` rejects."""

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if not allowed(module, name):
                raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
            return super().find_class(module, name)

    return Restricted


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
