"""``lt.save``, ``lt.load``, ``lt.checkpoint_sharded``, ``lt.load_raw``: checkpoints of a whole state."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from ltransform import io
from ltransform.checkpoint import contents, files, sharded
from ltransform.core.inventory import Inventory, inventory
from ltransform.distributed import env

Filter = Callable[[str, torch.Tensor], bool]


def save(path: str | os.PathLike[str], state: Any, *, sharded: bool = False, filter: Any = None,
         async_save: bool = False) -> Path:
    """Save ``state`` to ``path``: one file, or with ``sharded=True`` a DCP directory.

    Holds every model and optimizer, schedulers, ``step``/``micro_step``/``epoch``, each rank's
    RNG states (Python, NumPy, torch CPU and CUDA), the data position of the ``lt.run`` in
    progress, ``state.extra`` (objects by their ``state_dict``) and metadata (format version,
    ltransform and torch versions, world size, time). The file or directory is written aside
    and renamed into place, so a crash mid-save leaves the previous checkpoint loadable.

    Args:
        path: a file (full) or a directory (sharded).
        state: the training state.
        sharded: each rank writes its own shards (DCP); required for async saves. Full saves
            gather sharded models to rank 0, offloaded to the CPU, and rank 0 writes one file.
        filter: keep only some model entries: ``fn(name, tensor) -> bool`` for every model, or
            ``{"model": fn}`` by the model's field name. Load such a file with ``strict=False``.
        async_save: sharded only: write in the background; the next ``lt.optimizer_step`` waits
            for it before touching parameters.

    Returns:
        The path written.

    Example:
        >>> import tempfile, torch, ltransform as lt
        >>> model = torch.nn.Linear(2, 1)
        >>> state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> path = lt.save(tempfile.mkdtemp() + "/ckpt.pt", state)
        >>> lt.load(path, state).step
        0
    """
    path = Path(path)
    if async_save and not sharded:
        raise ValueError("lt.save: async_save=True needs sharded=True (a full save gathers on rank 0)")
    inv = inventory(state)
    finish_pending(inv)
    filters = _filters(filter, inv.models)
    if sharded:
        return _save_sharded(path, inv, filters, async_save)
    return _save_full(path, inv, filters)


def _filters(filter: Any, modules: Mapping[str, torch.nn.Module]) -> dict[str, Filter]:
    if filter is None:
        return {}
    if callable(filter):
        return {name: filter for name in modules}
    if isinstance(filter, Mapping):
        unknown = sorted(set(filter) - set(modules))
        if unknown:
            raise ValueError(f"lt.save: filter names {unknown}, which are not models of the state; "
                             f"models: {sorted(modules)}")
        return dict(filter)
    raise TypeError(f"lt.save: filter must be fn(name, tensor) -> bool or {{model: fn}}, got {filter!r}")


def _common(inv: Inventory, sharded_: bool) -> dict[str, Any]:
    from ltransform.core.position import RUNNING

    running = RUNNING.get()
    precision = running.precision if running is not None else None
    return {"meta": contents.metadata(sharded=sharded_, precision=precision),
            "counters": contents.counters(inv),
            "schedulers": {n: s.state_dict() for n, s in inv.schedulers.items()},
            "extra": contents.capture_extras(inv)}


def _per_rank() -> dict[str, Any]:
    from ltransform.core.position import current

    return {"rng": contents.capture_rng(), "data": current()}


def _tensors(inv: Inventory, filters: Mapping[str, Filter], *, full: bool) -> dict[str, Any]:
    """Every model's and optimizer's state dict, keyed by parameter names: gathered to rank 0
    on the CPU (``full``), or each rank's shards (DCP's form). Plain optimizers are read
    directly (torch's helper would allocate a gradient per parameter to create missing state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    models = {}
    for name, module in inv.models.items():
        keep = filters.get(name)
        models[name] = {k: v for k, v in _model_state(module, options).items() if keep is None or keep(k, v)}
    optimizers = {name: get_optimizer_state_dict(module, opt, options=options) if _has_dtensors(module)
                  else contents.optimizer_state(names, opt)
                  for name, (opt, module, names) in contents.optimizers(inv).items()}
    return {"models": models, "optimizers": optimizers}


def _save_full(path: Path, inv: Inventory, filters: Mapping[str, Filter]) -> Path:
    tensors = _tensors(inv, filters, full=True)
    per_rank = env.all_gather_objects(_per_rank())
    if env.rank() == 0:
        io.write_file(path, {**_common(inv, False), **tensors, "ranks": per_rank})
    env.barrier()
    return path


def _save_sharded(path: Path, inv: Inventory, filters: Mapping[str, Filter], async_save: bool) -> Path:
    if env.rank() == 0:
        shutil.rmtree(io.partial_path(path), ignore_errors=True)
    env.barrier()
    future = sharded.save_tensors(_tensors(inv, filters, full=False), path, async_save=async_save)
    tmp = io.partial_path(path)
    tmp.mkdir(parents=True, exist_ok=True)
    io.write_file(tmp / f"rank-{env.rank()}.pt", _per_rank())
    if env.rank() == 0:
        io.write_file(tmp / "common.pt", _common(inv, True))
    if future is None:
        _publish(path)
    else:
        _PendingSave(future, path, inv)
    return path


def _publish(path: Path) -> None:
    env.barrier()  # every rank has written its part
    if env.rank() == 0:
        files.publish_directory(path)
    env.barrier()


_PENDING = "_ltransform_pending_saves"


class _PendingSave:
    """An async sharded save still being written. The optimizers of the saved state wait for it
    before their next update (``Optimizer.register_step_pre_hook``: a user's own
    ``optimizer.step()`` waits too), since the writer is still reading the parameters; the hooks
    are removed once the save is published. It is also kept with the state's models and
    optimizers, so a later save or load of that state, or the end of ``lt.run``, finishes it."""

    def __init__(self, future: Future, path: Path, inv: Inventory) -> None:
        self.future, self.path, self.done = future, path, False
        self.owners = [*inv.models.values(), *inv.optimizers.values()]
        self.handles = [o.register_step_pre_hook(self._before_update) for o in inv.optimizers.values()]
        for owner in self.owners:
            object.__setattr__(owner, _PENDING, [*getattr(owner, _PENDING, ()), self])
        if not self.handles:  # nothing would wait for it before parameters change: finish now
            self.finish()

    def _before_update(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.finish()

    def finish(self) -> None:
        """Wait for the writes, then publish the directory (on every rank together)."""
        if self.done:
            return
        self.done = True
        for handle in self.handles:
            handle.remove()
        for owner in self.owners:
            left = [p for p in getattr(owner, _PENDING, ()) if p is not self]
            object.__setattr__(owner, _PENDING, left)
        self.future.result()
        _publish(self.path)


def finish_pending(state: Any) -> None:
    """Finish the async saves of ``state`` (or of an inventory of it) still in progress."""
    inv = state if isinstance(state, Inventory) else inventory(state)
    for owner in [*inv.models.values(), *inv.optimizers.values()]:
        for pending in list(getattr(owner, _PENDING, ())):
            pending.finish()


def load(path: str | os.PathLike[str], state: Any, *, strict: bool = True) -> Any:
    """Load a checkpoint written by ``lt.save`` / ``lt.checkpoint_sharded`` into ``state``.

    Models and optimizers are loaded in place (sharded ones reshard to this world size: save on
    N ranks, load on M, or on one process with no group); counters, schedulers, extras and this
    rank's RNG states are restored. A full file is memory-mapped, so tensors are read as they
    are copied into the model: peak memory stays near one copy of the model.

    Args:
        path: a checkpoint file, a sharded checkpoint directory, or a directory of
            ``step-N`` checkpoints (the latest is loaded).
        state: the state to load into (models and optimizers built as for training, and the
            step prepared, so that e.g. a grad scaler exists).
        strict: every model key must be in the checkpoint and vice versa; False loads the
            matching ones (e.g. a file saved with ``filter``).

    Returns:
        The state with the checkpoint's counters (and extras).

    Raises:
        FileNotFoundError: no such file or directory.
        ltransform.io.FileFormatError (a ValueError and a RuntimeError): an empty, truncated or
            corrupt file, or one that is not a checkpoint at all; ValueError: a file torch.save
            wrote that is not an ltransform checkpoint. Each names the file.
        pickle.UnpicklingError: a file holding arbitrary Python objects (not unpickled).
        KeyError: with ``strict``, names the missing and unexpected keys.
    """
    return load_with_position(path, state, strict=strict)[0]


def load_with_position(path: str | os.PathLike[str], state: Any, *, strict: bool = True) -> tuple[Any, Any]:
    """``load``, also returning this rank's saved data position (None if saved outside lt.run)."""
    inv = inventory(state)
    finish_pending(inv)
    path = files.resolve(path)
    if path.is_dir():
        return _load_sharded(path, state, inv, strict)
    payload = io.read_file(path)
    contents.check_metadata(payload.get("meta") if isinstance(payload, Mapping) else None, repr(str(path)))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # Sharded models go through torch's full-state-dict loaders (which reshard); plain ones load
    # directly from the mapped file (torch's helpers would allocate a gradient per parameter)
    options = StateDictOptions(full_state_dict=True, strict=strict)
    for name, module in inv.models.items():
        saved = payload["models"].get(name)
        if saved is None:
            raise KeyError(f"lt.load({str(path)!r}): the checkpoint has no model {name!r}; it has "
                           f"{sorted(payload['models'])}")
        if strict:
            check_keys(path, name, set(module.state_dict()), set(saved))
        _load_module(module, saved, options)
    for name, (opt, module, names) in contents.optimizers(inv).items():
        if name in payload["optimizers"]:
            if _has_dtensors(module):
                set_optimizer_state_dict(module, opt, payload["optimizers"][name], options=options)
            else:
                contents.load_optimizer_state(names, opt, payload["optimizers"][name])
        elif strict:
            raise KeyError(f"lt.load({str(path)!r}): the checkpoint has no optimizer {name!r}")
    ranks = payload["ranks"]
    return _restore_common(state, inv, payload, ranks[env.rank() % len(ranks)])


def _model_state(module: torch.nn.Module, options: Any) -> dict[str, Any]:
    """A model's state dict keyed by parameter names: torch's helper for sharded models
    (gathered or as shards); a plain model's own ``state_dict()``, which also carries entries
    torch's helper cannot map to attributes (bitsandbytes' quantization state)."""
    if _has_dtensors(module):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(module, options=options)
    state = module.state_dict()
    return {k: v.cpu() for k, v in state.items()} if options.cpu_offload else state


def _load_module(module: torch.nn.Module, saved: dict[str, Any], options: Any) -> None:
    """Load a model's state dict: sharded models through torch's loader (which reshards), plain
    ones directly (from the mapped file). Quantized layers load their packed state themselves
    (``lt.quantize`` gives them a load hook)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if _has_dtensors(module):
        set_model_state_dict(module, saved, options=options)
        return
    module.load_state_dict(saved, strict=options.strict)


def _is_quantized(module: torch.nn.Module) -> bool:
    """Holds bitsandbytes layers (checked without importing bitsandbytes)."""
    return any(type(m).__module__.startswith("bitsandbytes") for m in module.modules())


def _has_dtensors(module: torch.nn.Module) -> bool:
    """Sharded (DTensor) parameters, which only torch's DCP helpers can gather or reshard."""
    return any(hasattr(p, "device_mesh") for p in module.parameters())


def check_keys(path: Path, name: str, expected: set[str], saved: set[str]) -> None:
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise KeyError(
            f"lt.load({str(path)!r}): model {name!r} does not match the checkpoint: missing keys "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}, unexpected keys "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}; pass strict=False to load "
            f"the keys that match"
        )


def _restore_common(state: Any, inv: Inventory, common: Mapping[str, Any],
                    mine: Mapping[str, Any]) -> tuple[Any, Any]:
    for name, scheduler in inv.schedulers.items():
        if name in common["schedulers"]:
            scheduler.load_state_dict(common["schedulers"][name])
    state = contents.restore_counters(state, common["counters"])
    state = contents.restore_extras(state, common["extra"])
    contents.restore_rng(mine["rng"])
    return state, mine.get("data")


def _load_sharded(path: Path, state: Any, inv: Inventory, strict: bool) -> tuple[Any, Any]:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    common = io.read_file(path / "common.pt")
    contents.check_metadata(common.get("meta"), repr(str(path)))
    mods, opts = inv.models, contents.optimizers(inv)
    # Models and sharded optimizers load in place into a template of their state. Two kinds
    # are read as saved instead (the subtree rebuilt from the metadata) and loaded directly:
    # plain optimizers, whose template would first create every missing state tensor with a
    # zero step (a gradient per parameter: most of the load time measured), and quantized
    # models, whose packed quantization state varies in size and cannot be a template.
    plain = {n for n, (_, m, _) in opts.items() if not _has_dtensors(m)}
    quantized = {n for n, m in mods.items() if _is_quantized(m)}
    tensors = {"models": {n: _model_state(m, StateDictOptions()) for n, m in mods.items() if n not in quantized},
               "optimizers": {n: get_optimizer_state_dict(m, o) for n, (o, m, _) in opts.items() if n not in plain}}
    if strict:
        stored = sharded.checkpoint_keys(path)
        for name, module in mods.items():
            prefix = f"models.{name}."
            expected = set(tensors["models"][name]) if name in tensors["models"] else set(module.state_dict())
            check_keys(path, name, expected, {k[len(prefix):] for k in stored if k.startswith(prefix)})
    sharded.load_tensors(tensors, path, strict=strict)
    saved: dict[str, Any] = {}
    if plain or quantized:
        keys = {f"optimizers.{n}" for n in plain} | {f"models.{n}" for n in quantized}
        sharded.load_tensors(saved, path, rebuild=True, keys=keys)
    for name, module in mods.items():
        source = saved.get("models", {}) if name in quantized else tensors["models"]
        if name not in source:
            raise KeyError(f"lt.load({str(path)!r}): the checkpoint has no model {name!r}")
        _load_module(module, source[name], StateDictOptions(strict=strict))
    for name, (opt, module, names) in opts.items():
        if name not in plain:
            set_optimizer_state_dict(module, opt, tensors["optimizers"][name])
        elif name in saved.get("optimizers", {}):
            contents.load_optimizer_state(names, opt, saved["optimizers"][name])
        else:
            raise KeyError(f"lt.load({str(path)!r}): the checkpoint has no optimizer {name!r}")
    rank_files = sorted(path.glob("rank-*.pt"))
    mine = path / f"rank-{env.rank()}.pt"
    per_rank = io.read_file(mine if mine.exists() else rank_files[env.rank() % len(rank_files)])
    return _restore_common(state, inv, common, per_rank)
