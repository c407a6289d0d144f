"""``lt.run``: iterate a step over data, with progress, logging, evaluation and hooks."""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ltransform.core.binding import bound_to, sees_counters
from ltransform.core.inventory import inventory
from ltransform.core.state import read_counters, read_epoch, set_field, with_counters
from ltransform.core.step import TransformedStep, as_step
from ltransform.distributed import env
from ltransform.distributed.preemption import Preempted, Preemption, Watch
from ltransform.runner.data import check_same_length, per_rank, set_epoch
from ltransform.runner.metrics import evaluate_all, mean_across_ranks, to_floats
from ltransform.core.position import RUNNING, Position
from ltransform.runner.hooks import apply_hook, bind_hook

Logger = Callable[[Mapping[str, float], int], Any]


def run(
    step: Any,
    state: Any,
    data: Iterable[Any],
    *,
    max_steps: int | None = None,
    max_epochs: int | None = None,
    log_every: int | None = 50,
    loggers: Iterable[Logger] = (),
    eval_step: Any = None,
    eval_data: Iterable[Any] | None = None,
    eval_every: int | None = None,
    hooks: Iterable[Callable[..., Any]] = (),
    progress: bool = True,
    distributed_sampler: bool = True,
    resume: str | os.PathLike[str] | None = None,
    preemption: Preemption | None = Preemption(),
) -> Any:
    """Train: call ``step(state, batch)`` over ``data`` until ``max_steps`` or ``max_epochs``.

    Steps are counted in optimizer updates (``state.step``); under accumulation several
    batches make one step. ``max_steps`` and ``max_epochs`` are totals, read against the
    state's counters, so a resumed state continues towards the same end. Metrics stay
    tensors except at log points, where they are converted once and handed to each logger.
    Interrupting (Ctrl-C) returns the state so far. A preemption signal (SIGTERM by default,
    see ``preemption``) finishes the step, saves a checkpoint and exits the process with code
    143 (128 + the signal's number). On several ranks, metrics are averaged
    across ranks at log points (one collective each) and only rank 0 shows progress and calls
    the loggers.

    Args:
        step: a step function or transformed step.
        state: the initial state (``lt.State``, a dict, or an attrs/dataclass with counters).
        data: a re-iterable of batches (a list or ``DataLoader``), one pass per epoch.
        max_steps: stop after this many optimizer steps.
        max_epochs: stop after this many passes over ``data`` (default 1 if no ``max_steps``).
        log_every: log every this many optimizer steps (and at the end); None disables.
        loggers: callables ``(metrics: dict[str, float], step: int)``, e.g. ``lt.CSVLogger``.
        eval_step: a step (e.g. ``lt.eval_step(fn)``) run over ``eval_data``, models in eval mode.
        eval_data: batches for evaluation; metrics are averaged and logged with a ``val_`` prefix.
        eval_every: evaluate every this many optimizer steps; None: at the end of each epoch.
        hooks: functions ``(state) or (state, metrics) -> state | None | lt.stop(...)`` run
            after each optimizer step, e.g. ``lt.every(100, fn)``. On several ranks a hook
            runs on every rank and must decide to stop from values that agree across ranks
            (the step, ``val_*`` metrics, which are averaged), not from a rank's own loss.
        progress: show a tqdm progress bar (terminal or Jupyter); on rank 0 only.
        distributed_sampler: on several ranks, give a ``DataLoader`` (``data`` and
            ``eval_data``) a ``DistributedSampler`` so each rank sees its own part; False if
            your data is already per rank. Other iterables are always taken as per rank; when
            they have a length it must be the same on every rank (checked once), since a rank
            with an extra batch would wait forever for the others.
        resume: continue from a checkpoint: a path (file, sharded directory, or a directory
            of ``step-N`` ones), or ``"latest"``: the newest in the directory of the run's
            ``lt.checkpoint_sharded`` hook (none there yet: start from the beginning). The
            state is loaded after the step is prepared, and the data continues where it was
            (a shuffled ``DataLoader`` replays the same order and skips the batches done), so
            N steps, a stop and a resume give the same parameters as 2N uninterrupted.
        preemption: what a preemption signal does (``lt.Preemption``; default: on SIGTERM).
            Every rank stops after the same optimizer step, the run's checkpoint hook
            (``lt.checkpoint_sharded(dir=...)``, also inside ``lt.every``) saves that step if it
            did not already, and ``lt.Preempted`` is raised: a ``SystemExit`` with code 128 +
            the signal's number, so the process exits as a preempted one does (catch it to do
            otherwise). ``resume="latest"`` then continues bitwise. None: signals keep their
            handlers (SIGTERM kills at once). Under SLURM, e.g.
            ``lt.Preemption(signals=["SIGTERM", "SIGUSR1"], requeue=["SIGUSR1"])``.

    Returns:
        The final state.

    Raises:
        lt.Preempted: a preemption signal stopped the run (after saving; see ``preemption``).
        lt.CollectiveError: a collective did not complete within the process group's timeout
            (``lt.launch(timeout=...)``, ``LTRANSFORM_COLLECTIVE_TIMEOUT``) or a rank died; it
            names this rank and the operation.

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> data = [torch.randn(8, 2) for _ in range(5)]
        >>> state = lt.run(lt.train_step(lambda m, b: m(b).pow(2).mean()), state, data, progress=False)
        >>> state.step, state.epoch
        (5, 1)
    """
    step = as_step(step, "lt.run")
    _check_options(max_steps=max_steps, max_epochs=max_epochs, log_every=log_every, eval_every=eval_every)
    if max_steps is None and max_epochs is None:
        max_epochs = 1
    loggers = _check_loggers(loggers)
    hooks = list(hooks)
    bound_hooks = [(bind_hook(h), getattr(h, "cadence", 1), getattr(h, "__name__", repr(h))) for h in hooks]
    distributed = env.ensure_process_group() and env.process_count() > 1  # (on XLA: one process per host)
    if distributed:
        processes, me = env.process_count(), env.process_index()
        if distributed_sampler:
            data = per_rank(data, world=processes, rank=me)
            if eval_data is not None:
                eval_data = per_rank(eval_data, world=processes, rank=me)
        _warn_if_not_distributed(step, state)
        check_same_length(data, "data")
        if eval_data is not None:
            check_same_length(eval_data, "eval_data")
        if me != 0:
            loggers, progress = [], False
    state, bound = bound_to(step, state)  # a state bound before (an earlier run) keeps its binding
    evaluate = None
    if eval_step is not None:
        if eval_data is None:
            raise ValueError("lt.run: eval_step given without eval_data; pass eval_data=...")
        eval_step = as_step(eval_step, "lt.run(eval_step=...)")
        state, _ = eval_step.prepare(state)
        evaluate = lambda s: evaluate_all(eval_step, s, eval_data)  # noqa: E731
    position = None
    if resume is not None:
        state, position = _resume(resume, hooks, state)
        state, bound = bound_to(step, state)  # bound anew only if loading changed its objects
    for module in inventory(state).models.values():
        module.train()
    loop = _Loop(bound, data, max_steps, max_epochs, log_every, loggers, evaluate, eval_every, bound_hooks)
    loop.average = distributed
    loop.resume_at = position
    start = read_counters(state)[0]
    loop.bar = _progress_bar(progress, _total(step, data, max_steps, max_epochs), start)
    loop.bar_at = start
    if preemption is not None:
        if not isinstance(preemption, Preemption):
            raise TypeError(f"lt.run: preemption must be an lt.Preemption(...) or None, got {preemption!r}")
        loop.watch = Watch(preemption, start)
        loop.watch.install()
    try:
        state = loop.train(state)
        stop = loop.preempted or (loop.watch.final() if loop.watch is not None else ())
        if stop:
            raise _preempted(stop, loop, hooks, start)
    except KeyboardInterrupt:
        state = loop.current()
        print(f"\nlt.run: interrupted at step {loop.step}; returning the state so far")
    except RuntimeError as error:
        wrapped = env.collective_error(error, loop.doing or f"a collective of the step call (step {loop.step + 1})")
        if wrapped is None:
            raise
        raise wrapped from error
    finally:
        if loop.watch is not None:
            loop.watch.uninstall()
        if "ltransform.checkpoint.api" in sys.modules:  # no save can be pending if it was never imported
            sys.modules["ltransform.checkpoint.api"].finish_pending(loop.state)
        if loop.bar is not None:
            loop.bar.update(loop.step - loop.bar_at)
            loop.bar.close()
        for logger in loggers:
            if callable(getattr(logger, "flush", None)):
                logger.flush()
    return state


class _Loop:
    """The loop's settings and its position; one per ``run`` call.

    While it runs, the step and micro-step counters are the plain ints ``step`` and ``micro``;
    the state is given them (:meth:`current`) only where someone looks at it: at an event
    (logging, evaluation, a hook, the progress bar, ``max_steps``), at an epoch's end, on
    interrupt and on return. The next event is computed once after each event, so a step
    costs the call, a counter and one comparison.
    """

    def __init__(self, bound, data, max_steps, max_epochs, log_every, loggers, evaluate, eval_every, hooks):
        self.bound, self.data = bound, data
        self.max_steps, self.max_epochs = max_steps, max_epochs
        self.log_every, self.loggers = log_every, loggers
        self.evaluate, self.eval_every = evaluate, eval_every
        self.hooks = hooks  # (hook(state, metrics), cadence in optimizer steps, name)
        self.average = False  # average metrics across ranks at log points
        self.position = Position(_precision_name(bound.step))  # where checkpoints see the data position
        self.resume_at: dict[str, Any] | None = None  # a loaded checkpoint's data position
        self.bar = None
        self.watch: Watch | None = None  # the preemption signals and the checks on them
        self.preempted: tuple[Any, ...] = ()  # the signals the ranks agreed to stop on
        self.doing: str | None = None  # what an event is doing, for an error in a collective
        self.state: Any = None  # the state as last returned by the step (its counters may lag)
        self.step = self.micro = 0
        self.logged_at = -1
        self.last_eval: dict[str, float] = {}
        self._train_shown: dict[str, str] = {}
        # The bar advances every `bar_stride` steps, the stride adapting to ~10 redraws a
        # second, so that it is usually not the next event.
        self.bar_at = 0
        self.bar_stride = 1
        self._bar_time = time.monotonic()

    def current(self) -> Any:
        """The state with the run's counters (materialised for whoever looks at it)."""
        return with_counters(self.state, self.step, self.micro)

    def train(self, state: Any) -> Any:
        token = RUNNING.set(self.position)
        try:
            return self._train(state)
        finally:
            RUNNING.reset(token)

    def _train(self, state: Any) -> Any:
        self.state = state
        self.step, self.micro = read_counters(state)
        epoch = read_epoch(state)
        metrics: Mapping[str, Any] = {}
        while (self.max_epochs is None or epoch < self.max_epochs) and not self._done():
            set_epoch(self.data, epoch)
            batches, skip = self._batches(epoch)
            metrics, outcome = self._epoch(batches, skip, metrics)
            if outcome == "empty":
                _warn_empty(epoch)
                break
            if outcome == "stop" or self._done():
                break
            epoch += 1
            self.state = set_field(self.current(), "epoch", epoch)
            if self.evaluate is not None and self.eval_every is None:
                self._run_eval(self.current())
        if self.log_every and metrics and self.logged_at != self.step:
            self._log(self.current(), metrics)
        return self.current()

    def _batches(self, epoch: int) -> tuple[Iterator[Any], int]:
        """This epoch's batch iterator, and how many of its batches a resumed run already did.

        The torch RNG state the iterator is created with is kept (a shuffling DataLoader draws
        its order from it); resuming mid-epoch recreates the iterator from the saved one, skips
        the batches done, and puts back the RNG state the checkpoint was taken with."""
        self.position.epoch, self.position.batches = epoch, 0
        resume, self.resume_at = self.resume_at, None
        if resume is None or resume.get("epoch") != epoch or resume.get("epoch_rng") is None:
            self.position.epoch_rng = torch.get_rng_state()
            return iter(self.data), 0
        now_rng = torch.get_rng_state()
        self.position.epoch_rng = resume["epoch_rng"]
        torch.set_rng_state(resume["epoch_rng"])
        batches = iter(self.data)
        skip = resume["batches"]
        for _ in itertools.islice(batches, skip):
            pass
        torch.set_rng_state(now_rng)
        self.position.batches = skip
        return batches, skip

    def _epoch(self, batches: Iterator[Any], done: int,
               metrics: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
        """One pass over the data: the hot loop, so what it uses every step is a local."""
        state, step, micro = self.state, self.step, self.micro
        seen = done  # batches of this epoch consumed (a nested step may count micro-steps otherwise)
        looks = sees_counters(self.bound)
        run, next_event = self.bound.run, self._next_event(step)
        outcome = "end"
        try:
            for batch in batches:
                if looks:  # a hand-written step may read its counters: give it them
                    state = with_counters(state, step, micro)
                state, metrics, applied = run(state, batch, micro)
                micro += 1
                seen += 1
                if not applied:
                    continue  # a non-boundary micro-step (or an update skipped on inf)
                if applied < 0:  # a step called inside advanced the counters itself
                    step, micro = read_counters(state)
                else:
                    step += 1
                if step >= next_event:
                    self.state, self.step, self.micro = state, step, micro
                    self.position.batches = seen
                    if self._event(metrics):
                        outcome = "stop"
                        break
                    state, step, micro = self.state, self.step, self.micro
                    run, next_event = self.bound.run, self._next_event(step)
                    if self._done():
                        break
        finally:  # also on KeyboardInterrupt: the state so far
            self.state, self.step, self.micro = state, step, micro
        if seen == 0:
            outcome = "empty"
        return metrics, outcome

    def _done(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    def _next_event(self, step: int) -> float:
        """The step at which someone next looks: a log, an evaluation, a hook, the bar, the end."""
        due = [self.max_steps] if self.max_steps is not None else []
        due += [(step // n + 1) * n for n in (self.log_every, self.eval_every) if n]
        due += [(step // n + 1) * n for _, n, _ in self.hooks]
        if self.bar is not None:
            due.append(self.bar_at + self.bar_stride)
        if self.watch is not None:
            due.append(self.watch.next_check)
        return min(due, default=math.inf)

    def _event(self, metrics: Mapping[str, Any]) -> bool:
        """What is due at this step; True to stop. Hooks may return a new state (which is
        bound anew if its torch objects changed)."""
        now = self.step
        looked = ((self.log_every and now % self.log_every == 0) or (self.eval_every and now % self.eval_every == 0)
                  or any(now % n == 0 for _, n, _ in self.hooks))
        # the state gets its counters only for those who look at it (not the bar or the preemption check)
        state = self.current() if looked else self.state
        if self.bar is not None and now - self.bar_at >= self.bar_stride:
            self._advance_bar(now)
        if self.log_every and now % self.log_every == 0:
            self.doing = "averaging the logged metrics across ranks"
            self._log(state, metrics)
        if self.evaluate is not None and self.eval_every and now % self.eval_every == 0:
            self.doing = "evaluation"
            self._run_eval(state)
        stopped = False
        due = [(hook, name) for hook, n, name in self.hooks if now % n == 0]
        if due:
            merged = {**{k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()},
                      **self.last_eval}
            for hook, name in due:
                self.doing = f"hook {name} at step {now}"
                state, stop = apply_hook(hook, state, merged)
                stopped = stopped or stop
            self.step, self.micro = read_counters(state)
            state, self.bound = bound_to(self.bound.step, state)  # anew if a hook swapped a model
        if self.watch is not None and now >= self.watch.next_check:
            self.doing = "the preemption check (an all_reduce)"
            self.preempted = self.watch.check(now)
            stopped = stopped or bool(self.preempted)
        self.state, self.doing = state, None
        return stopped

    def _log(self, state: Any, metrics: Mapping[str, Any]) -> None:
        now = read_counters(state)[0]
        self.logged_at = now
        if self.average:  # every rank takes part in the collective, whether or not it logs
            values = mean_across_ranks(metrics)
        elif self.loggers or self.bar is not None:
            values = to_floats(metrics)
        if not self.loggers and self.bar is None:
            return  # nobody reads them: no host sync at all on one rank
        optimizers = list(inventory(state).optimizers.values())
        if optimizers:
            values["lr"] = float(optimizers[0].param_groups[0]["lr"])
        values["epoch"] = read_epoch(state)
        for logger in self.loggers:
            logger(values, now)
        if self.bar is not None:
            self._advance_bar(now)
            self._train_shown = {k: f"{v:.4g}" for k, v in values.items() if k != "epoch"}
            self.bar.set_postfix(self._postfix, refresh=False)

    def _advance_bar(self, now: int) -> None:
        self.bar.update(now - self.bar_at)
        self.bar_at = now
        t = time.monotonic()
        if t - self._bar_time < 0.1:
            self.bar_stride = min(2 * self.bar_stride, 1024)
        elif t - self._bar_time > 0.5 and self.bar_stride > 1:
            self.bar_stride //= 2
        self._bar_time = t

    @property
    def _postfix(self) -> dict[str, str]:
        return {**self._train_shown, **{k: f"{v:.4g}" for k, v in self.last_eval.items()}}

    def _run_eval(self, state: Any) -> None:
        values = self.evaluate(state)
        if self.average:
            values = mean_across_ranks(values)
        self.last_eval = values
        for logger in self.loggers:
            logger(values, read_counters(state)[0])
        if self.bar is not None:
            self.bar.set_postfix(self._postfix, refresh=False)


def _precision_name(step: TransformedStep) -> str | None:
    for transform in step.transforms:
        if transform.kind == "precision":
            return transform.setting
    return None


def _resume(resume: Any, hooks: Iterable[Any], state: Any) -> tuple[Any, Any]:
    """Load the checkpoint ``resume`` names into the prepared ``state``; (state, data position)."""
    from ltransform.checkpoint.api import load_with_position
    from ltransform.checkpoint.files import latest

    if resume == "latest":
        dirs = [d for d in (_checkpoint_dir(h) for h in hooks) if d is not None]
        if not dirs:
            raise ValueError(
                "lt.run: resume='latest' looks in the directory of the run's checkpoint hook, but "
                "there is none; add hooks=[lt.every(n, lt.checkpoint_sharded(dir=...))] or give "
                "resume a path"
            )
        path = latest(dirs[0])
        if path is None:
            _say(f"lt.run: no checkpoint in {str(dirs[0])!r} yet: starting from step {read_counters(state)[0]}")
            return state, None  # nothing saved yet: a first start
        resume = path
    state, position = load_with_position(resume, state)
    step, _ = read_counters(state)
    _say(f"lt.run: resumed from {str(resume)!r} (step {step}, epoch {read_epoch(state)})")
    return state, position


def _say(text: str) -> None:
    """A line on rank 0's stderr that does not break a progress bar."""
    if env.rank() == 0:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)


def _save_at_stop(saver: Any, state: Any, loop: _Loop, start: int) -> Path:
    """Save the step the ranks stopped after into the checkpoint hook's directory, unless the hook
    saved it at this step already; wait until every rank's part is written."""
    from ltransform.checkpoint.api import finish_pending

    now = loop.step
    if not (now > start and now % getattr(saver, "cadence", 1) == 0):
        loop.doing = "the preemption checkpoint"
        (getattr(saver, "saver", None) or saver)(state)  # the hook's own saver (its keep=, async_save=)
    finish_pending(state)  # an async save of the hook at this step, too
    loop.doing = "waiting for every rank's checkpoint"
    env.barrier()  # no rank exits (which makes the agent stop the others) before all have saved
    loop.doing = None
    return Path(_checkpoint_dir(saver)) / f"step-{now:08d}"


def _checkpoint_dir(hook: Any) -> Any:
    return getattr(hook, "checkpoint_dir", None)  # lt.checkpoint_sharded's saver, or lt.every of it


def _preempted(signals: tuple[Any, ...], loop: _Loop, hooks: list[Any], start: int) -> Preempted:
    """Stop on ``signals[0]``: save the step the ranks stopped after through the run's checkpoint
    hook (unless it just did), requeue the SLURM job if asked, and the exception that exits."""
    loop.watch.disarm()
    sig, now, state = signals[0], loop.step, loop.current()
    savers = [h for h in hooks if _checkpoint_dir(h) is not None]
    saved = None
    token = RUNNING.set(loop.position)  # the checkpoint holds the data position, as a hook's does
    try:
        if savers:
            saved = _save_at_stop(savers[0], state, loop, start)
    finally:
        RUNNING.reset(token)
    where = (f"saved {saved}; lt.run(..., resume='latest') continues from it" if saved is not None else
             "no checkpoint hook, nothing saved (add hooks=[lt.every(n, lt.checkpoint_sharded(dir=...))])")
    requeued = ""
    if any(s in loop.watch.preemption.requeue for s in signals) and env.rank() == 0:
        from ltransform.distributed import clusters

        try:
            requeued = "; requeued the SLURM job" if clusters.requeue() else "; not in a SLURM job, not requeued"
        except RuntimeError as error:
            requeued = f"; the requeue failed: {error}"
    message = (f"lt.run: stopped after step {now} on {sig.name} (preemption); {where}{requeued}; "
               f"exiting with code {128 + int(sig)}")
    if env.rank() == 0:
        print(message, file=sys.stderr, flush=True)
    return Preempted(message, sig, now, saved)


def _warn_if_not_distributed(step: TransformedStep, state: Any) -> None:
    """Several ranks, and nothing shares gradients between them: each trains its own model."""
    if any(t.kind == "distribute" for t in step.transforms):
        return
    from ltransform.distributed import wrappers

    if any(wrappers.is_sharded(m) or wrappers.is_replicated(m) or wrappers.is_ddp(m) for m in inventory(state).models.values()):
        return
    warnings.warn(
        f"lt.run: running on {env.world_size()} ranks, but the step has no lt.distribute(...) and "
        f"no model is wrapped for data parallelism, so each rank trains its own copy; add "
        f"lt.distribute('auto') to the step",
        RuntimeWarning,
        stacklevel=3,
    )


def _warn_empty(epoch: int) -> None:
    warnings.warn(
        f"lt.run: data yielded no batches in epoch {epoch}; pass a re-iterable (a list or "
        f"DataLoader), not an iterator that is used up after one pass",
        stacklevel=3,
    )


def _total(step: TransformedStep, data: Any, max_steps: int | None, max_epochs: int | None) -> int | None:
    if max_steps is not None:
        return max_steps
    try:
        return math.ceil(len(data) * max_epochs / step.every)
    except TypeError:
        return None


def _progress_bar(progress: bool, total: int | None, initial: int) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _check_options(**options: int | None) -> None:
    for name, value in options.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"lt.run: {name} must be a positive int or None, got {value!r}")


def _check_loggers(loggers: Iterable[Any]) -> list[Logger]:
    loggers = list(loggers)
    for logger in loggers:
        if not callable(logger):
            raise TypeError(
                f"lt.run: a logger must be callable (metrics, step), got {type(logger).__name__}"
            )
    return loggers
