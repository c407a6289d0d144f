"""Strategy names for ``distribute``, each mapped to a frozen record."""

from __future__ import annotations

import datetime
import math

import attrs

_NAMES = ("auto", "single", "ddp", "fsdp", "hsdp", "xla")


def _as_timeout(value: object) -> datetime.timedelta | None:
    """Seconds (or a timedelta, or None) as a timedelta; idempotent, as ``attrs.evolve`` needs."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, datetime.timedelta)):
        raise TypeError(f"Strategy(timeout={value!r}): expected seconds (a number) or a datetime.timedelta")
    if isinstance(value, datetime.timedelta):
        timeout = value
    elif not math.isfinite(value) or value >= _MAX_SECONDS:  # (timedelta would raise OverflowError or ValueError)
        raise ValueError(f"Strategy(timeout={value!r}): expected a positive finite number of seconds (at most "
                         f"{_MAX_SECONDS:g}), or a datetime.timedelta, e.g. timeout=600")
    else:
        timeout = datetime.timedelta(seconds=value)
    if timeout <= datetime.timedelta(0):
        raise ValueError(f"Strategy(timeout={value!r}): expected a positive number of seconds, e.g. timeout=600")
    return timeout


def _boolean(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"Strategy({attribute.name}={value!r}): expected True or False")


_MAX_SECONDS = datetime.timedelta.max.total_seconds()
_GRADIENT_TIMEOUTS: set[datetime.timedelta] = set()  # of the gradient groups made in this process (for messages)


def note_gradient_group(timeout: datetime.timedelta) -> None:
    """Record that a gradient group with this timeout was made, for ``env.collective_error``'s message."""
    _GRADIENT_TIMEOUTS.add(timeout)


def gradient_group_timeouts() -> frozenset[datetime.timedelta]:
    """The timeouts of the gradient groups ``lt.Strategy(timeout=)`` made in this process."""
    return frozenset(_GRADIENT_TIMEOUTS)


@attrs.frozen(kw_only=True)
class Strategy:
    """How a step's gradients are shared across ranks.

    Args:
        name: ``"auto"`` (``"xla"`` on XLA, ``"single"`` on one process, ``"fsdp"``/``"hsdp"``
            for a model sharded with ``lt.shard``, else ``"ddp"``), ``"single"``, ``"ddp"``
            (torch's composable ``replicate``), ``"fsdp"`` (FSDP2; the model sharded with
            ``lt.shard``), ``"hsdp"`` (FSDP2 on a 2-D mesh, ``lt.shard(model, mesh=(replicas,
            shards))``), ``"xla"`` (torch_xla's SPMD: each batch split over the devices).
        sync_micro_steps: also reduce gradients on non-boundary accumulation micro-steps.
            Off by default (no communication until the boundary); for FSDP, turning it on
            keeps gradients sharded between micro-steps, saving memory at the cost of
            communication. (On XLA gradients are reduced inside the compiled step: no effect.)
        graph_per_update: on XLA, trace a whole accumulation window into one program, cut
            only at the optimizer update, instead of one program per micro-step (the default:
            measured 8-10% faster on XLA's CPU backend with ``accumulate(4)``, and its programs
            compile in half the time).
        find_unused_parameters: DDP's option of that name: for a model whose forward leaves some
            parameters out on some steps (a branch taken only sometimes); DDP then walks the
            autograd graph after each forward to mark them ready. Without it such a model fails
            at the next step with torch's "Expected to have finished reduction" error.
        static_graph: DDP's option of that name: the set of parameters used, and their order,
            is the same on every step (DDP records it on the first and skips the checks; also
            allows unused parameters and reentrant activation checkpointing).
        timeout: the gradient all-reduce's collective timeout, in seconds or a ``timedelta``.
            The model's gradients are then reduced over a process group of every rank created
            for it (``torch.distributed.new_group(timeout=...)``) when the step is prepared,
            whether or not the default group already exists; every other collective (``lt``'s
            own, checkpoints, barriers) keeps the default group's timeout, which
            ``lt.launch(timeout=)`` or ``LTRANSFORM_COLLECTIVE_TIMEOUT`` set.

    These three apply to ``name="ddp"`` (or ``"auto"`` where it resolves to DDP; on one process
    nothing is wrapped and they have no effect). FSDP2 has neither option, and its process
    group is the device mesh given to ``lt.shard``.

    With ``static_graph`` and ``lt.accumulate``, the first micro-step synchronises its gradients
    even when ``sync_micro_steps`` is off: DDP records the graph on its first iteration and cannot
    record it without the reduction (the result is the same: the average is linear).

    Raises:
        ValueError: an unknown name, a timeout that is not a positive finite number of seconds, an
            option of another strategy (``find_unused_parameters``, ``static_graph``, ``timeout`` on
            ``"fsdp"``; ``graph_per_update`` off XLA).
        TypeError: a timeout that is neither seconds nor a ``timedelta``; a flag that is not
            ``True`` or ``False``.

    Example:
        >>> import ltransform as lt
        >>> lt.Strategy(name="fsdp", sync_micro_steps=True).sync_micro_steps
        True
        >>> lt.Strategy(name="ddp", find_unused_parameters=True, timeout=60).timeout
        datetime.timedelta(seconds=60)
    """

    name: str = attrs.field(validator=attrs.validators.in_(_NAMES))
    sync_micro_steps: bool = attrs.field(default=False, validator=_boolean)
    graph_per_update: bool = attrs.field(default=False, validator=_boolean)
    find_unused_parameters: bool = attrs.field(default=False, validator=_boolean)
    static_graph: bool = attrs.field(default=False, validator=_boolean)
    timeout: datetime.timedelta | None = attrs.field(default=None, converter=_as_timeout)

    @graph_per_update.validator
    def _only_on_xla(self, attribute: attrs.Attribute, value: bool) -> None:
        if value and self.name not in ("xla", "auto"):
            raise ValueError(f"Strategy(name={self.name!r}, graph_per_update=True): graph_per_update is about XLA's "
                             f"traced graph; it applies to name='xla' (or 'auto' on XLA)")

    @find_unused_parameters.validator
    @static_graph.validator
    @timeout.validator
    def _only_on_ddp(self, attribute: attrs.Attribute, value: object) -> None:
        if value and self.name not in ("ddp", "auto"):
            shown = f"{value.total_seconds():g}" if isinstance(value, datetime.timedelta) else repr(value)
            fix = ("set the default group's timeout with lt.launch(timeout=SECONDS) or "
                   "LTRANSFORM_COLLECTIVE_TIMEOUT=SECONDS" if attribute.name == "timeout"
                   else "leave it out")
            raise ValueError(f"Strategy(name={self.name!r}, {attribute.name}={shown}): {attribute.name} is an option "
                             f"of DDP; it applies to name='ddp' (or 'auto'); for {self.name!r}, {fix}")

    @property
    def ddp_options(self) -> bool:
        """Whether any DDP option differs from its default."""
        return self.find_unused_parameters or self.static_graph or self.timeout is not None

    @property
    def shards(self) -> bool:
        return self.name in ("fsdp", "hsdp")


STRATEGIES = {name: Strategy(name=name) for name in _NAMES}


def resolve_strategy(strategy: object) -> Strategy:
    """The record for a strategy name (or the record itself)."""
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str) and strategy in STRATEGIES:
        return STRATEGIES[strategy]
    raise ValueError(
        f"distribute: unknown strategy {strategy!r}; expected one of: "
        f"{', '.join(map(repr, _NAMES))}, or an lt.Strategy(...)"
    )
