"""Checkpoint paths on disk: publishing a sharded directory atomically, finding the latest ``step-N``,
and removing what killed saves left behind.

A save never overwrites the last good checkpoint in place: it writes ``.name.partial`` next to
the target and renames it over the target only when complete, so a process killed mid-save
leaves the previous file (or directory) as it was. Files themselves are read and written by
``ltransform.io``.

What a killed save can leave, and why each is safe to read and to remove:

- ``.name.partial``: an unfinished write; never read. The next save of ``name`` starts by
  removing it (a full save's file is simply overwritten); ``checkpoint_sharded`` removes those
  of other steps once no save to its directory is in progress.
- ``.name.old``: the previous checkpoint, moved aside by :func:`publish_directory` while the new
  one is renamed into place. Dead once ``name`` exists (``name`` only ever appears by a rename of
  a complete save); while ``name`` is missing it *is* the last good checkpoint, so ``lt.load``
  and :func:`latest` read it and the next save restores or replaces it. It is removed in full
  before ``name`` can disappear again, so a half-removed ``.old`` is never the only copy.
- ``.name.dead``: a ``step-N`` being pruned (renamed first, so a half-removed one never looks
  published).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from ltransform.io import fsync_dir, partial_path

STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^\.(step-\d+)\.(partial|old|dead)$")


def old_path(path: Path) -> Path:
    """Where :func:`publish_directory` keeps the previous checkpoint while the new one moves in."""
    return path.with_name(f".{path.name}.old")


def publish_directory(path: Path) -> None:
    """Rename a complete ``.name.partial`` directory to ``path``.

    A directory cannot be renamed over another, so an existing one is first moved to
    ``.name.old`` (which ``lt.load`` falls back to if a crash comes between the two renames) and
    removed once the new one is in place. A ``.name.old`` left by a killed save never blocks
    this: it is removed if ``path`` exists (then it is dead), else ``path`` is published over
    its absence and the ``.old`` (the previous checkpoint until now) removed after.
    """
    tmp, old = partial_path(path), old_path(path)
    if old.exists() and path.exists():
        remove(old)  # completely, before path is moved aside: a half-removed .old is never the only copy
    if path.exists():
        os.replace(path, old)  # keep the previous until the new one is in place
    os.replace(tmp, path)
    fsync_dir(path.parent)
    remove(old)


def remove(path: Path) -> None:
    """Remove a file or a directory tree if it exists (errors other than its absence propagate)."""
    if path.is_dir() and not path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(directory: str | os.PathLike[str], *, pattern: re.Pattern[str] = _LEFTOVER) -> list[str]:
    """Clean a ``step-N`` directory of what killed saves left: ``.step-N.partial`` and
    ``.step-N.dead`` are removed; a ``.step-N.old`` is removed if ``step-N`` exists, else renamed
    back to ``step-N`` (it is the last good checkpoint of that step).

    Call it only when no save to ``directory`` is in progress, on one rank (``checkpoint_sharded``
    does: rank 0, after the previous save of its state finished and a barrier).

    Args:
        directory: the directory of ``step-N`` checkpoints.
        pattern: what a leftover's name is: group 1 the checkpoint's name, group 2 ``partial``,
            ``old`` or ``dead`` (default: ``.step-N.*``; ``lt.checkpoint_best`` passes its
            ``.best-step-N.*``).

    Returns:
        The names removed or restored (for logs and tests).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    cleaned = []
    for entry in sorted(directory.iterdir()):
        match = pattern.match(entry.name)
        if match is None:
            continue
        target = directory / match.group(1)
        if match.group(2) == "old" and not target.exists():
            os.replace(entry, target)  # killed between publish_directory's renames: roll back
        else:
            remove(entry)
        cleaned.append(entry.name)
    if cleaned:
        fsync_dir(directory)
    return cleaned


def prune(directory: str | os.PathLike[str], keep: int) -> list[str]:
    """Remove all but the newest ``keep`` published ``step-N`` checkpoints of ``directory``.

    Partial saves are never counted. Each is renamed to ``.step-N.dead`` first, so a prune that
    is killed half-way never leaves a half-removed checkpoint that looks published.

    Returns:
        The names of the checkpoints removed.
    """
    directory = Path(directory)
    steps = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_DIR.match(p.name)))
    for _, path in steps[:-keep]:
        remove(old_path(path))  # before path goes: see the module docstring
        dead = path.with_name(f".{path.name}.dead")
        remove(dead)
        os.replace(path, dead)
        remove(dead)
    return [p.name for _, p in steps[:-keep]]


def resolve(path: str | os.PathLike[str]) -> Path:
    """A checkpoint path; a directory of ``step-N`` checkpoints resolves to the latest one."""
    path = Path(path)
    if path.is_dir() and not (path / "common.pt").exists():
        found = latest(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {str(path)!r} (no complete step-N directory)")
        return found
    if not path.exists():
        old = old_path(path)
        if old.is_dir():  # killed between the two renames of publish_directory: the previous one
            return old
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


def latest(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete ``step-N`` checkpoint in ``directory`` (partial saves are ignored).

    A ``.step-N.old`` stands for ``step-N`` when a save was killed between the two renames that
    publish a new ``step-N`` over an old one.

    Example:
        >>> import tempfile, ltransform as lt
        >>> lt.latest_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found: dict[int, Path] = {}
    for entry in directory.iterdir():
        if m := STEP_DIR.match(entry.name):
            found[int(m.group(1))] = entry
        elif (m := _LEFTOVER.match(entry.name)) and m.group(2) == "old" and entry.is_dir():
            found.setdefault(int(m.group(1)[len("step-"):]), entry)
    return found[max(found)] if found else None
