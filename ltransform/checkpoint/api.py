"""``lt.save``, ``lt.load``, ``lt.checkpoint_sharded``, ``lt.load_raw``: checkpoints of a whole state."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ltransform import io
from ltransform.checkpoint import contents, files, sharded
from ltransform.core.inventory import Inventory, inventory
from ltransform.distributed import env

Filter = Callable[[str, torch.Tensor], bool]
CHECKSUMS = "checksums"  # a full file's entry: the CRC-32 of each of its tensors, by path


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
        write_full(path, {**_common(inv, False), **tensors, "ranks": per_rank})
    env.barrier()
    return path


def write_full(path: Path, payload: dict[str, Any]) -> Path:
    """Write a full checkpoint file atomically, with the CRC-32 of each of its tensors."""
    return io.write_file(path, {**payload, CHECKSUMS: io.tensor_checksums(payload)})


def read_full(path: Path) -> dict[str, Any]:
    """A full checkpoint file, its metadata and (format 2 on) every tensor's checksum checked.

    Raises:
        CheckpointError: see :func:`load`.
    """
    payload = io.read_file(path)
    meta = payload.get("meta") if isinstance(payload, Mapping) else None
    contents.check_metadata(meta, repr(str(path)))
    if meta.get("version", 1) >= 2:
        io.verify_checksums({k: v for k, v in payload.items() if k != CHECKSUMS}, payload.get(CHECKSUMS), path)
    return payload


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
    sharded.write_manifest(io.partial_path(path))
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

    Everything is read and checked before anything is copied in: every file's checksum (each
    tensor of a full file; every file of a sharded one, against its ``manifest.pt``), the keys
    and shapes, the optimizers' parameter groups, the extras and the RNG states. So a load that
    raises leaves the state as it was. Checkpoints of format 1 (before checksums) still load,
    unchecked. Only a failure of the disk itself while a sharded checkpoint's verified shards are
    read in place (DCP loads into the parameters) could come after the first copy.

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
        ltransform.CheckpointError: every failure, naming the checkpoint and the file or key at
            fault. Its kinds are also builtin errors: CheckpointNotFoundError (FileNotFoundError):
            no such checkpoint, or a file of it missing; FileFormatError (ValueError and
            RuntimeError): an empty, truncated or corrupt file, or one that is not a checkpoint;
            ChecksumError (a FileFormatError): bytes that differ from their recorded checksum;
            UnsafeCheckpointError (pickle.UnpicklingError): a file holding arbitrary Python
            objects (not unpickled); CheckpointKeyError (KeyError): with ``strict``, missing or
            unexpected keys, models or optimizers; CheckpointMismatchError (ValueError): a shape,
            a dtype or parameter groups that differ, an extra the state lacks.
    """
    return load_with_position(path, state, strict=strict)[0]


def load_with_position(path: str | os.PathLike[str], state: Any, *, strict: bool = True) -> tuple[Any, Any]:
    """``load``, also returning this rank's saved data position (None if saved outside lt.run)."""
    inv = inventory(state)
    finish_pending(inv)
    optimizers = contents.optimizers(inv)
    path = _resolve(Path(path))
    read = _read_sharded if path.is_dir() else _read_full
    try:
        common, mine, copy_ins, common_file, rank_file = read(path, inv, optimizers, strict)
        _check_common(state, inv, common, f"lt.load({str(common_file)!r})")
        _check_rank(mine, f"lt.load({str(rank_file)!r})")
    except (io.CheckpointError, MemoryError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # what no check above foresaw still names the checkpoint
        raise io.FileFormatError(f"lt.load({str(path)!r}): the checkpoint is corrupt or not one ltransform "
                                 f"wrote ({type(error).__name__}: {error}); load an earlier checkpoint") from error
    # Copy in: the user's objects first (their load_state_dict may raise), then what cannot fail
    for name, scheduler in inv.schedulers.items():
        if name in common["schedulers"]:
            scheduler.load_state_dict(common["schedulers"][name])
    state = contents.restore_extras(state, common["extra"])
    for copy_in in copy_ins:
        copy_in()
    state = contents.restore_counters(state, common["counters"])
    contents.restore_rng(mine["rng"])
    return state, mine.get("data")


def _resolve(path: Path) -> Path:
    if path.is_dir() and not (path / "common.pt").exists() and any(
            (path / f).exists() for f in (".metadata", sharded.MANIFEST)):
        raise io.CheckpointNotFoundError(f"lt.load: the sharded checkpoint {str(path)!r} has no 'common.pt': it "
                                         f"is incomplete or corrupt; load an earlier checkpoint")
    try:
        return files.resolve(path)
    except FileNotFoundError as error:
        raise io.CheckpointNotFoundError(f"lt.load: {error}") from None


class _Read(NamedTuple):
    """A checkpoint read and checked, not yet copied in."""

    common: Mapping[str, Any]  # counters, schedulers, extras
    mine: Any  # this rank's RNG states and data position
    copy_ins: list[Callable[[], Any]]  # in order; none can fail on what was checked
    common_file: Path
    rank_file: Path


def _read_full(path: Path, inv: Inventory, optimizers: Mapping[str, Any], strict: bool) -> _Read:
    """Read and check a full checkpoint file."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    payload = read_full(path)
    where = f"lt.load({str(path)!r})"
    models, saved_optimizers, ranks = (_entry(payload, key, where, kind) for key, kind in
                                       (("models", Mapping), ("optimizers", Mapping), ("ranks", list)))
    if not ranks:
        raise io.FileFormatError(f"{where}: the checkpoint holds no rank's RNG states: it is corrupt")
    # Sharded models go through torch's full-state-dict loaders (which reshard); plain ones load
    # directly from the mapped file (torch's helpers would allocate a gradient per parameter)
    options = StateDictOptions(full_state_dict=True, strict=strict)
    copy_ins: list[Callable[[], Any]] = []
    for name, module in inv.models.items():
        saved = models.get(name)
        if not isinstance(saved, Mapping):
            raise io.CheckpointKeyError(f"{where}: the checkpoint has no model {name!r}; it has {sorted(models)}")
        check_tensors(path, name, module.state_dict(), saved, strict, shapes=not _is_quantized(module))
        copy_ins.append(functools.partial(_load_module, module, saved, options))
    for name, (opt, module, names) in optimizers.items():
        if name not in saved_optimizers:
            if strict:
                raise io.CheckpointKeyError(f"{where}: the checkpoint has no optimizer {name!r}; it has "
                                            f"{sorted(saved_optimizers)}; pass strict=False to load without it")
            continue
        saved = saved_optimizers[name]
        if _has_dtensors(module):
            copy_ins.append(functools.partial(set_optimizer_state_dict, module, opt, saved, options=options))
        else:
            contents.check_optimizer_state(names, opt, saved, f"{where}: optimizer {name!r}")
            copy_ins.append(functools.partial(contents.load_optimizer_state, names, opt, saved))
    return _Read(payload, ranks[env.rank() % len(ranks)], copy_ins, path, path)


def _entry(payload: Mapping[str, Any], key: str, where: str, kind: type) -> Any:
    value = payload.get(key)
    if not isinstance(value, kind):
        raise io.FileFormatError(f"{where}: the checkpoint's {key!r} entry is missing or not a "
                                 f"{kind.__name__}: it is corrupt or not one ltransform wrote")
    return value


def _check_common(state: Any, inv: Inventory, common: Mapping[str, Any], where: str) -> None:
    """Check what is restored besides tensors: counters, schedulers, extras."""
    counters, schedulers, extra = (_entry(common, key, where, Mapping) for key in ("counters", "schedulers", "extra"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in counters.values()):
        raise io.FileFormatError(f"{where}: the checkpoint's counters {dict(counters)} are not integers: it is corrupt")
    for name in inv.schedulers:
        if name in schedulers and not isinstance(schedulers[name], Mapping):
            raise io.FileFormatError(f"{where}: the checkpoint's scheduler {name!r} is not a state dict: it is corrupt")
    contents.check_extras(state, extra, where)


def _check_rank(mine: Any, where: str) -> None:
    if not isinstance(mine, Mapping):
        raise io.FileFormatError(f"{where}: this rank's part of the checkpoint is not a dict: it is corrupt")
    contents.check_rng(mine.get("rng"), where)


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
        raise io.CheckpointKeyError(
            f"lt.load({str(path)!r}): model {name!r} does not match the checkpoint: missing keys "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}, unexpected keys "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}; pass strict=False to load "
            f"the keys that match"
        )


def check_tensors(path: Path, name: str, live: Mapping[str, Any], saved: Mapping[str, Any], strict: bool, *,
                  shapes: bool = True) -> None:
    """Check a model's saved entries against its live state dict: the keys (``strict``), and unless
    ``shapes`` is False (quantized layers), for every tensor in both its shape (the global one of a
    sharded tensor) and dtype (any floating point type loads into another, as a precision change;
    other kinds must match).

    ``saved`` maps keys to tensors, or to anything with ``size`` and ``properties.dtype`` (DCP's
    metadata of a stored tensor)."""
    if strict:
        check_keys(path, name, set(live), set(saved))
    if not shapes:  # (quantized layers check their packed state themselves)
        return
    for key in [k for k in live if k in saved]:  # (in the model's order: the first mismatch is named)
        mine, theirs = live[key], saved[key]
        if not isinstance(mine, torch.Tensor):
            continue
        shape = tuple(theirs.shape if isinstance(theirs, torch.Tensor) else getattr(theirs, "size", ()))
        dtype = theirs.dtype if isinstance(theirs, torch.Tensor) else getattr(getattr(theirs, "properties", None),
                                                                              "dtype", None)
        if dtype is None:
            raise io.FileFormatError(f"lt.load({str(path)!r}): model {name!r}: entry {key!r} is not a tensor in "
                                     f"the checkpoint: it is corrupt or not one ltransform wrote")
        if shape != tuple(mine.shape):
            raise io.CheckpointMismatchError(
                f"lt.load({str(path)!r}): model {name!r}: entry {key!r} has shape {list(shape)} in the "
                f"checkpoint, {list(mine.shape)} in the model; build the model as it was saved")
        if dtype != mine.dtype and not (dtype.is_floating_point and mine.dtype.is_floating_point):
            raise io.CheckpointMismatchError(
                f"lt.load({str(path)!r}): model {name!r}: entry {key!r} is {dtype} in the checkpoint, "
                f"{mine.dtype} in the model; build the model as it was saved")


def _read_sharded(path: Path, inv: Inventory, opts: Mapping[str, Any], strict: bool) -> _Read:
    """Read and check a sharded checkpoint (every file first, against its manifest)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    common = read_sharded_common(path)
    rank_file = _rank_file(path)
    mine = io.read_file(rank_file)
    with dcp_errors(path):
        stored = sharded.reader(path).read_metadata().state_dict_metadata
    mods = inv.models
    # Models and sharded optimizers load in place into a template of their state. Two kinds
    # are read as saved instead (the subtree rebuilt from the metadata) and loaded directly:
    # plain optimizers, whose template would first create every missing state tensor with a
    # zero step (a gradient per parameter: most of the load time measured), and quantized
    # models, whose packed quantization state varies in size and cannot be a template.
    plain = {n for n, (_, m, _) in opts.items() if not _has_dtensors(m)}
    quantized = {n for n, m in mods.items() if _is_quantized(m)}
    tensors = {"models": {n: _model_state(m, StateDictOptions()) for n, m in mods.items() if n not in quantized},
               "optimizers": {n: get_optimizer_state_dict(m, o) for n, (o, m, _) in opts.items() if n not in plain}}
    for name, module in mods.items():
        prefix = f"models.{name}."
        saved = {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}
        if not saved:
            raise io.CheckpointKeyError(f"lt.load({str(path)!r}): the checkpoint has no model {name!r}")
        live = tensors["models"][name] if name in tensors["models"] else module.state_dict()
        check_tensors(path, name, live, saved, strict, shapes=name not in quantized)
    saved_parts: dict[str, Any] = {}
    if plain or quantized:
        keys = {f"optimizers.{n}" for n in plain} | {f"models.{n}" for n in quantized}
        with dcp_errors(path):
            sharded.load_tensors(saved_parts, path, rebuild=True, keys=keys)
    if (path / sharded.MANIFEST).is_file():  # every shard verified: DCP reads them into the parameters
        copy_ins: list[Callable[[], Any]] = [functools.partial(_load_tensors_in_place, tensors, path, strict)]
    else:  # format 1, unchecked: read into a copy first (one more copy of this rank's shards, briefly)
        tensors = _clone_tensors(tensors)
        _load_tensors_in_place(tensors, path, strict)
        copy_ins = []
    for name, module in mods.items():
        source = saved_parts.get("models", {}) if name in quantized else tensors["models"]
        copy_ins.append(functools.partial(_load_module, module, source[name], StateDictOptions(strict=strict)))
    for name, (opt, module, names) in opts.items():
        if name not in plain:
            copy_ins.append(functools.partial(set_optimizer_state_dict, module, opt, tensors["optimizers"][name]))
        elif name in saved_parts.get("optimizers", {}):
            saved = saved_parts["optimizers"][name]
            contents.check_optimizer_state(names, opt, saved, f"lt.load({str(path)!r}): optimizer {name!r}")
            copy_ins.append(functools.partial(contents.load_optimizer_state, names, opt, saved))
        elif strict:
            raise io.CheckpointKeyError(f"lt.load({str(path)!r}): the checkpoint has no optimizer {name!r}; pass "
                                        f"strict=False to load without it")
    return _Read(common, mine, copy_ins, path / "common.pt", rank_file)


def read_sharded_common(path: Path) -> dict[str, Any]:
    """A sharded checkpoint's ``common.pt``, every file of it checked first against its manifest
    (format 2 on; on every rank together).

    Raises:
        CheckpointError: see :func:`load`.
    """
    verified = sharded.verify_files(path)
    common = io.read_file(path / "common.pt")
    contents.check_metadata(common.get("meta") if isinstance(common, Mapping) else None,
                            repr(str(path / "common.pt")))
    if not verified and common["meta"].get("version", 1) >= 2:
        raise io.CheckpointNotFoundError(f"lt.load: the sharded checkpoint {str(path)!r} has no "
                                         f"{sharded.MANIFEST!r}: it is incomplete or corrupt; load an earlier "
                                         f"checkpoint")
    return common


def _rank_file(path: Path) -> Path:
    """This rank's ``rank-R.pt``; on more ranks than were saved, one of those saved."""
    mine = path / f"rank-{env.rank()}.pt"
    if mine.exists():
        return mine
    saved = sorted(path.glob("rank-*.pt"))
    if not saved:
        raise io.CheckpointNotFoundError(f"lt.load: the sharded checkpoint {str(path)!r} has no {mine.name!r} (nor "
                                         f"any rank-R.pt: each rank's RNG states): it is incomplete; load an "
                                         f"earlier checkpoint")
    return saved[env.rank() % len(saved)]


def _clone_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tensors(v) for v in value)
    return value


def _load_tensors_in_place(tensors: dict[str, Any], path: Path, strict: bool) -> None:
    with dcp_errors(path):
        sharded.load_tensors(tensors, path, strict=strict)


@contextlib.contextmanager
def dcp_errors(path: Path) -> Iterator[None]:
    """DCP's errors as ours: the error a rank raised inside DCP (one of ours, when our reader
    refused the metadata), or a FileFormatError naming the checkpoint."""
    try:
        yield
    except (io.CheckpointError, MemoryError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # (DCP's CheckpointException is a BaseException)
        failures = getattr(error, "failures", None)  # DCP's CheckpointException: each rank's error
        cause = next(iter(failures.values()), error) if isinstance(failures, Mapping) and failures else error
        cause = cause[0] if isinstance(cause, tuple) and cause else cause
        if isinstance(cause, io.CheckpointError):
            raise cause from None
        names = [".metadata", *sorted(p.name for p in path.glob("*.distcp"))]
        raise io.FileFormatError(f"lt.load: the sharded checkpoint {str(path)!r}: its DCP files {names} cannot "
                                 f"be read ({type(cause).__name__}: {io.reason(cause)}); they are corrupt or "
                                 f"incomplete; load an earlier checkpoint") from error
