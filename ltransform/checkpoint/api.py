"""``lt.save`` and ``lt.load``: checkpoints of a whole state.

The save side and the public entry points live here; reading a checkpoint and checking it before
anything is copied in is ``ltransform.checkpoint.read``.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from ltransform import io
from ltransform.checkpoint import contents, files, sharded
from ltransform.checkpoint.read import (_check_common, _check_rank, _has_dtensors, _model_state, _read_full,
                                        _read_sharded, write_full)
from ltransform.core.inventory import Inventory, inventory
from ltransform.distributed import env, wrappers

Filter = Callable[[str, torch.Tensor], bool]


def save(path: str | os.PathLike[str], state: Any, *, sharded: bool = False, filter: Any = None,
         async_save: bool = False, run: Any = None) -> Path:
    """Save ``state`` to ``path``: one file, or with ``sharded=True`` a DCP directory.

    Holds every model and optimizer, schedulers, ``step``/``micro_step``/``epoch``, each rank's
    RNG states (Python, NumPy, torch CPU and CUDA), the data position of the ``lt.run`` given
    as ``run``, ``state.extra`` (objects by their ``state_dict``) and metadata (format version,
    ltransform and torch versions, world size, time). The file or directory is written aside
    and renamed into place, so a crash mid-save leaves the previous checkpoint loadable.

    Args:
        path: a file (full) or a directory (sharded).
        state: the training state.
        sharded: each rank writes its own shards (DCP); required for async saves. Full saves
            gather sharded models to rank 0, offloaded to the CPU, and rank 0 writes one file.
        filter: keep only some model entries: ``fn(name, tensor) -> bool`` for every model, or
            ``{"model": fn}`` by the model's field name. Load such a file with ``strict=False``.
            For a sharded model it sees each entry before anything is gathered (a ``DTensor``:
            the global shape and dtype), so what it leaves out is never all-gathered; it must
            decide alike on every rank.
        async_save: sharded only: write in the background; the next ``lt.optimizer_step`` waits
            for it before touching parameters.
        run: in a hook of ``lt.run``, its second argument (the run context): the checkpoint
            then records the data position (so ``lt.run(..., resume=path)`` continues the data
            where it was) and the step's precision.

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
    _resharded(inv)
    filters = _filters(filter, inv.models)
    position = getattr(run, "position", None)
    if sharded:
        return _save_sharded(path, inv, filters, async_save, position)
    return _save_full(path, inv, filters, position)


def _resharded(inv: Inventory) -> None:
    """Models hold their shards, not what FSDP2 left gathered after a forward without backward (the
    root's parameters, by default): what is saved and loaded into are the shards."""
    for module in inv.models.values():
        wrappers.reshard(module)


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


def _common(inv: Inventory, sharded_: bool, position: Any, apart: Mapping[str, Any]) -> dict[str, Any]:
    precision = position.precision if position is not None else None
    return {"meta": contents.metadata(sharded=sharded_, precision=precision),
            "counters": contents.counters(inv),
            "schedulers": {n: s.state_dict() for n, s in inv.schedulers.items()},
            "extra": contents.capture_extras(inv, apart, sharded=sharded_)}


def _per_rank(position: Any) -> dict[str, Any]:
    return {"rng": contents.capture_rng(), "data": None if position is None else position.as_dict()}


def _tensors(inv: Inventory, filters: Mapping[str, Filter], *, full: bool) -> dict[str, Any]:
    """Every model's and optimizer's state dict, keyed by parameter names: gathered to rank 0
    on the CPU (``full``), or each rank's shards (DCP's form). Plain optimizers are read
    directly (torch's helper would allocate a gradient per parameter to create missing state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    models = {name: _model_entries(name, module, filters.get(name), options) for name, module in inv.models.items()}
    optimizers = {name: get_optimizer_state_dict(module, opt, options=options) if _has_dtensors(module)
                  else contents.optimizer_state(names, opt)
                  for name, (opt, module, names) in contents.optimizers(inv).items()}
    if full:  # XLA tensors gathered to the host (a file that holds them would need torch_xla to load)
        from torch.utils._pytree import tree_map

        optimizers = tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) and v.device.type == "xla" else v,
                              optimizers)
    return {"models": models, "optimizers": optimizers}


def _model_entries(name: str, module: torch.nn.Module, keep: Filter | None, options: Any) -> dict[str, Any]:
    """A model's state dict, filtered. A sharded model's is filtered before anything is gathered
    (each kept DTensor is then gathered alone), so a frozen base the filter leaves out is never
    all-gathered."""
    if keep is None:
        _refuse_nf4(name, dict(module.named_parameters()))
        return _model_state(module, options)
    if not (options.full_state_dict and _has_dtensors(module)):
        entries = {k: v for k, v in _model_state(module, options).items() if keep(k, v)}
        _refuse_nf4(name, entries)
        return entries
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.tensor import DTensor

    shards = {k: v for k, v in _model_state(module, StateDictOptions()).items() if keep(k, v)}
    _refuse_nf4(name, shards)
    mine = env.rank() == 0  # gathered on every rank (a collective), kept on rank 0 only, as torch's full state dict
    entries = {}
    for key, value in shards.items():
        if isinstance(value, DTensor):  # (an offloaded shard is gathered on its mesh's device)
            value = value.to(value.device_mesh.device_type).full_tensor()  # type: ignore[attr-defined]
        if mine:
            entries[key] = value.cpu() if isinstance(value, torch.Tensor) else value  # (extra state as it is)
    return entries


def _refuse_nf4(model: str, entries: Mapping[str, Any]) -> None:
    """torchao's ``NF4Tensor`` (``lt.quantize(..., backend="torchao")``) pickles as a tensor subclass that a
    safe load refuses, and DCP stores its packed bytes under the unpacked size: refused at save time."""
    for key, value in entries.items():
        if wrappers.is_nf4(value.to_local() if hasattr(value, "to_local") else value):
            raise NotImplementedError(
                f"lt.save: {model}.{key} is a torchao NF4 weight (from lt.quantize(..., backend='torchao')), which "
                f"checkpoints cannot hold; save the adapters only: lt.save(path, state, filter=lambda name, t: "
                f"'.adapter.' in name), and rebuild the 4-bit base with lt.quantize(..., weights=...) before loading")


def _save_full(path: Path, inv: Inventory, filters: Mapping[str, Filter], position: Any) -> Path:
    tensors = _tensors(inv, filters, full=True)
    gathered = contents.gather_extras(inv)  # (extras holding DTensors: on every rank)
    per_rank = env.all_gather_objects(_per_rank(position))
    if env.rank() == 0:
        write_full(path, {**_common(inv, False, position, gathered), **tensors, "ranks": per_rank})
    env.barrier()
    return path


def _save_sharded(path: Path, inv: Inventory, filters: Mapping[str, Filter], async_save: bool,
                  position: Any) -> Path:
    if env.rank() == 0:
        shutil.rmtree(io.partial_path(path), ignore_errors=True)
    env.barrier()
    tensors = _tensors(inv, filters, full=False)
    apart = contents.sharded_extras(inv)  # extras holding DTensors: each rank its shards, as the models
    if apart:
        tensors["extras"] = apart
    future = sharded.save_tensors(tensors, path, async_save=async_save)
    tmp = io.partial_path(path)
    tmp.mkdir(parents=True, exist_ok=True)
    io.write_file(tmp / f"rank-{env.rank()}.pt", _per_rank(position))
    if env.rank() == 0:
        io.write_file(tmp / "common.pt", _common(inv, True, position, apart))
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
    and shapes, the optimizers' parameter groups, the extras and the RNG states; a sharded
    checkpoint's shards are read into buffers (one more copy of this rank's shards in CPU memory,
    for the length of the load), and only files of the checkpoint are opened, only regular ones.
    So a load that raises leaves the state as it was; a scheduler or ``state.extra`` object whose
    ``load_state_dict`` raises is put back, with the others. Checkpoints of format 1 (before
    checksums) still load, unchecked.

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
            objects (not unpickled), or DCP metadata naming a file outside the checkpoint;
            CheckpointKeyError (KeyError): with ``strict``, missing or unexpected keys, models or
            optimizers; CheckpointMismatchError (ValueError): a shape,
            a dtype or parameter groups that differ, an extra the state lacks, a scheduler or
            extra object whose ``load_state_dict`` raised.
    """
    return load_with_position(path, state, strict=strict)[0]


def load_with_position(path: str | os.PathLike[str], state: Any, *, strict: bool = True) -> tuple[Any, Any]:
    """``load``, also returning this rank's saved data position (None if saved outside lt.run)."""
    inv = inventory(state)
    finish_pending(inv)
    _resharded(inv)
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
    return _copy_in(state, inv, common, mine, copy_ins, f"lt.load({str(common_file)!r})"), mine.get("data")


def _copy_in(state: Any, inv: Inventory, common: Mapping[str, Any], mine: Mapping[str, Any],
             copy_ins: list[Callable[[], Any]], where: str) -> Any:
    """Copy a checked checkpoint into ``state``. The user's objects (schedulers, ``state.extra``)
    come first: their ``load_state_dict`` is the one step that may still raise, and if it does
    they are put back from copies taken here, before any tensor changed. Then the tensors (every
    chunk already read and checked: only memory copies are left), counters and RNG states."""
    objects = contents.user_objects(inv, state, common)
    undo = contents.Undo(objects)
    contents.load_objects(objects, undo, where)
    try:
        for copy_in in copy_ins:
            copy_in()
        if "torch_xla" in sys.modules:  # a loaded optimizer state is replicated on XLA: split it again
            from ltransform.distributed import xla

            for optimizer in inv.optimizers.values():
                xla.reshard_optimizer(optimizer)
    except BaseException as error:  # none should; if one does, say what is left half-done
        undo()
        if not isinstance(error, Exception):
            raise
        raise io.CheckpointMismatchError(f"{where}: copying the checked tensors in failed ({type(error).__name__}: "
                                         f"{error}); the schedulers and extras are as they were, the models and "
                                         f"optimizers may be partly loaded: load it again, or an earlier "
                                         f"checkpoint") from error
    state = contents.restore_extras(state, common["extra"])
    state = contents.restore_counters(state, common["counters"])
    contents.restore_rng(mine["rng"])
    return state


def _resolve(path: Path) -> Path:
    if path.is_dir() and not (path / "common.pt").exists() and any(
            (path / f).exists() for f in (".metadata", sharded.MANIFEST)):
        raise io.CheckpointNotFoundError(f"lt.load: the sharded checkpoint {str(path)!r} has no 'common.pt': it "
                                         f"is incomplete or corrupt; load an earlier checkpoint")
    try:
        return files.resolve(path)
    except FileNotFoundError as error:
        raise io.CheckpointNotFoundError(f"lt.load: {error}") from None
