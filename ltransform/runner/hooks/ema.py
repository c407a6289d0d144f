"""``lt.ema``: an exponential moving average of a model's weights, as a hook of ``lt.run``.

The average is data of the state (``state.extra["ema"]``, an :class:`EMAState`), so checkpoints
hold it. Where the model is sharded (``lt.shard``: DTensor parameters) the average is sharded
the same way: each rank averages its own shards, with no communication and 1/N of the memory; a
sharded checkpoint saves each rank's shards, a full one gathers them, and either loads on any
number of ranks. ``lt.ema_weights(state)`` swaps the averaged weights into the model for an
evaluation or an export, and back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ltransform.core.inventory import inventory
from ltransform.core.state import State, get_extra, read_counters, with_extra
from ltransform.distributed import wrappers

Decay = float | Callable[[int], float]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "device_mesh")  # (DTensor's public attribute; no import of torch.distributed)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` as a plain tensor sharing its memory (call under no_grad)."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor.detach()  # type: ignore[attr-defined]


class EMAState:
    """The averaged weights ``lt.ema`` keeps in ``state.extra``: one tensor per averaged entry
    of the model (its trained parameters and, by default, its floating-point buffers), of the
    same kind, so a DTensor with the same placements where the model is sharded.

    Attributes:
        names: the averaged entries' names in the model (``named_parameters``/``named_buffers``).
        averages: the averages, in the order of ``names``.
        model: where the model sits in the state (its inventory path, e.g. ``"model"``).
        updates: averaging updates since the average started (what a decay schedule is given).
        step: the training step the average was last updated (or created) at.
        since: the step averaging started at; None before ``start`` (it then copies the weights).
    """

    def __init__(self, names: list[str], averages: list[torch.Tensor], model: str, *, step: int,
                 since: int | None) -> None:
        self.names, self.averages, self.model = names, averages, model
        self.updates, self.step, self.since = 0, step, since
        self.fresh = True  # neither updated nor loaded yet: lt.run's start copies the weights anew
        self.swapped = False  # inside lt.ema_weights: the model holds the averages, and they the weights
        self._pairs: tuple[torch.nn.Module, list[torch.Tensor], list[torch.Tensor]] | None = None

    def __repr__(self) -> str:
        return f"EMAState({len(self.names)} tensors of {self.model!r}, {self.updates} updates, step {self.step})"

    def state_dict(self) -> dict[str, Any]:
        self._check("saved")
        return {"averages": dict(zip(self.names, self.averages)), "updates": self.updates, "step": self.step,
                "since": self.since}

    @torch.no_grad()
    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`: its averages sharded, gathered (a full
        checkpoint, loaded into shards without communication) or plain.

        Raises:
            ValueError: the saved averages are of other entries or shapes than this model's.
        """
        self._check("loaded")
        averages = saved["averages"]
        if sorted(averages) != sorted(self.names):
            missing, unexpected = sorted(set(self.names) - set(averages)), sorted(set(averages) - set(self.names))
            raise ValueError(f"the saved average is of other entries of the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}; average the model the checkpoint was saved with")
        for name, live in zip(self.names, self.averages):
            value = averages[name]
            if value is live:  # (a sharded load wrote into the live tensor already)
                continue
            if tuple(value.shape) != tuple(live.shape):
                raise ValueError(f"the saved average of {name!r} has shape {list(value.shape)}, the model's "
                                 f"{list(live.shape)}; average the model the checkpoint was saved with")
            _local(live).copy_(_local(_like(value, live)))
        self.updates, self.step, self.since = int(saved["updates"]), int(saved["step"]), saved["since"]
        self.fresh, self._pairs = False, None

    def _check(self, doing: str) -> None:
        if self.swapped:
            raise RuntimeError(
                f"the EMA cannot be {doing} inside lt.ema_weights(state): the model holds the averaged weights "
                f"and the average the trained ones until the block ends; save, load or update after it (to "
                f"export the averaged weights inside it, save the model alone: lt.export_safetensors(model, path))")

    def pairs(self, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This rank's parts of the averages and of the model's tensors they average, made once
        per model: what an update reads every step."""
        if self._pairs is None or self._pairs[0] is not model:
            wrappers.reshard(model)
            live: dict[str, torch.Tensor] = {**dict(model.named_parameters()), **dict(model.named_buffers())}
            with torch.no_grad():
                self._pairs = (model, [_local(a) for a in self.averages], [_local(live[n]) for n in self.names])
        return self._pairs[1], self._pairs[2]

    def update(self, model: torch.nn.Module, step: int, weight: float) -> None:
        """Move the averages ``weight`` of the way to the model's tensors (1: copy them). (No
        ``no_grad`` needed, which costs microseconds a step: the tensors of ``pairs`` are detached.)"""
        self._check("updated")
        averages, live = self.pairs(model)
        if weight == 1.0:
            torch._foreach_copy_(averages, live)
        else:
            torch._foreach_lerp_(averages, live, weight)
        self.step, self.fresh = step, False

    @torch.no_grad()
    def swap(self, model: torch.nn.Module) -> None:
        """Exchange the averages and the model's tensors in place (one tensor's copy at a time)."""
        self._pairs = None  # (the model's tensors are looked up anew: a swap is rare)
        for average, tensor in zip(*self.pairs(model)):
            kept = tensor.clone()
            tensor.copy_(average)
            average.copy_(kept)
        self.swapped = not self.swapped


def _like(value: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``value`` as ``live`` is laid out: sharded like it (a full tensor cut to this rank's part
    of it, locally), or gathered (a sharded one into a plain average)."""
    if _is_dtensor(live) and not _is_dtensor(value):
        from torch.distributed.tensor import distribute_tensor

        local = _local(live)
        return distribute_tensor(value.to(local.device, local.dtype), live.device_mesh,  # type: ignore[attr-defined]
                                 live.placements, src_data_rank=None)  # type: ignore[attr-defined]
    if _is_dtensor(value) and not _is_dtensor(live):
        return value.full_tensor()  # type: ignore[attr-defined]
    return value


def _averaged(model: torch.nn.Module, buffers: bool) -> list[tuple[str, torch.Tensor]]:
    """What is averaged: the parameters that train (frozen ones equal their average), and the
    floating-point buffers (batch norm's running statistics) if ``buffers``."""
    entries: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if buffers:
        entries += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    return entries


class EMA:
    """The hook :func:`ema` returns: updates the state's :class:`EMAState` at its steps."""

    def __init__(self, decay: Decay, every: int, start: int, model: str | None, buffers: bool, key: str,
                 evaluate: bool) -> None:
        self.decay, self.every, self.begin, self.model = decay, every, start, model
        self.buffers, self.key, self.evaluate = buffers, key, evaluate
        self.first = -(-start // every) * every  # the first update step: a multiple of every, >= start
        self.__name__ = f"ema(decay={decay!r}, every={every})"

    def __repr__(self) -> str:
        return self.__name__

    def next_step(self, step: int) -> int:
        return max((step // self.every + 1) * self.every, self.first)

    def prepare(self, state: Any) -> Any:
        """``state`` holding the average (a copy of the model's weights if it has none yet).
        A state to be resumed needs it before the load: ``state = hook.prepare(state)``."""
        average = get_extra(state, self.key)
        if isinstance(average, EMAState):
            return state
        if average is not None:
            raise TypeError(f"lt.ema: state.extra[{self.key!r}] holds an object of type {type(average).__name__}, "
                            f"not an average; give the hook another key: lt.ema(..., key='ema_weights')")
        path, model = self._find(state)
        step = read_counters(state)[0]
        wrappers.reshard(model)
        entries = _averaged(model, self.buffers)
        if not entries:
            raise ValueError(f"lt.ema: model {path!r} has no trained parameter (and no floating-point buffer) to "
                             f"average")
        with torch.no_grad():
            averages = [t.detach().clone() for _, t in entries]
        created = EMAState([n for n, _ in entries], averages, path, step=step,
                           since=step if step >= self.begin else None)
        return with_extra(state, self.key, created)

    def start(self, state: Any, run: Any) -> Any:
        if self.evaluate:
            if run.eval_step is None:
                raise ValueError("lt.ema(evaluate=True) evaluates the averaged weights with lt.run's eval_step and "
                                 "eval_data; pass them to lt.run")
            if run.eval_every is not None and run.eval_every % self.every:
                raise ValueError(f"lt.ema(every={self.every}, evaluate=True) evaluates when it updates; give lt.run "
                                 f"an eval_every that is a multiple of {self.every} (got {run.eval_every})")
        state = self.prepare(state)
        average = get_extra(state, self.key)
        step = read_counters(state)[0]
        if average.fresh:  # created before a load that did not hold it, say: start from the weights now
            average.update(_model_of(state, average), step, 1.0)
            average.fresh, average.since = True, step if step >= self.begin else None
        # A checkpoint hook listed before this one saved the average before its update at that
        # step; the weights loaded are that step's, so the update it missed is made now, exactly.
        return self._update(state, step)

    def __call__(self, state: Any, run: Any = None) -> Any:
        """Update the average if ``state.step`` is one of its steps (and it was not updated at it
        yet); returns the state (holding the average: created on a first call outside ``lt.run``)."""
        step = read_counters(state)[0]
        state = self._update(state, step)
        if self.evaluate and run is not None and run.evaluated_at == step:
            self._evaluate(state, run)
        return state

    def _update(self, state: Any, step: int) -> Any:
        if step % self.every or step < self.begin:
            return state
        average = get_extra(state, self.key)
        if not isinstance(average, EMAState):  # (a first call outside lt.run)
            state = self.prepare(state)
            average = get_extra(state, self.key)
        if step > average.step:
            if average.since is None:  # averaging starts: from the weights now
                average.update(_model_of(state, average), step, 1.0)
                average.since, average.updates = step, 0
            else:
                average.update(_model_of(state, average), step, 1.0 - self._decay(average.updates))
                average.updates += 1
        return state

    def epoch_end(self, state: Any, run: Any) -> None:
        if self.evaluate and run.eval_every is None and run.evaluated_at == run.step:
            self._evaluate(state, run)

    def _evaluate(self, state: Any, run: Any) -> None:
        """lt.run's evaluation again, with the averaged weights; logged as ``val_ema_*``."""
        from ltransform.runner.hooks.evaluation import evaluate

        run.doing = "evaluation with the averaged weights (lt.ema)"
        with ema_weights(state, key=self.key):
            values = evaluate(run.eval_step, state, run.eval_data, average=run.distributed)
        run.log({f"val_ema_{name}": value for name, value in values.items()})

    def _decay(self, updates: int) -> float:
        decay = self.decay(updates) if callable(self.decay) else self.decay
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"lt.ema: the decay schedule gave {decay!r} at update {updates}; a decay is in [0, 1]")
        return decay

    def _find(self, state: Any) -> tuple[str, torch.nn.Module]:
        models = inventory(state).models
        if self.model is not None:
            if self.model not in models:
                raise ValueError(f"lt.ema: model={self.model!r} is not a model of the state; its models: "
                                 f"{sorted(models)}")
            return self.model, models[self.model]
        if len(models) != 1:
            raise ValueError(f"lt.ema: the state has {len(models)} models ({sorted(models)}); say which to average: "
                             f"lt.ema(..., model='model')")
        return next(iter(models.items()))


def _model_of(state: Any, average: EMAState) -> torch.nn.Module:
    """The model ``average`` averages, found in ``state`` by its path."""
    if type(state) is State and average.model == "model" and isinstance(state.model, torch.nn.Module):
        return state.model  # the per-step fast path
    model = inventory(state).models.get(average.model)
    if model is None:
        raise ValueError(f"the state holds no model {average.model!r}, which its EMA averages")
    return model


def ema(decay: Decay = 0.999, *, every: int = 1, start: int = 0, model: str | None = None, buffers: bool = True,
        key: str = "ema", evaluate: bool = False) -> EMA:
    """A hook keeping an exponential moving average of the model's weights in ``state.extra[key]``.

    Every ``every`` optimizer steps, each averaged tensor moves towards the weights:
    ``average = decay * average + (1 - decay) * weight`` (computed as ``torch.lerp``, in one
    ``torch._foreach_lerp_`` over this rank's tensors: no host sync, no communication). A
    sharded model's average is sharded like it. The average is a copy of the weights when the
    run starts, and averaging starts at the first update at or after step ``start`` (from a copy
    of the weights then). Checkpoints hold it; evaluate or export with ``lt.ema_weights(state)``.

    Args:
        decay: the decay, in [0, 1]; or a schedule ``decay(n) -> float`` of the number of
            updates made (``n = 0`` at the first), e.g. a warmup
            ``lambda n: min(0.999, (1 + n) / (10 + n))``.
        every: update every this many optimizer steps.
        start: the step averaging starts at (before it, the average is not updated).
        model: which model of the state (its path, as ``lt.save`` names it); default: the only one.
        buffers: also average floating-point buffers (batch norm's running statistics).
        key: where in ``state.extra`` the average lives.
        evaluate: when ``lt.run`` evaluates, evaluate again with the averaged weights and log
            the results as ``val_ema_*`` (``eval_every`` must be a multiple of ``every``).

    Returns:
        The hook, for ``lt.run(hooks=[...])``. Outside ``lt.run`` call it yourself after each
        step: ``state = hook(state)``; ``state = hook.prepare(state)`` first makes the average
        from the weights before training (and must precede loading a checkpoint that holds it,
        e.g. before ``lt.run(..., resume=...)``).

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> data = [torch.randn(4, 2) for _ in range(3)]
        >>> state = lt.run(lt.train_step(lambda m, x: m(x).pow(2).mean()), state, data,
        ...                hooks=[lt.ema(0.9)], progress=False)
        >>> state.extra["ema"].updates
        3
    """
    if not callable(decay) and (isinstance(decay, bool) or not isinstance(decay, (int, float))
                                or not 0.0 <= decay <= 1.0):
        raise ValueError(f"lt.ema: decay must be a number in [0, 1] or a schedule n -> decay, got {decay!r}")
    for name, value, least in (("every", every, 1), ("start", start, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"lt.ema: {name} must be an int >= {least} (optimizer steps), got {value!r}")
    if not isinstance(key, str):
        raise TypeError(f"lt.ema: key must be a str (a key of state.extra), got {key!r}")
    return EMA(decay, every, start, model, bool(buffers), key, bool(evaluate))


@contextlib.contextmanager
def ema_weights(state: Any, *, key: str = "ema") -> Iterator[Any]:
    """Inside the block, the model holds its averaged weights (``lt.ema``); after it, its own again.

    The weights and the averages are exchanged in place, one tensor at a time (no second copy
    of the model; a sharded model's shards, each rank its own), and exchanged back on exit,
    exactly, also after an error. Inside, the average cannot be updated or saved.

    Args:
        state: a state holding an average (``state.extra[key]``).
        key: where in ``state.extra`` the average lives.

    Yields:
        ``state``.

    Example:
        >>> import copy, torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.ema(0.9).prepare(lt.State(model=model))
        >>> with lt.ema_weights(state):
        ...     averaged = copy.deepcopy(state.model)  # or lt.export_safetensors(state.model, path)
    """
    average = get_extra(state, key)
    if not isinstance(average, EMAState):
        raise ValueError(f"lt.ema_weights: state.extra[{key!r}] holds no average ({type(average).__name__}); "
                         f"train with hooks=[lt.ema(...)] or make it with lt.ema(...).prepare(state)")
    if average.swapped:
        raise RuntimeError("lt.ema_weights: already inside lt.ema_weights(state) for this average")
    model = _model_of(state, average)
    average.swap(model)
    try:
        yield state
    finally:
        average.swap(model)
