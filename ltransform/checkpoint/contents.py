"""What a checkpoint holds besides weights: counters, RNG states, the data position, schedulers,
user extras and metadata, each as tensors and plain data (loadable with ``weights_only``)."""

from __future__ import annotations

import copy
import random
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch

from ltransform.core.inventory import Inventory
from ltransform.core.state import _replace, extras
from ltransform.io import CheckpointMismatchError, FileFormatError

FORMAT = "ltransform-checkpoint"
VERSION = 2  # 2: checksums (a full file's per tensor, a sharded one's manifest); 1 loads unchecked


def metadata(*, sharded: bool, precision: str | None) -> dict[str, Any]:
    from ltransform import __version__
    from ltransform.distributed import env

    return {"format": FORMAT, "version": VERSION, "ltransform": __version__, "torch": str(torch.__version__),
            "world_size": env.world_size(), "sharded": sharded, "precision": precision,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def check_metadata(meta: Any, where: str) -> None:
    """Check a checkpoint's metadata: ltransform's format, of a version this ltransform reads.

    Raises:
        FileFormatError: not an ltransform checkpoint, or of a newer format.
    """
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
        raise FileFormatError(
            f"{where} is not an ltransform checkpoint (no {FORMAT!r} metadata); for a file written "
            f"by plain PyTorch use lt.load_raw(path, model_or_optimizer)"
        )
    version = meta.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FileFormatError(f"{where} has a malformed checkpoint format version {version!r}: it is corrupt")
    if version > VERSION:
        raise FileFormatError(f"{where} has checkpoint format version {version!r}, newer than this "
                              f"ltransform ({VERSION}) reads; upgrade ltransform")


def optimizers(inv: Inventory) -> dict[str, tuple[torch.optim.Optimizer, torch.nn.Module, list[str]]]:
    """Each optimizer by path, with the module its parameters are named in (its model, or a
    ``ModuleDict`` of the models it spans) and each parameter's name."""
    out = {}
    for path, optimizer in inv.optimizers.items():
        try:
            module, names = inv.parameter_names(path)
        except ValueError as error:
            raise ValueError(f"checkpoint: {error}") from None
        out[path] = (optimizer, module, names)
    return out


def capture_rng() -> dict[str, Any]:
    """This process's random generators: Python, NumPy (if imported), torch CPU and CUDA."""
    rng: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        rng["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if "torch_xla.core.xla_model" in sys.modules:  # XLA's generator: a seed the runtime advances
        rng["xla"] = int(sys.modules["torch_xla.core.xla_model"].get_rng_state())
    return rng


def check_rng(rng: Any, where: str) -> None:
    """Check that saved RNG states can be restored, on throwaway generators (nothing global changes).

    Raises:
        FileFormatError: they cannot (the file is corrupt); names ``where``.
    """
    try:
        random.Random().setstate(_tuples(rng["python"]))
        torch.Generator().set_state(rng["torch"])
        numpy = _numpy() if "numpy" in rng else None
        if numpy is not None:
            numpy.random.RandomState().set_state(_numpy_state(rng["numpy"]))
        cuda = rng.get("cuda", [])
        if not (isinstance(cuda, list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)):
            raise TypeError(f"CUDA states must be a list of uint8 tensors, got {type(cuda).__name__}")
        if "xla" in rng and (type(rng["xla"]) is not int or rng["xla"] < 0):
            raise TypeError(f"the XLA state must be a non-negative int, got {rng['xla']!r}")
    except Exception as error:  # noqa: BLE001 - whatever the restore raised, the file is at fault
        raise FileFormatError(f"{where}: the saved random generator states cannot be restored "
                              f"({type(error).__name__}: {error}): the file is corrupt; load an earlier "
                              f"checkpoint") from None


def restore_rng(rng: Mapping[str, Any]) -> None:
    """Restore states :func:`check_rng` passed (NumPy's unless NumPy is not installed here)."""
    random.setstate(_tuples(rng["python"]))
    torch.set_rng_state(rng["torch"])
    numpy = _numpy() if "numpy" in rng else None
    if numpy is not None:
        numpy.random.set_state(_numpy_state(rng["numpy"]))
    if "cuda" in rng and torch.cuda.is_available():  # (as many devices as both have)
        torch.cuda.set_rng_state_all(rng["cuda"][:torch.cuda.device_count()])
    if "xla" in rng and "torch_xla.core.xla_model" in sys.modules:
        sys.modules["torch_xla.core.xla_model"].set_rng_state(rng["xla"])


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # then nothing here can draw from NumPy's generator
        return None
    return numpy


def _numpy_state(n: Mapping[str, Any]) -> tuple[Any, ...]:
    return n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]


def _tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples where a round trip may have left lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def capture_extras(inv: Inventory, apart: Mapping[str, Any] | None = None, *, sharded: bool = False) -> dict[str, Any]:
    """``state.extra``: objects with ``state_dict`` by their state, plain data as it is. Models,
    optimizers and schedulers kept in extra are saved with the others, not here again. The
    objects holding DTensors (``apart``, see :func:`sharded_extras`) are marked ``sharded`` if
    ``sharded`` (their state is saved with the models, each rank its shards), else saved as
    given (gathered by :func:`gather_extras`)."""
    out: dict[str, Any] = {}
    apart = apart or {}
    for key, value in inv.extras.items():
        if key in apart:
            out[key] = {"sharded": True} if sharded else {"stateful": apart[key]}
        elif callable(getattr(value, "state_dict", None)):
            out[key] = {"stateful": value.state_dict()}
        elif _plain(value):
            out[key] = {"value": value}
        else:
            raise TypeError(
                f"checkpoint: state.extra[{key!r}] is a {type(value).__name__}, which has no "
                f"state_dict() and is not plain data (tensors, numbers, strings, lists, dicts); "
                f"give it state_dict/load_state_dict or keep it out of the state"
            )
    return out


def sharded_extras(inv: Inventory) -> dict[str, Any]:
    """The state dicts of the ``state.extra`` objects that hold DTensors (sharded like a sharded
    model, e.g. its ``lt.ema`` average), which no one rank holds whole: a sharded checkpoint saves
    them with the models (each rank its shards), a full one gathers them. Call on every rank."""
    from torch.utils._pytree import tree_leaves

    out = {}
    for key, value in inv.extras.items():
        if callable(getattr(value, "state_dict", None)):
            saved = value.state_dict()
            if any(isinstance(leaf, torch.Tensor) and hasattr(leaf, "device_mesh") for leaf in tree_leaves(saved)):
                out[key] = saved
    return out


def gather_extras(inv: Inventory) -> dict[str, Any]:
    """:func:`sharded_extras` gathered, on rank 0 and on the CPU (None elsewhere): every rank calls
    it, the same all-gathers in the same order."""
    from torch.utils._pytree import tree_map

    from ltransform.distributed import env

    def gather(value: Any) -> Any:
        if not (isinstance(value, torch.Tensor) and hasattr(value, "device_mesh")):
            return value
        full = value.full_tensor()  # type: ignore[attr-defined]
        return full.cpu() if env.rank() == 0 else None

    return {key: tree_map(gather, saved) for key, saved in sharded_extras(inv).items()}


def check_extras(state: Any, saved: Mapping[str, Any], where: str) -> None:
    """Check that ``restore_extras`` can restore ``saved``: each entry well formed, and each
    object's state_dict with a live object to load it into.

    Raises:
        FileFormatError: an entry is malformed (the file is corrupt).
        CheckpointMismatchError (also a RuntimeError): the state lacks an object the checkpoint has.
    """
    live = extras(state)
    for key, entry in saved.items():
        if not (isinstance(entry, Mapping) and len(entry) == 1 and {"stateful", "value", "sharded"} & set(entry)):
            raise FileFormatError(f"{where}: the checkpoint's state.extra[{key!r}] is malformed: it is corrupt "
                                  f"or not one ltransform wrote")
        if {"stateful", "sharded"} & set(entry) and not callable(getattr(live.get(key), "load_state_dict", None)):
            raise CheckpointMismatchError(
                f"{where}: the checkpoint has state.extra[{key!r}] (an object's state_dict), but "
                f"the state has no such object to load it into; prepare the step first "
                f"(lt.prepare(step, state)), or the hook that creates it (hook.prepare(state): lt.ema's)")


def restore_extras(state: Any, saved: Mapping[str, Any]) -> Any:
    """Restore the plain values among extras :func:`check_extras` passed, in a new state (the
    objects among them are loaded by :func:`load_objects`)."""
    values = {key: entry["value"] for key, entry in saved.items() if "value" in entry}
    return _replace(state, extra={**extras(state), **values}) if values else state


def user_objects(inv: Inventory, state: Any, common: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(label, object, saved state)`` for every scheduler and ``state.extra`` object the checked
    ``common`` part of a checkpoint restores, in the order they are loaded."""
    live = extras(state)
    out = [(f"scheduler {name!r}", scheduler, common["schedulers"][name])
           for name, scheduler in inv.schedulers.items() if name in common["schedulers"]]
    return out + [(f"state.extra[{key!r}]", live[key], entry["stateful"])
                  for key, entry in common["extra"].items() if "stateful" in entry]


class Undo:
    """Deep copies of the ``state_dict()`` of objects about to be loaded, to put them back with."""

    def __init__(self, objects: list[tuple[str, Any, Any]]) -> None:
        self.objects = [(label, obj, _copy(obj.state_dict())) for label, obj, _ in objects]

    def __call__(self, count: int | None = None) -> list[str]:
        """Put back every object (or the first ``count``); the labels of those that refused."""
        refused = []
        for label, obj, before in self.objects[:count]:
            try:
                obj.load_state_dict(before)
            except Exception:  # noqa: BLE001 - reported by the caller, after the error that matters
                refused.append(label)
        return refused


def _copy(value: Any) -> Any:
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - not deep-copyable: its own dict (whose values load_state_dict replaces)
        return dict(value) if isinstance(value, Mapping) else value


def load_objects(objects: list[tuple[str, Any, Any]], undo: Undo, where: str) -> None:
    """Load each object's saved state (user code: its ``load_state_dict`` may raise). If one
    raises, every object is put back as it was (``undo``) and the load fails.

    Raises:
        CheckpointMismatchError: an object refused its saved state; names it and ``where``.
    """
    for done, (label, obj, saved) in enumerate(objects):
        try:
            obj.load_state_dict(saved)
        except BaseException as error:
            refused = undo(done + 1)  # (the one that raised too: it may have changed half-way)
            if not isinstance(error, Exception):
                raise
            after = (f"; {', '.join(refused)} refused its state from before the load too, and may be partly "
                     f"loaded" if refused else "; the state is as it was before the load")
            raise CheckpointMismatchError(
                f"{where}: {label} cannot load its saved state ({type(error).__name__}: {error}){after}. Build it "
                f"as it was saved, or load with a state that leaves it out") from error


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


def counters(inv: Inventory) -> dict[str, int]:
    return {"step": inv.step, "micro_step": inv.micro_step, "epoch": inv.epoch}


def restore_counters(state: Any, saved: Mapping[str, int]) -> Any:
    changes = {k: v for k, v in saved.items()
               if k != "epoch" or isinstance(state, Mapping) or hasattr(state, "epoch")}
    return _replace(state, **changes)


def optimizer_state(names: list[str], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A plain (unsharded) optimizer's state keyed by parameter names (:func:`optimizers`), in
    the format of torch's ``get_optimizer_state_dict``, without its trick of a zero step to
    create missing state (which allocates a gradient for every parameter)."""
    saved = optimizer.state_dict()
    return {"state": {names[i]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}


def check_optimizer_state(names: list[str], optimizer: torch.optim.Optimizer, saved: Any, where: str) -> None:
    """Check that :func:`load_optimizer_state` can load ``saved``: the same parameter groups, of
    the same sizes, and a state of tensors and numbers by parameter name.

    Raises:
        CheckpointMismatchError: the groups differ (the optimizer is not built as it was saved).
        FileFormatError: ``saved`` is malformed (the file is corrupt).
    """
    groups = optimizer.state_dict()["param_groups"]
    saved_groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    state = saved.get("state", {}) if isinstance(saved, Mapping) else None
    if not (isinstance(saved_groups, list) and all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
                                                   for g in saved_groups) and isinstance(state, Mapping)):
        raise FileFormatError(f"{where}: its saved state is malformed: the file is corrupt or not one ltransform wrote")
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in saved_groups]:
        raise CheckpointMismatchError(
            f"{where}: the optimizer has parameter groups of {[len(g['params']) for g in groups]} parameters, "
            f"the checkpoint {[len(g['params']) for g in saved_groups]}; build the optimizer as it was saved")
    if not all(isinstance(v, Mapping) for v in state.values()):
        raise FileFormatError(f"{where}: its saved per-parameter state is malformed: the file is corrupt")


def load_optimizer_state(names: list[str], optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """Load a state saved by :func:`optimizer_state` (or torch's FQN format), checked by
    :func:`check_optimizer_state`, into a plain optimizer."""
    index = {name: i for i, name in enumerate(names)}
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({
        "state": {index[name]: v for name, v in saved.get("state", {}).items() if name in index},
        "param_groups": [{**g, "params": live["params"]} for g, live in zip(saved["param_groups"], groups)],
    })
