"""``lt.run``: iterate a step over data, with progress, logging, evaluation and hooks."""

from __future__ import annotations

import datetime
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ltransform.core.binding import bound_to, forget
from ltransform.core.inventory import inventory
from ltransform.core.state import read_counters, read_epoch
from ltransform.core.step import TransformedStep, as_step
from ltransform.distributed import env
from ltransform.distributed.preemption import Preempted, Preemption, Watch, now
from ltransform.runner.context import Run
from ltransform.runner.data import (Limited, batch_limit, check_same_length, data_parallel, per_rank,
                                    workers_survive)
from ltransform.runner.hooks import Slot, bind_hook, say
from ltransform.runner.hooks.evaluation import Evaluation
from ltransform.runner.hooks.lifecycle import call_on_exception
from ltransform.runner.hooks.logs import Logging
from ltransform.runner.hooks.preemption import Preempting
from ltransform.runner.hooks.progress import Progress
from ltransform.runner.loop import loop

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
    log_reduce: str = "last",
    eval_step: Any = None,
    eval_data: Iterable[Any] | None = None,
    eval_every: int | None = None,
    hooks: Iterable[Callable[..., Any]] = (),
    progress: bool = True,
    distributed_sampler: bool = True,
    resume: str | os.PathLike[str] | None = None,
    preemption: Preemption | None = Preemption(),  # noqa: B008  (a frozen value, shared safely)
    max_time: float | datetime.timedelta | str | None = None,
    limit_batches: int | float | None = None,
    limit_eval_batches: int | float | None = None,
    dry_run: bool | int = False,
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
        log_reduce: what a log point logs of each training metric: ``"last"``, the last step's
            value; ``"mean"``, its mean over the step calls since the last log point that
            reported it (every micro-batch counts once; ``grad_norm`` under accumulation is over
            the updates), plus at each epoch's end the epoch's mean as ``<name>_epoch``
            (Lightning's ``self.log(..., on_epoch=True)``). The sums run on the metrics' device:
            no host sync beyond the log points' one, but one small add per metric per step call.
            On several ranks, as for ``"last"``, every rank must report the same metric names
            (the means are averaged in one collective).
        eval_step: a step (e.g. ``lt.eval_step(fn)``) run over ``eval_data``, models in eval mode,
            in the training step's precision unless it has its own (``lt.with_precision``).
        eval_data: batches for evaluation, evaluated as ``lt.evaluate`` does (its loop, after the
            data is split once per rank): each batch's metrics count with its batch size, the
            samples a ``DistributedSampler`` repeats to even out the ranks are left out, and the
            sums are added over the ranks: 1 process and N give the same ``val_*`` metrics.
        eval_every: evaluate every this many optimizer steps; None: at the end of each epoch.
        hooks: functions ``(state)`` or ``(state, run)`` run after each optimizer step, e.g.
            ``lt.every(100, fn)``, or hook objects with their own cadence (see
            ``ltransform.runner.hooks``: ``lt.early_stopping``, ``lt.checkpoint_best``,
            ``lt.throughput``, ``lt.ema``, ``lt.profile``, ...; ``lt.every_epoch``, ``lt.at_end``,
            ``lt.on_exception`` for the other points of the run). ``run`` is the run context: the
            counters, the data position, ``run.log(values)``, ``run.fresh("val_loss")`` (a value
            logged at this very step, else None), and a mapping of the latest metrics. A hook
            returns a new state, None, or ``lt.stop(...)``. On several ranks a hook runs on
            every rank and must decide to stop from values that agree across ranks (logged and
            ``val_*`` values, which are averaged), not from a rank's own loss.
        progress: show a tqdm progress bar (terminal or Jupyter); on rank 0 only.
        distributed_sampler: on several ranks, give a ``DataLoader`` (``data`` and
            ``eval_data``) a ``DistributedSampler`` so each rank sees its own part; False if
            your data is already per rank. Other iterables are always taken as per rank; when
            they have a length it must be the same on every rank (checked once), since a rank
            with an extra batch would wait forever for the others. The ranks of one tensor-parallel
            group (``lt.parallelize``) get the same part: with the mesh over every rank, the whole data.
        resume: continue from a checkpoint: a path (file, sharded directory, or a directory
            of ``step-N`` ones), or ``"latest"``: the newest in the directories of the run's
            checkpoint hooks (``lt.checkpoint_sharded``, also in ``lt.every``, ``lt.every_epoch``,
            ``lt.on_exception``; none there yet: start from the beginning). The
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
        max_time: a wall-clock budget (Lightning's ``max_time``): seconds (an int or float), a
            ``datetime.timedelta``, or a ``"DD:HH:MM:SS"`` string (``"00:12:00:00"``: 12 hours).
            Once it is used up the run stops after a step, logs as at any end, says so on rank 0
            and returns the state (it is not a preemption: no exit, no save of its own; a
            ``lt.checkpoint_best(last=True)`` saves at the end as usual). It counts from the call
            of ``lt.run``, so a resumed run gets a fresh budget (Lightning's ``Timer`` instead
            carries the time spent over in its checkpoint): it is a budget for this process, as a
            job's time limit is; give a resumed run what is left if you want one total. It is
            checked at the preemption checks (about every 0.2 s, no collective of its own). On
            several ranks rank 0's clock decides for all: every rank stops after the same step,
            one check after rank 0 finds the time used up, however skewed the other clocks are.
        limit_batches: at most this many batches per epoch (an int), or that fraction of them (a
            float in (0, 1], rounded down, at least 1), counted after the data is split per rank
            (a ``DistributedSampler`` still shuffles each epoch anew; each rank takes the first
            batches of its part). The progress total, the epochs and the data position of a
            checkpoint (a mid-epoch resume) all see the limited length.
        limit_eval_batches: the same for each evaluation over ``eval_data`` (``lt.evaluate``'s
            ``limit``).
        dry_run: run ``n`` optimizer steps of training (True: 1; under ``lt.accumulate(k)``,
            ``n * k`` batches, so the update runs too) and ``n`` batches of evaluation (at the
            end, whatever ``eval_every``), then return the state, as Lightning's
            ``fast_dev_run``: a check that everything runs. It writes no files: the loggers are not called, and the
            hooks that write (``writes_files = True``, or built in: ``lt.checkpoint_sharded``,
            ``lt.checkpoint_best``, ``lt.profile``, ``lt.memory_snapshot``) are left out, so no
            checkpoint either (rank 0 says what was left out). ``resume=`` is still read (reading
            writes nothing): the state is loaded, and its epoch starts from its first batch.
            It replaces ``max_steps``, ``max_epochs`` and the ``limit_*`` (an error to give both).

    Returns:
        The final state.

    Raises:
        ValueError: a bad option (``max_steps`` not positive, ``max_time`` not a positive duration,
            ``limit_*`` zero, negative or a float above 1, ``dry_run`` with ``max_steps``...).
        TypeError: an option of the wrong type (``max_time=[1]``, ``limit_batches="all"``).
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
        >>> state = lt.run(lt.train_step(lambda m, b: m(b).pow(2).mean()), state, data, max_epochs=2,
        ...                limit_batches=2, max_time="00:01:00:00", progress=False)
        >>> state.step, state.epoch
        (7, 2)
    """
    started = now()  # max_time counts from the call
    step = as_step(step, "lt.run")
    _check_options(max_steps=max_steps, max_epochs=max_epochs, log_every=log_every, eval_every=eval_every)
    budget = _seconds(max_time)
    dry = _dry_batches(dry_run, max_steps=max_steps, max_epochs=max_epochs, limit_batches=limit_batches,
                       limit_eval_batches=limit_eval_batches)
    if dry:
        # n updates: n windows of batches under accumulation (the longest, under a schedule)
        max_epochs, limit_batches, limit_eval_batches, eval_every = 1, dry * step.every, dry, None
    for option, limit in (("limit_batches", limit_batches), ("limit_eval_batches", limit_eval_batches)):
        batch_limit(limit, (), option)  # checked now; a fraction is resolved once the data is split per rank
    if limit_eval_batches is not None and eval_step is None and not dry:
        raise ValueError("lt.run: limit_eval_batches given without eval_step; pass eval_step=lt.eval_step(fn) "
                         "and eval_data=..., or leave limit_eval_batches out")
    if max_steps is None and max_epochs is None:
        max_epochs = 1
    loggers = _check_loggers(loggers)
    if log_reduce not in ("last", "mean"):
        raise ValueError(f"lt.run: log_reduce must be 'last' or 'mean', got {log_reduce!r}")
    hooks = list(hooks)
    distributed = env.ensure_process_group() and env.process_count() > 1  # (on XLA: one process per host)
    if distributed:
        processes, me = env.process_count(), env.process_index()
        if distributed_sampler:
            parts, part = data_parallel(inventory(state).models.values(), world=processes, rank=me)
            data = per_rank(data, world=parts, rank=part)
            if eval_data is not None:
                eval_data = per_rank(eval_data, world=parts, rank=part)
    if limit_batches is not None:  # after the split: the first batches of this rank's part
        data = Limited(data, batch_limit(limit_batches, data, "limit_batches"))  # type: ignore[arg-type]
    eval_limit = batch_limit(limit_eval_batches, () if eval_data is None else eval_data, "limit_eval_batches")
    if distributed:
        _warn_if_not_distributed(step, state)
        check_same_length(data, "data")
        if eval_data is not None:
            check_same_length(eval_data, "eval_data")
        if me != 0:
            loggers, progress = [], False
    state, bound = bound_to(step, state)  # a state bound before (an earlier run) keeps its binding
    made_here = False
    if eval_step is not None:
        if eval_data is None:
            raise ValueError("lt.run: eval_step given without eval_data; pass eval_data=...")
        given = as_step(eval_step, "lt.run(eval_step=...)")
        eval_step = _in_training_precision(given, step)
        made_here = eval_step is not given  # (a step of this run's own: its binding goes when it ends)
        state, _ = eval_step.prepare(state)
    for hook in hooks:  # what a hook adds to the state (an EMA) exists before a checkpoint loads into it
        prepare = getattr(hook, "prepare", None)
        if callable(prepare):
            state = prepare(state)
    position = None
    if resume is not None:
        state, position = _resume(resume, hooks, state)
        state, bound = bound_to(step, state)  # bound anew only if loading changed its objects
    if dry:  # (after resume: resume="latest" finds its directory through a checkpoint hook left out here)
        hooks, loggers = _dry_run(dry, hooks, loggers, evaluates=eval_step is not None)
        max_epochs, position = read_epoch(state) + 1, None  # n batches from the start of the state's epoch
    for module in inventory(state).models.values():
        module.train()
    start = read_counters(state)[0]
    context = Run(bound=bound, data=data, max_steps=max_steps, max_epochs=max_epochs, log_every=log_every,
                  eval_every=eval_every, loggers=loggers, distributed=distributed,
                  precision=_precision_name(step), total=_total(step, data, max_steps, max_epochs))
    context.resume_at = position
    context.eval_step, context.eval_data = eval_step, eval_data
    features: list[Any] = [Logging(log_every, needed=bool(loggers) or progress, reduce=log_reduce)]
    if eval_step is not None:
        features.append(Evaluation(eval_step, eval_data or (), eval_every, limit=eval_limit))
    features += hooks
    if preemption is not None and not isinstance(preemption, Preemption):
        raise TypeError(f"lt.run: preemption must be an lt.Preemption(...) or None, got {preemption!r}")
    slots = [Slot(h) for h in features]  # (checks every hook before anything is installed)
    watching: Preempting | None = None
    survive = workers_survive([data, eval_data], preemption.signals if preemption is not None else ())
    try:  # the bar redirects stdout and the watch installs signal handlers: undone in finally
        if progress:
            slots.append(Slot(Progress(context.total, start)))
        if preemption is not None or budget is not None:  # (max_time is decided at the same checks)
            watching = Preempting(preemption, start, deadline=None if budget is None else started + budget)
            slots.append(Slot(watching))
        state = loop(context, state, slots)
        stop = context.preempted or (watching.watch.final() if watching is not None else ())
        if stop:
            assert watching is not None
            raise _preempted(stop, context, watching.watch, hooks, start)
        if context.out_of_time:
            say(f"lt.run: stopped after step {context.step}: max_time ({datetime.timedelta(seconds=budget or 0)}) "
                f"used up by rank 0's clock ({now() - started:.1f} s since lt.run began); returning the state")
    except KeyboardInterrupt as error:
        state = call_on_exception(slots, context, error)
        print(f"\nlt.run: interrupted at step {context.step}; returning the state so far")
    except Exception as error:
        wrapped = None
        if isinstance(error, RuntimeError):
            doing = context.doing or f"a collective of the step call (step {context.step + 1})"
            wrapped = env.collective_error(error, doing)
        call_on_exception(slots, context, wrapped or error)
        if wrapped is None:
            raise
        raise wrapped from error
    finally:
        survive()  # (before the error goes on: at exit multiprocessing terminates the workers)
        errors = _close(slots, context, loggers)
        if made_here:
            forget(eval_step, context.state if context.state is not None else state)
        if errors and sys.exc_info()[0] is None:  # (an error already on its way is not replaced)
            raise errors[0]
    return state


def _close(slots: list[Slot], run: Run, loggers: list[Any]) -> list[BaseException]:
    """Undo what the run installed, each part whatever the others do: the preemption watch
    first (signal handlers), then a pending async save, every hook's ``close``, the loggers'
    ``flush``; the errors, in that order."""
    def call(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as error:  # noqa: BLE001  (collected; the first is raised)
            errors.append(error)

    errors: list[BaseException] = []
    closes = [s.hook.close for s in slots if callable(getattr(s.hook, "close", None))]
    closes.sort(key=lambda close: not isinstance(getattr(close, "__self__", None), Preempting))
    if closes and isinstance(getattr(closes[0], "__self__", None), Preempting):
        call(closes.pop(0), run)
    if "ltransform.checkpoint.api" in sys.modules:  # no save can be pending if it was never imported
        call(sys.modules["ltransform.checkpoint.api"].finish_pending, run.state)
    for close in closes:
        call(close, run)
    for logger in loggers:
        flush = getattr(logger, "flush", None)
        if callable(flush):
            call(flush)
    return errors


def _in_training_precision(eval_step: TransformedStep, step: TransformedStep) -> TransformedStep:
    """The eval step in the training step's precision, unless it has its own."""
    if any(t.kind == "precision" for t in eval_step.transforms):
        return eval_step
    for transform in step.transforms:
        if transform.kind == "precision":
            return eval_step.with_transform(transform)
    return eval_step


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
        found = [p for p in (latest(d) for d in dict.fromkeys(map(str, dirs))) if p is not None]
        if not found:
            where = " or ".join(repr(str(d)) for d in dict.fromkeys(map(str, dirs)))
            say(f"lt.run: no checkpoint in {where} yet: starting from step {read_counters(state)[0]}")
            return state, None  # nothing saved yet: a first start
        resume = max(found, key=_saved_step)  # the newest of every checkpoint hook's (e.g. an on_exception save)
    state, position = load_with_position(resume, state)
    step, _ = read_counters(state)
    say(f"lt.run: resumed from {str(resume)!r} (step {step}, epoch {read_epoch(state)})")
    if position is None and step:
        say(f"lt.run: {str(resume)!r} holds no data position (saved outside lt.run, or by a hook that "
             f"did not pass run=: lt.save(path, state, run=run)); the data starts epoch "
             f"{read_epoch(state)} from its beginning")
    return state, position


def _saved_step(path: Path) -> int:
    """The step a ``step-N`` checkpoint (or the ``.step-N.old`` standing for it) holds."""
    digits = "".join(c for c in path.name.rsplit("-", 1)[-1] if c.isdigit())
    return int(digits) if digits else -1


def _save_at_stop(saver: Any, run: Run, start: int) -> Path:
    """Save the step the ranks stopped after into the checkpoint hook's directory, unless the hook
    saved it at this step already; wait until every rank's part is written."""
    from ltransform.checkpoint.api import finish_pending

    now, state = run.step, run.current()
    if hasattr(saver, "saved_at"):  # a hook that knows whether it saved this step says so
        due = saver.saved_at != now
    else:  # lt.every(n, saver): it saved if this step is one of its
        due = not (now > start and now % getattr(saver, "cadence", 1) == 0)
    if due:
        run.doing = "the preemption checkpoint"
        bind_hook(getattr(saver, "saver", None) or saver)(state, run)  # the hook's own saver (keep=, async_save=)
    finish_pending(state)  # an async save of the hook at this step, too
    run.doing = "waiting for every rank's checkpoint"
    env.barrier()  # no rank exits (which makes the agent stop the others) before all have saved
    run.doing = None
    return Path(_checkpoint_dir(saver)) / f"step-{now:08d}"


def _checkpoint_dir(hook: Any) -> Any:
    return getattr(hook, "checkpoint_dir", None)  # lt.checkpoint_sharded's saver, or lt.every of it


def _preempted(signals: tuple[Any, ...], run: Run, watch: Watch, hooks: list[Any], start: int) -> Preempted:
    """Stop on ``signals[0]``: save the step the ranks stopped after through the run's checkpoint
    hook (unless it just did), requeue the SLURM job if asked, and the exception that exits."""
    watch.disarm()
    sig, now = signals[0], run.step
    savers = [h for h in hooks if _checkpoint_dir(h) is not None]
    saved = _save_at_stop(savers[0], run, start) if savers else None
    where = (f"saved {saved}; lt.run(..., resume='latest') continues from it" if saved is not None else
             "no checkpoint hook, nothing saved (add hooks=[lt.every(n, lt.checkpoint_sharded(dir=...))])")
    requeued = ""
    if any(s in watch.preemption.requeue for s in signals) and env.rank() == 0:
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
    from ltransform.models.parallelize import tensor_parallel

    models = inventory(state).models.values()
    if any(wrappers.is_sharded(m) or wrappers.is_replicated(m) or wrappers.is_ddp(m) for m in models):
        return
    if tensor_parallel(models) is not None:  # DTensor shares what tensor parallel needs
        return
    warnings.warn(
        f"lt.run: running on {env.world_size()} ranks, but the step has no lt.distribute(...) and "
        f"no model is wrapped for data parallelism, so each rank trains its own copy; add "
        f"lt.distribute('auto') to the step",
        RuntimeWarning,
        stacklevel=3,
    )


def _total(step: TransformedStep, data: Any, max_steps: int | None, max_epochs: int | None) -> int | None:
    if max_steps is not None:
        return max_steps
    try:
        batches = len(data)
    except TypeError:
        return None
    if step.window is not None:  # an accumulation schedule: windows of varying length
        from ltransform.steps.accumulate import planned_updates

        return planned_updates(step, batches, max_epochs or 1)
    return math.ceil(batches * (max_epochs or 1) / step.every)


def _check_options(**options: int | None) -> None:
    for name, value in options.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"lt.run: {name} must be a positive int or None, got {value!r}")


def _seconds(max_time: Any) -> float | None:
    """``max_time`` (seconds, a ``timedelta`` or ``"DD:HH:MM:SS"``) in seconds; None: no budget."""
    if max_time is None:
        return None
    valid = "seconds (a number), a datetime.timedelta, or a 'DD:HH:MM:SS' string such as '00:12:00:00'"
    if isinstance(max_time, datetime.timedelta):
        seconds = max_time.total_seconds()
    elif isinstance(max_time, str):
        parts = max_time.strip().split(":")
        if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"lt.run: max_time {max_time!r} is not 'DD:HH:MM:SS' (days, hours, minutes, "
                             f"seconds, e.g. '00:12:00:00' for 12 hours); give {valid}")
        days, hours, minutes, secs = (int(p) for p in parts)
        seconds = datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=secs).total_seconds()
    elif isinstance(max_time, (int, float)) and not isinstance(max_time, bool):
        seconds = float(max_time)
    else:
        raise TypeError(f"lt.run: max_time must be {valid}, or None; got {type(max_time).__name__}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"lt.run: max_time must be a positive, finite duration ({valid}); got {max_time!r}")
    return seconds


def _dry_batches(dry_run: Any, **replaced: Any) -> int:
    """``dry_run`` as a number of batches (0: no dry run); it may not come with what it replaces."""
    if dry_run is False:
        return 0
    if dry_run is True:
        n = 1
    elif isinstance(dry_run, int) and not isinstance(dry_run, bool):
        if dry_run < 1:
            raise ValueError(f"lt.run: dry_run must be True (1 step), a positive int (optimizer steps) or False, "
                             f"got {dry_run!r}")
        n = dry_run
    else:
        raise TypeError(f"lt.run: dry_run must be True (1 step), a positive int (optimizer steps) or False, "
                        f"got {type(dry_run).__name__}")
    given = [name for name, value in replaced.items() if value is not None]
    if given:
        raise ValueError(f"lt.run: dry_run runs {n} step(s) of training and {n} batch(es) of evaluation, in place of "
                         f"{' and '.join(given)}; pass one or the other")
    return n


def writes_files(hook: Any) -> bool:
    """Whether a hook writes files (left out of a dry run): its ``writes_files`` attribute (the
    built-in writers have it: the checkpoint savers, ``lt.checkpoint_best``, ``lt.profile``,
    ``lt.memory_snapshot``), else whether it saves checkpoints (a ``checkpoint_dir``)."""
    says = getattr(hook, "writes_files", None)
    if says is not None:
        return bool(says)
    return _checkpoint_dir(hook) is not None


def _dry_run(n: int, hooks: list[Any], loggers: list[Any], *, evaluates: bool) -> tuple[list[Any], list[Any]]:
    """The hooks and loggers of a dry run: none that writes files; rank 0 says which were left out."""
    kept = [h for h in hooks if not writes_files(h)]
    left = [f"logger {getattr(x, '__name__', None) or type(x).__name__}" for x in loggers]
    left += [f"hook {getattr(h, '__name__', None) or type(h).__name__}" for h in hooks if writes_files(h)]
    evaluation = f" and {n} batch(es) of evaluation" if evaluates else ""
    say(f"lt.run: dry run: {n} step(s) of training{evaluation}, writing no files; left out: "
        f"{', '.join(left) or 'nothing (no logger or hook writes files)'}")
    return kept, []


def _check_loggers(loggers: Iterable[Any]) -> list[Logger]:
    loggers = list(loggers)
    for logger in loggers:
        if not callable(logger):
            raise TypeError(
                f"lt.run: a logger must be callable (metrics, step), got {type(logger).__name__}"
            )
    return loggers
