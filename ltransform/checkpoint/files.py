"""Checkpoint paths on disk: publishing a sharded directory atomically, finding the latest ``step-N``.

A save never overwrites the last good checkpoint in place: it writes ``.name.partial`` next to
the target and renames it over the target only when complete, so a process killed mid-save
leaves the previous file (or directory) as it was. Files themselves are read and written by
``ltransform.io``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ltransform.io import fsync_dir, partial_path


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
    fsync_dir(path.parent)


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
