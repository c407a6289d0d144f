"""``lt.checkpoint_sharded``: ``step-N`` sharded checkpoints in a directory, as a call or a hook."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ltransform.checkpoint import files
from ltransform.checkpoint.api import finish_pending, save
from ltransform.core.compose import MISSING
from ltransform.core.state import read_counters
from ltransform.distributed import env


def checkpoint_sharded(state: Any = MISSING, /, dir: Any = MISSING, *, keep: int | None = None,
                       async_save: bool = False, filter: Any = None) -> Any:
    """Save ``state`` as a sharded checkpoint ``dir/step-N`` (N = ``state.step``); returns the state.

    Without ``state`` it is the same saver as a hook for ``lt.run``:
    ``hooks=[lt.every(500, lt.checkpoint_sharded(dir="ckpt/", keep=3))]``, and
    ``lt.run(..., resume="latest")`` then continues from the newest one.

    Args:
        state: the training state; omit it for the hook form.
        dir: the directory holding the ``step-N`` checkpoints.
        keep: keep only the newest ``keep`` checkpoints (None: all); saves in progress or
            killed half-way are never counted.
        async_save: write in the background (the next optimizer step waits for it).
        filter: keep only some model entries, as for ``lt.save`` (e.g. the adapters of a
            4-bit model, ``filter=lambda name, t: ".adapter." in name``); load such a
            checkpoint with ``lt.load(..., strict=False)``.

    Each call first removes what killed saves left in ``dir`` (``.step-N.partial`` directories,
    a stale ``.step-N.old``; see ``ltransform.checkpoint.files``): rank 0 does it once every rank
    is here and this state's previous save is finished, so no save to ``dir`` is in progress.
    Note: one run writes to one directory; two states saving asynchronously into the same
    directory from one process are not supported.

    Example:
        >>> import tempfile, torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> root = tempfile.mkdtemp()
        >>> _ = lt.checkpoint_sharded(state, root)
        >>> lt.latest_checkpoint(root).name
        'step-00000000'
    """
    if dir is MISSING and not (state is MISSING or hasattr(state, "step") or isinstance(state, Mapping)):
        state, dir = MISSING, state
    if dir is MISSING:
        raise TypeError("checkpoint_sharded: give the directory, dir='ckpt/'")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"checkpoint_sharded: keep must be a positive int or None, got {keep!r}")
    if state is MISSING:
        return _Saver(Path(dir), keep, async_save, filter)
    return _Saver(Path(dir), keep, async_save, filter)(state)


class _Saver:
    """``checkpoint_sharded`` bound to a directory: a ``state -> state`` hook."""

    writes_files = True  # left out of a dry run

    def __init__(self, dir: Path, keep: int | None, async_save: bool, filter: Any = None) -> None:
        self.checkpoint_dir, self.keep, self.async_save, self.filter = dir, keep, async_save, filter
        self.__name__ = f"checkpoint_sharded(dir={str(dir)!r})"

    def __repr__(self) -> str:
        return self.__name__

    def __call__(self, state: Any, run: Any = None) -> Any:
        path = self.checkpoint_dir / f"step-{read_counters(state)[0]:08d}"
        finish_pending(state)  # this state's previous async save publishes first
        env.barrier()  # every rank is done writing earlier saves: any partial left is dead
        if env.rank() == 0:
            files.remove_leftovers(self.checkpoint_dir)
        save(path, state, sharded=True, async_save=self.async_save, run=run, filter=self.filter)
        if self.keep is not None and env.rank() == 0:  # published ones only; a pending one is not yet
            files.prune(self.checkpoint_dir, self.keep)
        return state
