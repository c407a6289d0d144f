"""``lt.checkpoint_best``: the checkpoints of the K best values of a monitored metric, and the last.

Layout of ``dir``: ``step-N`` is the last save (the newest state; only one is kept, and
``lt.run(resume="latest")`` finds it, as it finds ``lt.checkpoint_sharded``'s), ``best-step-N``
are the K best, and ``best.json`` records them best first with their values::

    {"monitor": "val_loss", "mode": "min", "last": "step-00000012",
     "best": [{"path": "best-step-00000006", "step": 6, "value": 3.0}, ...]}

A best checkpoint is the last one of its step linked under a second name (hard links: no
second write; a copy where the file system has none). Every file appears by a rename of a
complete one, so a process killed mid-save leaves the previous checkpoints and manifest intact;
what it leaves half-written is removed at the next start.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ltransform.checkpoint import files
from ltransform.distributed import env
from ltransform.io import _write_atomic, fsync_dir, partial_path
from ltransform.runner.hooks import say
from ltransform.runner.hooks.quality import Monitor, Watch, check_monitor, positive

MANIFEST = "best.json"
_BEST = re.compile(r"^best-step-(\d+)$")
_BEST_LEFTOVER = re.compile(r"^\.(best-step-\d+)\.(partial|old|dead)$")


class CheckpointBest:
    writes_files = True  # left out of a dry run
    """``lt.checkpoint_best``'s hook; see :func:`checkpoint_best`."""

    def __init__(self, dir: Path, monitor: Monitor, top_k: int, last: bool, sharded: bool) -> None:
        self.dir, self.top_k, self.last, self.sharded = dir, top_k, last, sharded
        self.watch = Watch(monitor, "lt.checkpoint_best")
        self.__name__ = f"checkpoint_best(dir={str(dir)!r}, monitor={monitor.name!r})"
        # resume="latest" and preemption saves find the last checkpoint through this
        self.checkpoint_dir = dir if last else None
        self.saver = self.save_last if last else None
        self.best: list[dict[str, Any]] = []  # {"path", "step", "value"}, best first
        self.saved_at = self.started_at = -1

    @property
    def best_path(self) -> Path | None:
        """The best checkpoint so far (None before the first)."""
        return self.dir / self.best[0]["path"] if self.best else None

    def next_step(self, step: int) -> float:
        return self.watch.next_step(step)

    def start(self, state: Any, run: Any) -> None:
        self.watch.start(run)
        self.saved_at, self.started_at = -1, run.step
        found: Any = None
        if env.rank() == 0:
            try:
                found = self._take_over(run.step)
            except Exception as error:  # noqa: BLE001  (raised on every rank, not only where dir is read)
                found = _Failure(error)
        self.best = _agreed(env.broadcast(found)) or []

    def __call__(self, state: Any, run: Any) -> None:
        value = self.watch.read(run)
        if value is not None:
            self._save(state, run, value)

    epoch_end = __call__

    def end(self, state: Any, run: Any) -> None:
        self(state, run)  # a value logged at the end (the final log point)
        if self.last and run.step > self.started_at and run.step != self.saved_at:
            self.save_last(state, run)  # the final state (also what a preemption saves)

    def save_last(self, state: Any, run: Any) -> None:
        """Save ``state`` as the last checkpoint (unless this step's is saved already)."""
        if run.step != self.saved_at:
            self._save(state, run, math.nan)

    def _save(self, state: Any, run: Any, value: float) -> None:
        """Save the last checkpoint (if kept), and ``value``'s best one if it ranks in the top K."""
        from ltransform.checkpoint.api import save

        now, monitor = run.step, self.watch.monitor
        ranks = not math.isnan(value) and (len(self.best) < self.top_k or _key(monitor, value, now) <
                                           _key(monitor, self.best[-1]["value"], self.best[-1]["step"]))
        if not (self.last or ranks):
            return
        name = f"best-step-{now:08d}"
        target = self.dir / (f"step-{now:08d}" if self.last else name)
        save(target, state, sharded=self.sharded, run=run)  # every rank: a collective
        self.saved_at = now
        dropped: list[dict[str, Any]] = []
        if ranks:
            entries = [*self.best, {"path": name, "step": now, "value": value}]
            entries.sort(key=lambda e: _key(monitor, e["value"], e["step"]))
            self.best, dropped = entries[:self.top_k], entries[self.top_k:]
        failed = None
        if env.rank() == 0:
            try:
                if ranks and self.last:
                    _link(target, self.dir / name)
                self._write_manifest(f"step-{now:08d}" if self.last else None)
                for entry in dropped:
                    _remove(self.dir / entry["path"])
                if self.last:
                    files.prune(self.dir, 1)
            except Exception as error:  # noqa: BLE001  (every rank raises it, none waits for rank 0)
                failed = _Failure(error)
        # the directory is as the manifest says on every rank's return (one collective, as a barrier)
        _agreed(env.broadcast(failed) if env.world_size() > 1 else failed)

    def _take_over(self, start: int) -> list[dict[str, Any]]:  # (rank 0)
        """Rank 0, at the start: the best checkpoints ``dir`` holds up to step ``start`` (a resumed
        run goes on ranking against them); those of later steps (an earlier run into ``dir``, or
        one that went on after the checkpoint resumed from) and what killed saves left, removed."""
        if not self.dir.is_dir():
            return []
        files.remove_leftovers(self.dir)
        files.remove_leftovers(self.dir, pattern=_BEST_LEFTOVER)
        kept, removed = [], []
        saved = _read_manifest(self.dir / MANIFEST)
        monitor = self.watch.monitor
        if saved and (saved.get("monitor"), saved.get("mode")) != (monitor.name, monitor.mode):
            raise ValueError(f"lt.checkpoint_best: {str(self.dir)!r} holds the best checkpoints by "
                             f"{saved.get('monitor')!r} ({saved.get('mode')}); this hook ranks by {monitor.name!r} "
                             f"({monitor.mode}); give it another directory")
        earlier = sorted(p.name for p in self.dir.iterdir()
                         if (m := _BEST.match(p.name) or files.STEP_DIR.match(p.name)) and int(m.group(1)) > start)
        if start == 0 and earlier:  # a new run: what is there is another run's, and nothing is deleted
            raise ValueError(f"lt.checkpoint_best: {str(self.dir)!r} holds another run's checkpoints "
                             f"({', '.join(earlier[:3])}{', ...' if len(earlier) > 3 else ''}); continue that run "
                             f"(lt.run(..., resume='latest')), or give this one another directory")
        listed = {e["path"] for e in saved.get("best", [])} if saved else set()
        for entry in saved.get("best", []) if saved else []:
            if entry["step"] <= start and (self.dir / entry["path"]).exists():
                kept.append(entry)
        for path in sorted(self.dir.iterdir()):
            match = _BEST.match(path.name) or files.STEP_DIR.match(path.name)
            if match and (int(match.group(1)) > start or (path.name.startswith("best") and path.name not in listed)):
                _remove(path)
                removed.append(path.name)
        if removed:
            say(f"lt.checkpoint_best: removed {', '.join(removed)} from {str(self.dir)!r}: checkpoints of steps after "
                f"this run's start (step {start}) or not in its {MANIFEST}, from another run or a killed save")
        kept.sort(key=lambda e: _key(monitor, e["value"], e["step"]))
        self.best = kept[:self.top_k]
        for entry in kept[self.top_k:]:
            _remove(self.dir / entry["path"])
        last = files.latest(self.dir)
        self._write_manifest(None if last is None else last.name)
        return self.best

    def _write_manifest(self, last: str | None) -> None:
        monitor = self.watch.monitor
        text = json.dumps({"monitor": monitor.name, "mode": monitor.mode, "last": last, "best": self.best}, indent=1)

        def write(tmp: Path) -> None:
            tmp.write_text(text + "\n")

        _write_atomic(self.dir / MANIFEST, write)


def _key(monitor: Monitor, value: float, step: int) -> tuple[float, int]:
    """Sort key, best first; a tie goes to the earlier step."""
    return (value if monitor.mode == "min" else -value), step


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ValueError(f"lt.checkpoint_best: {str(path)!r} cannot be read ({error}); it is corrupt: remove it "
                         f"(the best checkpoints it lists are then forgotten and removed)") from error
    return saved if isinstance(saved, dict) else None


def _link(source: Path, target: Path) -> None:
    """``target``: the checkpoint ``source`` (file or directory) under a second name, published atomically."""
    tmp = partial_path(target)
    _remove(tmp)
    if source.is_dir():
        tmp.mkdir()
        for file in source.iterdir():
            _link_file(file, tmp / file.name)
        files.publish_directory(target)
    else:
        _link_file(source, tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)


def _link_file(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # no hard links here (some network or FUSE file systems): a copy
        shutil.copy2(source, target)


def _remove(path: Path) -> None:
    """Remove a checkpoint; renamed first, so a removal killed half-way never leaves one that looks whole."""
    if not path.exists():
        return
    dead = path.with_name(f".{path.name}.dead")
    files.remove(dead)
    os.replace(path, dead)
    files.remove(dead)


def checkpoint_best(dir: str | os.PathLike[str], *, monitor: str = "val_loss", mode: str = "min",
                    top_k: int = 1, last: bool = True, sharded: bool = True) -> CheckpointBest:
    """A hook that keeps the checkpoints of the ``top_k`` best values of ``monitor`` and the last.

    At each fresh value of ``monitor`` (where it is logged: evaluation for ``val_*`` names, log
    points for training metrics; as for :func:`lt.early_stopping <ltransform.early_stopping>`)
    it saves the state as ``dir/step-N`` (the last; the previous one is removed), and if the
    value ranks among the ``top_k`` best (lower for ``mode="min"``; a tie goes to the earlier
    step) also as ``dir/best-step-N``, removing the one that drops out. ``dir/best.json`` lists
    the best, best first, with their steps and values; the hook's ``best_path`` is the best.
    At the end of the run the final state is saved as the last too.

    ``lt.run(..., resume="latest")`` resumes from the last checkpoint (the newest ``step-N``,
    found as ``lt.checkpoint_sharded``'s are), and a preemption saves it there. A resumed run goes
    on ranking against the best checkpoints of steps up to the one it resumed from; ``dir``'s
    checkpoints of later steps (the continuation it replaces) are removed at the start, with a
    message. A new run (from step 0) into a directory holding another run's checkpoints is
    refused: nothing is deleted.

    Args:
        dir: a directory of its own for these checkpoints.
        monitor: the logged name to rank by (``"val_loss"``, ``"val_acc"``, ``"loss"``).
        mode: ``"min"`` (lower is better) or ``"max"``.
        top_k: how many best checkpoints to keep.
        last: also keep the last checkpoint (saved at every fresh value and at the end). False:
            save only values that rank among the best (and resume="latest" cannot find them).
        sharded: save sharded checkpoints (a DCP directory, each rank writing its part) or, if
            False, one full file (gathered to rank 0); see ``lt.save``.

    Returns:
        The hook, for ``lt.run(..., hooks=[...])``.

    Raises:
        ValueError: a bad option; ``dir`` holds best checkpoints ranked by another monitor; and
            as ``lt.early_stopping`` does for a monitor that is not logged.

    Example:
        >>> import json, tempfile, torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> data = [torch.randn(4, 2) for _ in range(4)]
        >>> best = lt.checkpoint_best(tempfile.mkdtemp(), monitor="val_loss", top_k=2)
        >>> state = lt.run(lt.train_step(lambda m, b: m(b).pow(2).mean()), state, data, progress=False,
        ...                eval_step=lt.eval_step(lambda m, b: m(b).pow(2).mean()), eval_data=data, eval_every=1,
        ...                hooks=[best])
        >>> manifest = json.loads((best.dir / "best.json").read_text())
        >>> [e["step"] for e in manifest["best"]] == [e["step"] for e in best.best]
        True
        >>> best.best_path.name.startswith("best-step-"), len(best.best)
        (True, 2)

    Note:
        Saves are collective: every rank calls them, at the same steps (the values are averaged
        across ranks). Asynchronous saves are not offered here (use ``lt.checkpoint_sharded``).
    """
    call = "lt.checkpoint_best"
    for option, value in (("last", last), ("sharded", sharded)):
        if not isinstance(value, bool):
            raise TypeError(f"{call}: {option} must be True or False, got {value!r}")
    return CheckpointBest(Path(dir), check_monitor(call, monitor, mode), positive(call, "top_k", top_k), last, sharded)


class _Failure:
    """Rank 0's error in its part of a collective save, sent to every rank (a picklable message)."""

    def __init__(self, error: BaseException) -> None:
        self.kind = ValueError if isinstance(error, ValueError) else RuntimeError
        self.message = str(error) if isinstance(error, ValueError) else \
            f"lt.checkpoint_best: rank 0 failed: {type(error).__name__}: {error}"


def _agreed(value: Any) -> Any:
    """``value``, or rank 0's error raised (on every rank alike)."""
    if isinstance(value, _Failure):
        raise value.kind(value.message)
    return value
