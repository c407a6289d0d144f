"""``guard_nonfinite``: skip (and count) or stop on an update whose gradients hold inf/NaN."""

from __future__ import annotations

import math
import weakref
from typing import Any

import attrs
import torch

from ltransform.core.compose import MISSING
from ltransform.core.effects import Effect, Frame, Handler, Stage, When
from ltransform.core.inventory import inventory
from ltransform.core.precisions import resolve_precision
from ltransform.core.state import get_extra, read_counters, with_extra
from ltransform.core.step import StepTransform, apply_step_transform
from ltransform.distributed import env, wrappers

POLICIES = ("skip", "stop")
COUNTS_KEY = "nonfinite"


class NonFiniteError(FloatingPointError):
    """An update met inf/NaN gradients under ``guard_nonfinite`` (policy ``"stop"``, or a limit
    of skipped updates reached).

    Attributes:
        step: ``state.step`` going into that update (None if the guard lost track of it).
        micro_steps: the micro-steps (batches) whose summed gradients were non-finite.
        origins: ``(rank, micro_step, loss)`` of every non-finite loss of those micro-steps,
            on every rank; empty when every loss was finite (a gradient overflowed).
    """

    def __init__(self, message: str, step: int | None = None, micro_steps: range = range(0),
                 origins: tuple[tuple[int, int, float], ...] = ()) -> None:
        super().__init__(message)
        self.step, self.micro_steps, self.origins = step, micro_steps, origins


class NonFiniteCounts:
    """What ``guard_nonfinite`` counts, kept in ``state.extra["nonfinite"]`` so that checkpoints
    carry it: ``skipped`` updates in all, the last ``consecutive`` ones, and the step counter it
    follows to name a failed step."""

    __slots__ = ("skipped", "consecutive", "step", "last_micro", "_tensor")

    def __init__(self) -> None:
        self.skipped = self.consecutive = 0
        self.step: int | None = 0  # state.step as the guard follows it; None once lost
        self.last_micro = -1  # micro-step of the last update checked
        self._tensor: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "step": self.step,
                "last_micro": self.last_micro}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.skipped, self.consecutive = saved["skipped"], saved["consecutive"]
        self.step, self.last_micro = saved["step"], saved["last_micro"]
        self._tensor = None

    def skip(self) -> None:
        """Count one more skipped update."""
        self.skipped += 1
        self.consecutive += 1
        self._tensor = None

    def tensor(self) -> torch.Tensor:
        """``skipped`` as a tensor for the metrics: a new one only when it changes (a reported
        tensor is never written to afterwards)."""
        if self._tensor is None:
            self._tensor = torch.tensor(self.skipped)
        return self._tensor


@attrs.frozen(kw_only=True)
class _Config:
    policy: str
    max_consecutive: int | None
    max_skips: int | None


@attrs.frozen
class _Runtime:
    config: _Config
    counts: NonFiniteCounts
    window: list[tuple[int, torch.Tensor]]  # (micro-step, detached loss) since the last check
    models: tuple[weakref.ref, ...]


def guard_nonfinite(step: Any = MISSING, /, policy: Any = MISSING, *, max_consecutive: int | None = None,
                    max_skips: int | None = None) -> Any:
    """Skip (and count) or stop on an optimizer update whose gradients hold inf or NaN.

    At each update (the accumulation boundary) the gradients, summed over the micro-steps and
    reduced across ranks, are checked before clipping, whatever the composition order: their
    total 2-norm (as ``clip_gradients`` computes it) is inf/NaN if any element is, or if it
    overflows the gradients' dtype (a norm ``clip_grad_norm_`` could not clip either).

    ``"skip"``: the update is not applied: no ``optimizer.step()`` (its state is untouched, as
    under optax's ``apply_if_finite``), gradients zeroed, the scheduler not stepped, and
    ``state.step`` not advanced, as for a grad scaler's skip (``micro_step`` is: the batches
    are consumed). The number of skipped updates is in the metrics as ``skipped_updates`` (a
    tensor) and in ``state.extra["nonfinite"]``, which checkpoints carry.
    ``"stop"``: raise :class:`NonFiniteError` naming the step, the micro-batches, and the rank
    and micro-batch of the first non-finite loss; the parameters are as before that update.

    Args:
        step: the step to transform; omit it for the partial form.
        policy: ``"skip"`` or ``"stop"``.
        max_consecutive: with ``"skip"``, stop once more than this many updates in a row were
            skipped (None: no limit).
        max_skips: with ``"skip"``, stop once more than this many updates were skipped in all.

    Raises:
        ValueError: an unknown policy (lists the valid ones); a limit that is not a positive
            int, or a limit with ``"stop"``; combined with ``with_precision("16-mixed")``.
        NonFiniteError: (when the step runs) as above; every rank raises it alike.

    Example:
        >>> import torch, ltransform as lt
        >>> step = lt.pipe(lt.train_step(lambda m, b: m(b).sum()), lt.guard_nonfinite("skip"))
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> state, metrics = step(state, torch.tensor([[float("nan"), 1.0]]))
        >>> state.step, state.micro_step, int(metrics["skipped_updates"])
        (0, 1, 1)

    Note:
        Deciding whether to call ``optimizer.step()`` costs one host sync per update (the
        check's one ``bool``): the price of this opt-in transform. The check reads the reduced
        gradients, so with ``distribute`` every rank decides alike with no extra collective;
        a non-finite loss on one rank makes every rank's gradients non-finite. The names in
        the error (gathered from every rank) are only collected when it is raised.
        ``16-mixed`` is rejected: its grad scaler already skips inf/NaN updates, routinely
        (loss-scale overflow), which a guard would count or stop on. A hand-written step
        with several optimizers (a GAN) is checked per ``lt.optimizer_step(opt)`` call: each
        optimizer's gradients decide its own update, and each skip is counted.
    """
    if policy is MISSING and isinstance(step, str):
        step, policy = MISSING, step
    config = _config("skip" if policy is MISSING else policy, max_consecutive, max_skips)
    limits = "".join(f", {k}={v}" for k, v in (("max_consecutive", max_consecutive),
                                                 ("max_skips", max_skips)) if v is not None)
    transform = StepTransform(
        name=f"guard_nonfinite({config.policy!r}{limits})",
        kind="guard",
        handlers=(
            Handler(effect=Effect.BACKWARD, stage=Stage.LOSS_CHECK, fn=_keep_loss,
                    label="guard: keep the loss (detached), to name a non-finite one"),
            Handler(effect=Effect.OPTIMIZER_STEP, stage=Stage.FINITE_CHECK, fn=_check, when=When.BOUNDARY,
                    label=f"guard: if a gradient is inf/NaN, {_ACTIONS[config.policy]}"),
        ),
        prepare=lambda state: _prepare(state, config),
        rejects=_rejects,
    )
    return apply_step_transform(step, transform, "guard_nonfinite")


_ACTIONS = {"skip": "return False (no update; counted as skipped_updates)",
            "stop": "raise NonFiniteError (step, micro-batch, rank)"}


def _config(policy: Any, max_consecutive: Any, max_skips: Any) -> _Config:
    if policy not in POLICIES:
        raise ValueError(f"guard_nonfinite: unknown policy {policy!r}; expected one of: "
                         f"{', '.join(repr(p) for p in POLICIES)}")
    for name, value in (("max_consecutive", max_consecutive), ("max_skips", max_skips)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"guard_nonfinite: {name} must be a positive int or None, got {value!r}")
        if policy == "stop":
            raise ValueError(f"guard_nonfinite: {name} applies to policy='skip' only ('stop' stops at "
                             f"the first non-finite update); drop it or use policy='skip'")
    return _Config(policy=policy, max_consecutive=max_consecutive, max_skips=max_skips)


def _rejects(other: StepTransform) -> str | None:
    if other.kind == "precision" and isinstance(other.setting, str) and resolve_precision(other.setting).scaler:
        return (f"the grad scaler of {other.setting!r} already skips updates with inf/NaN gradients, "
                f"routinely (loss-scale overflow), which the guard would count or stop on; use one of "
                f"them, or 'bf16-mixed' with the guard")
    return None


def _prepare(state: Any, config: _Config) -> tuple[Any, _Runtime]:
    counts = get_extra(state, COUNTS_KEY)
    if not isinstance(counts, NonFiniteCounts):
        counts = NonFiniteCounts()
        state = with_extra(state, COUNTS_KEY, counts)
    step, micro = read_counters(state)
    counts.step, counts.last_micro = step, micro - 1  # follow the counters from here
    models = tuple(weakref.ref(m) for m in inventory(state).models.values())
    return state, _Runtime(config, counts, [], models)


def _keep_loss(rt: _Runtime, frame: Frame, loss: torch.Tensor, *, proceed: Any) -> Any:
    window = rt.window
    if window and window[0][0] <= rt.counts.last_micro:  # a new window: the last one was checked
        window.clear()
    window.append((frame.micro_step, loss.detach()))
    return proceed(frame, loss)


def _check(rt: _Runtime, frame: Frame, optimizer: torch.optim.Optimizer, *, proceed: Any) -> bool:
    counts, config = rt.counts, rt.config
    every = frame.window  # this window's micro-steps (an accumulation schedule varies it)
    if frame.micro_step != counts.last_micro and frame.micro_step - counts.last_micro != every:
        counts.step = None  # the counters were set under this binding (e.g. a load without our counts)
    counts.last_micro = frame.micro_step
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        norm = torch.nn.utils.get_total_norm(grads)  # the 2-norm: NaN/inf propagate; foreach, fast
        if hasattr(norm, "full_tensor"):  # sharded (DTensor) gradients: the global one, on every rank
            norm = norm.full_tensor()
    if not grads or math.isfinite(norm):  # the one host sync: whether to update at all
        counts.consecutive = 0
        applied = proceed(frame, optimizer)
        if applied and frame.applied == 0 and counts.step is not None:
            counts.step += 1  # the first update of this call advances state.step
        frame.report("skipped_updates", counts.tensor())
        return applied
    step = counts.step
    if config.policy == "stop":
        raise _error(rt, frame, every, step, "policy='stop'; policy='skip' would skip such updates")
    counts.skip()
    for limit, value, what in ((config.max_consecutive, counts.consecutive, "in a row"),
                               (config.max_skips, counts.skipped, "in all")):
        if limit is not None and value > limit:
            raise _error(rt, frame, every, step, f"{value} updates skipped {what}, over the limit of {limit}")
    frame.report("skipped_updates", counts.tensor())
    return False


def _error(rt: _Runtime, frame: Frame, every: int, step: int | None, why: str) -> NonFiniteError:
    """The stop error, naming what every rank saw (one collective, on this failure path only:
    every rank checked the same reduced gradients, so every rank is here)."""
    micro = range(frame.micro_step - every + 1, frame.micro_step + 1)
    mine = [(env.rank(), m, float(loss)) for m, loss in rt.window
            if m in micro and not math.isfinite(float(loss))]
    models = [ref() for ref in rt.models]
    reduced = any(m is not None and (wrappers.is_replicated(m) or wrappers.is_sharded(m)) for m in models)
    if reduced:
        mine = [o for rank in env.all_gather_objects(mine) for o in rank]
    origins = tuple(mine)
    batches = f"micro-step {micro[0]}" if len(micro) == 1 else f"micro-steps {micro[0]}-{micro[-1]}"
    if origins:
        r, m, loss = origins[0]
        where = f"first non-finite loss: rank {r}, micro-step {m} (loss={loss})"
        if len(origins) > 1:
            where += f", and {len(origins) - 1} more: " + ", ".join(
                f"rank {r} micro-step {m}" for r, m, _ in origins[1:])
    else:
        where = "every loss was finite, so a gradient became inf/NaN in backward (" + (
            "on a rank the gradients reduced across ranks cannot tell" if reduced else f"rank {env.rank()}") + ")"
    at = f"step {step}" if step is not None else "a step whose number the guard lost track of"
    return NonFiniteError(
        f"guard_nonfinite: inf/NaN gradients at {at} ({batches}); {where}. Stopped: {why}. "
        f"The parameters are as before this update; look at those batches, or lower the learning rate",
        step, micro, origins)
