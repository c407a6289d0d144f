"""Checkpoint files on disk: written aside then renamed (atomic), read back safely.

A save never overwrites the last good checkpoint in place: it writes ``.name.partial`` next to
the target and renames it over the target only when complete, so a process killed mid-save
leaves the previous file (or directory) as it was. Loading uses ``weights_only=True``: a file
carrying anything but tensors and plain data executes nothing and raises a clear error.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def partial_path(path: Path) -> Path:
    """Where a save of ``path`` is written before it is published."""
    return path.with_name(f".{path.name}.partial")


def write_file(path: str | os.PathLike[str], payload: Any) -> Path:
    """``torch.save`` ``payload`` to ``path`` atomically (write aside, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def publish_directory(path: Path) -> None:
    """Rename a complete ``.name.partial`` directory to ``path``. A directory cannot be renamed
    over another, so an existing one is first moved to ``.name.old`` (which ``lt.load`` falls
    back to if a crash comes between the two renames) and removed once the new one is in place."""
    tmp = partial_path(path)
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        os.replace(path, old)  # keep the previous until the new one is in place
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_file(path: str | os.PathLike[str], *, mmap: bool = True) -> Any:
    """``torch.load`` with ``weights_only=True`` and ``mmap`` (tensors paged in lazily), with
    errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"refusing to load {str(path)!r}: it holds Python objects other than tensors and plain "
            f"data, which could run code when unpickled (loaded with weights_only=True). Only load "
            f"it if you trust its source, with torch.load(path, weights_only=False). ({error})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        if mmap and "mmap" in str(error):  # an old-format (not zip) file cannot be mapped
            return read_file(path, mmap=False)
        raise RuntimeError(
            f"checkpoint file {str(path)!r} is truncated or corrupt and cannot be read ({error}); "
            f"load an earlier checkpoint"
        ) from error


def safe_unpickler(allowed: Callable[[str, str], bool]) -> type[pickle.Unpickler]:
    """An ``Unpickler`` class that refuses any global ``allowed(module, name)`` rejects."""

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if not allowed(module, name):
                raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
            return super().find_class(module, name)

    return Restricted


STEP_DIR = re.compile(r"^step-(\d+)$")


def resolve(path: str | os.PathLike[str]) -> Path:
    """A checkpoint path; a directory of ``step-N`` checkpoints resolves to the latest one."""
    path = Path(path)
    if path.is_dir() and not (path / "common.pt").exists():
        found = latest(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {str(path)!r} (no complete step-N directory)")
        return found
    if not path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.is_dir():  # killed between the two renames of publish_directory: the previous one
            return old
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


def latest(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete ``step-N`` checkpoint in ``directory`` (partial saves are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_DIR.match(p.name))]
    return max(steps)[1] if steps else None
