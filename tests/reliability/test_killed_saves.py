"""kill -9 during checkpoint saves: the newest published checkpoint always loads and equals what was
saved, the next save always works, and it leaves nothing behind.

Three kinds of save: a full file (``lt.save(path)``), a sharded directory saved again and again to
the same path (``lt.save(dir, sharded=True)``), and ``lt.checkpoint_sharded(keep=2)`` (every other
trial with ``async_save``). A child process, forked so that a trial takes milliseconds, trains a
tiny model whose every parameter equals the step (SGD, lr 1, gradient -1: exact in float) and saves
after each step; it is SIGKILLed either after a random delay, or just before its N-th file system
operation (rename, unlink, rmdir, mkdir) for every N, which reaches every crash window of a save,
including the one between the two renames that publish a directory over an old one.
``tests/benchmarks/killed_saves.py`` runs 100 random trials per kind.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import ltransform as lt
from ltransform.checkpoint.api import finish_pending

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

MODES = ("full", "sharded", "keep")
KEEP = 2


def _state(value: float, step: int) -> lt.State:
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), step=step)


def _target(mode: str, root: Path) -> Path:
    return {"full": root / "ckpt.pt", "sharded": root / "ckpt", "keep": root}[mode]


def _save(mode: str, root: Path, state: lt.State, async_save: bool = False) -> None:
    if mode == "keep":
        lt.checkpoint_sharded(state, root, keep=KEEP, async_save=async_save)
    else:
        lt.save(_target(mode, root), state, sharded=mode == "sharded")


def _arm(kill_at: int) -> None:
    """SIGKILL this process just before its ``kill_at``-th file system mutation."""
    count = 0
    for name in ("replace", "rename", "unlink", "rmdir", "mkdir"):
        def wrapped(*args: Any, _real: Any = getattr(os, name), **kwargs: Any) -> Any:  # noqa: B008 - bound per name
            nonlocal count
            count += 1
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)
        setattr(os, name, wrapped)


def _child(mode: str, root: Path, published: Any, async_save: bool, kill_at: int | None) -> None:
    """Train and save step after step until killed (or save three, the third armed, and exit)."""
    try:
        torch.set_num_threads(1)
        warnings.simplefilter("ignore")  # DCP's one-process notices
        state = _state(float(published.value), published.value)
        while True:
            if kill_at is not None and state.step == 2:  # armed for the third save, which prunes
                _arm(kill_at)
            for p in state.model.parameters():
                p.grad = torch.full_like(p, -1.0)
            state.optimizer.step()  # waits for (and publishes) a pending async save
            if async_save and state.step > published.value:
                published.value = state.step
            state = lt.State(model=state.model, optimizer=state.optimizer, step=state.step + 1)
            _save(mode, root, state, async_save)
            if not async_save:
                published.value = state.step
            if kill_at is not None and state.step == 3:
                finish_pending(state)
                published.value = state.step
                os._exit(0)
    except BaseException:  # noqa: BLE001 - printed; the test reads the exit code
        traceback.print_exc()
        os._exit(1)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@dataclass
class Outcome:
    """What one trial found. ``lost``: the newest published checkpoint did not load or differed."""

    mode: str
    killed: bool
    published: int = 0
    loaded: int = -1
    lost: str | None = None
    blocked: str | None = None
    left_by_kill: list[str] = field(default_factory=list)
    left_after_next_save: list[str] = field(default_factory=list)


def trial(mode: str, root: Path, *, delay: float | None = None, kill_at: int | None = None,
          async_save: bool = False) -> Outcome:
    """Kill a saving child after ``delay`` seconds or at its ``kill_at``-th file operation, then
    load the newest checkpoint, save the next step over what the kill left, and look for leftovers."""
    root.mkdir(parents=True)
    _save(mode, root, _state(0.0, 0))
    context = multiprocessing.get_context("fork")
    published = context.Value("i", 0, lock=False)
    child = context.Process(target=_child, args=(mode, root, published, async_save, kill_at), daemon=True)
    child.start()
    try:
        if delay is not None:
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=60)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    if child.exitcode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"the saving child failed (exit code {child.exitcode}); see its traceback above")
    outcome = Outcome(mode, child.exitcode != 0, published.value, left_by_kill=_leftovers(root))
    state = _state(-1.0, 0)
    try:
        state = lt.load(_target(mode, root), state)
        outcome.loaded = state.step
        if not outcome.published <= state.step <= outcome.published + 1:
            outcome.lost = f"loaded step {state.step}, published {outcome.published}"
        elif not all(bool((p == state.step).all()) for p in state.model.parameters()):
            outcome.lost = f"step {state.step} holds other values than were saved"
    except Exception as error:  # noqa: BLE001 - tallied, and the test shows it
        outcome.lost = f"{type(error).__name__}: {error}"
    following = max(outcome.loaded, outcome.published) + 2  # not the step a killed save was writing
    try:
        _save(mode, root, _state(float(following), following))
        again = lt.load(_target(mode, root), _state(-1.0, 0))
        if again.step != following or not all(bool((p == following).all()) for p in again.model.parameters()):
            outcome.blocked = f"the next save (step {following}) did not load back equal"
    except Exception as error:  # noqa: BLE001
        outcome.blocked = f"{type(error).__name__}: {error}"
    outcome.left_after_next_save = _leftovers(root)
    if mode == "keep":
        steps = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        if len(steps) > KEEP:
            outcome.left_after_next_save.append(f"{len(steps)} checkpoints kept: {steps}")
    return outcome


def random_trials(mode: str, root: Path, n: int, seed: int = 0, max_delay: float = 0.15) -> list[Outcome]:
    """``n`` trials killed at random moments (``checkpoint_sharded``: every other one async)."""
    rng = random.Random(seed)
    return [trial(mode, root / f"trial-{i}", delay=rng.uniform(0.01, max_delay),
                  async_save=mode == "keep" and i % 2 == 1) for i in range(n)]


def every_operation(mode: str, root: Path, async_save: bool = False) -> list[Outcome]:
    """One trial per file system operation of one save: killed just before the 1st, the 2nd, ...
    until a save completes unkilled."""
    outcomes = []
    while not outcomes or outcomes[-1].killed:
        outcomes.append(trial(mode, root / f"op-{len(outcomes) + 1}", kill_at=len(outcomes) + 1,
                              async_save=async_save))
    return outcomes


def tally(outcomes: list[Outcome]) -> dict[str, int]:
    return dict(Counter(trials=len(outcomes), killed=sum(o.killed for o in outcomes),
                        killed_mid_save=sum(bool(o.left_by_kill) for o in outcomes),
                        lost=sum(o.lost is not None for o in outcomes),
                        blocked=sum(o.blocked is not None for o in outcomes),
                        leftovers=sum(bool(o.left_after_next_save) for o in outcomes)))


def _assert_nothing_lost(outcomes: list[Outcome]) -> None:
    bad = [o for o in outcomes if o.lost or o.blocked or o.left_after_next_save]
    assert not bad, "\n".join(map(repr, bad))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_kill_9_at_random_moments_loses_no_checkpoint_and_blocks_no_save(mode, tmp_path):
    outcomes = random_trials(mode, tmp_path, 10, seed=MODES.index(mode))
    _assert_nothing_lost(outcomes)
    assert all(o.killed for o in outcomes)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode,async_save", [(m, False) for m in MODES] + [("keep", True)])
def test_kill_9_before_every_file_operation_of_a_save(mode, async_save, tmp_path):
    outcomes = every_operation(mode, tmp_path, async_save)
    _assert_nothing_lost(outcomes)
    assert sum(o.killed for o in outcomes) >= 2
    if mode != "full":  # killed after the first publishing rename: .old (or .dead) seen, then cleaned
        assert any(name.endswith((".old", ".dead")) for o in outcomes for name in o.left_by_kill)


def test_stale_leftovers_never_block_and_the_next_save_removes_them(tmp_path):
    """What earlier kills left (found by fault injection): a .old next to its directory blocked
    every later save with 'Directory not empty'; partials of other steps piled up."""
    lt.save(tmp_path / "ckpt", _state(1.0, 1), sharded=True)
    (tmp_path / ".ckpt.old").mkdir()
    (tmp_path / ".ckpt.old" / "junk").write_text("x")
    lt.save(tmp_path / "ckpt", _state(2.0, 2), sharded=True)
    assert _leftovers(tmp_path) == [] and lt.load(tmp_path / "ckpt", _state(0.0, 0)).step == 2

    root = tmp_path / "run"
    for step in (1, 2):
        lt.checkpoint_sharded(_state(float(step), step), root, keep=KEEP)
    for step in (3, 4, 5):
        (root / f".step-{step:08d}.partial" / "sub").mkdir(parents=True)  # saves killed half-way
    (root / ".step-00000001.dead").mkdir()  # a prune killed half-way
    os.replace(root / "step-00000002", root / ".step-00000002.old")  # killed between two renames
    assert lt.latest_checkpoint(root).name == ".step-00000002.old"  # the last good one still loads
    assert lt.load(root, _state(0.0, 0)).step == 2
    lt.checkpoint_sharded(_state(6.0, 6), root, keep=KEEP)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000006"]


def test_an_async_save_in_progress_is_not_a_leftover(tmp_path):
    state = _state(1.0, 1)
    lt.checkpoint_sharded(state, tmp_path, keep=KEEP, async_save=True)
    pending = _leftovers(tmp_path)
    lt.checkpoint_sharded(lt.State(model=state.model, optimizer=state.optimizer, step=2), tmp_path, keep=KEEP)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000002"]
    assert pending in ([], [".step-00000001.partial"])


def _two_rank_saves(root: str) -> list[dict]:
    """Both ranks save a sharded model with ``checkpoint_sharded(keep=2, async_save=True)`` into a
    directory where a killed earlier run left partials; rank 0 alone removes them."""
    root = Path(root)
    if lt.rank() == 0:
        (root / ".step-00000002.partial" / "rank-1.pt").parent.mkdir(parents=True)
        (root / ".step-00000002.partial" / "rank-1.pt").write_bytes(b"killed")
        (root / ".step-00000009.partial").mkdir()
    model = lt.shard(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    saver = lt.checkpoint_sharded(dir=root, keep=KEEP, async_save=True)
    for step in range(1, 5):
        for p in model.parameters():
            p.grad = torch.full_like(p, -1.0)
        state.optimizer.step()  # waits for the previous async save
        state = saver(lt.State(model=model, optimizer=state.optimizer, step=step))
    lt.barrier()  # a collective while an async save is being written (DCP's writer has a group of its own)
    before_last_publish = sorted(p.name for p in root.iterdir()) if lt.rank() == 0 else None
    finish_pending(state)
    loaded = lt.load(root, lt.State(model=model, optimizer=state.optimizer))
    mine = {"names": before_last_publish, "loaded": loaded.step,
            "equal": all(bool((p.to_local() == 4).all()) for p in model.parameters())}
    gathered = [None] * lt.world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


@pytest.mark.timeout(180)
def test_two_ranks_on_a_shared_directory_remove_what_a_killed_run_left(tmp_path):
    ranks = lt.launch(_two_rank_saves, str(tmp_path), devices=2, start_method="fork")  # no re-imports
    # step 4 still being written (async); keep=2 published ones; the killed run's partials gone
    assert ranks[0]["names"] == [".step-00000004.partial", "step-00000002", "step-00000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003", "step-00000004"]
    assert all(result["loaded"] == 4 and result["equal"] for result in ranks)
