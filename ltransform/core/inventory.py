"""One inventory of a state: one walk, with paths, finds every model, optimizer, scheduler,
counter and extra; ``prepare``, the runner and checkpoints all read it.

A state is an ``lt.State``, any attrs class, dataclass, dict, list or tuple of them, or a bare
module. Paths name where an object sits (``"model"``, ``"model.enc"``, ``"extra.ema"``); an
object is found once, at its first path, and the walk does not descend into torch objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import torch

from ltransform.core.state import State, read_counters, read_epoch
from ltransform.core.state import extras as state_extras
from ltransform.distributed.xla import unwrapped_name

Scheduler = torch.optim.lr_scheduler.LRScheduler
_LEAVES = (torch.Tensor, torch.nn.Module, torch.optim.Optimizer, Scheduler, str, bytes)


@attrs.frozen
class Inventory:
    """What a state holds, by path.

    Args:
        models: every ``nn.Module`` (not their submodules).
        optimizers: every ``torch.optim.Optimizer``.
        schedulers: every LR scheduler.
        extras: ``state.extra`` entries that are none of the above (a grad scaler, user values).
        step, micro_step, epoch: the state's counters (0 where it has none).
    """

    models: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    extras: dict[str, Any]
    step: int = 0
    micro_step: int = 0
    epoch: int = 0

    def the_one(self, kind: str, call: str = "train_step") -> Any:
        """The single model / optimizer / scheduler (None if there is no scheduler)."""
        kinds: dict[str, dict[str, Any]] = {"model": self.models, "optimizer": self.optimizers,
                                            "scheduler": self.schedulers}
        found = kinds[kind]
        if len(found) == 1:
            return next(iter(found.values()))
        if not found and kind == "scheduler":
            return None
        raise TypeError(
            f"{call}: expected exactly one {kind} in the state, found {len(found)}; with several "
            f"models or optimizers write the step by hand, calling lt.backward(loss) and "
            f"lt.optimizer_step(optimizer) for each"
            f"{' (found: ' + ', '.join(map(repr, found)) + ')' if found else ''}"
        )

    def parameter_names(self, path: str) -> tuple[torch.nn.Module, list[str]]:
        """The module the optimizer at ``path`` trains and the name of each of its parameters
        (in the order of its ``state_dict``).

        An optimizer over one model is named by that model's parameter names. One over several
        models gets a ``ModuleDict`` holding them, keyed by their paths (``"."`` written ``"/"``),
        so names read ``"model/enc.0.weight"``: the same names torch's DCP helpers give it.

        Raises:
            ValueError: a parameter belongs to no model of the state.
        """
        optimizer = self.optimizers[path]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        owners: dict[int, tuple[str, str]] = {}
        for model_path, model in self.models.items():
            for name, param in model.named_parameters(remove_duplicate=False):
                owners.setdefault(id(param), (model_path, unwrapped_name(name)))  # (XLA's FSDPv2 wraps)
        orphans = [i for i, p in enumerate(params) if id(p) not in owners]
        if orphans:
            raise ValueError(
                f"optimizer {path!r} holds {len(orphans)} parameter(s) (e.g. index {orphans[0]}) that "
                f"belong to no model of the state (models: {sorted(self.models)}); put every model it "
                f"trains in the state"
            )
        used = list(dict.fromkeys(owners[id(p)][0] for p in params))
        if len(used) == 1:
            return self.models[used[0]], [owners[id(p)][1] for p in params]
        keys = {m: m.replace(".", "/") for m in used}
        joint = torch.nn.ModuleDict({keys[m]: self.models[m] for m in used})
        return joint, [f"{keys[owners[id(p)][0]]}.{owners[id(p)][1]}" for p in params]


def inventory(state: Any) -> Inventory:
    """Walk ``state`` once and return its :class:`Inventory`.

    Example:
        >>> import torch, ltransform as lt
        >>> from ltransform.core.inventory import inventory
        >>> enc, dec = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD([*enc.parameters(), *dec.parameters()])
        >>> inv = inventory(lt.State(model={"enc": enc, "dec": dec}, optimizer=opt))
        >>> sorted(inv.models), list(inv.optimizers), inv.parameter_names("optimizer")[1][:2]
        (['model.dec', 'model.enc'], ['optimizer'], ['model/enc.weight', 'model/enc.bias'])
    """
    if isinstance(state, torch.nn.Module):
        return Inventory({"model": state}, {}, {}, {})
    models: dict[str, Any] = {}
    optimizers: dict[str, Any] = {}
    schedulers: dict[str, Any] = {}
    seen: set[int] = set()
    for path, value in _walk(state, ""):
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.nn.Module):
            models[path] = value
        elif isinstance(value, torch.optim.Optimizer):
            optimizers[path] = value
        else:
            schedulers[path] = value
    extra = state_extras(state)
    found = {*models, *optimizers, *schedulers}
    extras = {k: v for k, v in extra.items() if not any(p == f"extra.{k}" or p.startswith(f"extra.{k}.")
                                                       for p in found)}
    try:
        step, micro = read_counters(state)
    except TypeError:
        step, micro = 0, 0
    return Inventory(models, optimizers, schedulers, extras, step, micro, read_epoch(state))


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    for name, value in _children(node):
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(value, (torch.nn.Module, torch.optim.Optimizer, Scheduler)):
            yield path, value
        elif not isinstance(value, _LEAVES):
            yield from _walk(value, path)


def _children(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        yield from ((str(k), v) for k, v in node.items())
    elif attrs.has(type(node)):
        yield from ((a.name, getattr(node, a.name)) for a in attrs.fields(type(node)))
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        yield from ((f.name, getattr(node, f.name)) for f in dataclasses.fields(node))
    elif isinstance(node, (list, tuple)):
        yield from ((str(i), v) for i, v in enumerate(node))


def anchor(state: Any, inv: Inventory | None = None) -> Any:
    """The object a state's binding is found by: its (first) model, else its optimizer.

    The torch objects of a state outlive the frozen records that carry them from step to step,
    so a step called directly finds the binding made for this state's objects, never another's.
    """
    if type(state) is State and isinstance(state.model, torch.nn.Module):
        return state.model  # the per-call fast path
    inv = inv or inventory(state)
    for found in (inv.models, inv.optimizers):
        if found:
            return next(iter(found.values()))
    return None
