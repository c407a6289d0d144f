"""Reading a checkpoint and checking it before anything is copied in: ``lt.load``'s first half.

:func:`read_full` reads a full file and verifies its tensors' checksums; :func:`read_sharded_common`
verifies a sharded directory's files against their manifest and reads ``common.pt``. Given the
state's inventory, ``_read_full`` and ``_read_sharded`` then check every model's keys, shapes and
dtypes and every optimizer's state against what is saved, and return a ``_Read``: what the
checkpoint restores, and the copy-ins that load it into the state, none of which can fail on what
was checked. ``ltransform.checkpoint.api`` runs them (``load``); ``convert`` reads with them too.

The module is named for its half of loading; :func:`write_full` lives here beside
:func:`read_full` so that a full file's format (its ``checksums`` entry) is defined in one place,
and so do the state-dict helpers the save side shares (``_model_state``, ``_has_dtensors``).
Nothing here imports ``api``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch

from ltransform import io
from ltransform.checkpoint import contents, sharded
from ltransform.core.inventory import Inventory
from ltransform.distributed import env

CHECKSUMS = "checksums"  # a full file's entry: the CRC-32 of each of its tensors, by path


def write_full(path: Path, payload: dict[str, Any]) -> Path:
    """Write a full checkpoint file atomically, with the CRC-32 of each of its tensors."""
    return io.write_file(path, {**payload, CHECKSUMS: io.tensor_checksums(payload)})


def read_full(path: Path) -> dict[str, Any]:
    """A full checkpoint file, its metadata and (format 2 on) every tensor's checksum checked.

    Raises:
        CheckpointError: see :func:`ltransform.checkpoint.api.load`.
    """
    payload = io.read_file(path)
    meta: Any = payload.get("meta") if isinstance(payload, Mapping) else None
    contents.check_metadata(meta, repr(str(path)))
    if meta.get("version", 1) >= 2:
        io.verify_checksums({k: v for k, v in payload.items() if k != CHECKSUMS}, payload.get(CHECKSUMS), path)
    return payload


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


def _load_module(module: torch.nn.Module, saved: Mapping[str, Any], options: Any) -> None:
    """Load a model's state dict: sharded models through torch's loader (which reshards), plain
    ones directly (from the mapped file). Quantized layers load their packed state themselves
    (``lt.quantize`` gives them a load hook)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if _has_dtensors(module):
        set_model_state_dict(module, cast("dict[str, Any]", saved), options=options)  # a loaded file's dict
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
        metadata = sharded.reader(path).read_metadata()  # read and checked once for this load
    stored = metadata.state_dict_metadata
    mods = inv.models
    # Models and sharded optimizers load into a template of their state (through buffers,
    # copied in only once every chunk is read: sharded.stage_tensors). Two kinds
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
        if not strict and name in tensors["models"]:  # only what was saved is read (XLA's planner reads
            tensors["models"][name] = {k: v for k, v in live.items() if k in saved}  # every key it is given)
    apart = _sharded_extras(common, inv)  # extras saved with the tensors: each rank its shards
    for key, template in apart.items():
        prefix = f"extras.{key}."
        saved = {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}
        check_tensors(path, f"state.extra[{key!r}]", _flat(template), saved, strict)
    if apart:
        tensors["extras"] = apart
    saved_parts: dict[str, Any] = {}
    if plain or quantized:
        keys = {f"optimizers.{n}" for n in plain} | {f"models.{n}" for n in quantized}
        with dcp_errors(path):
            sharded.load_tensors(saved_parts, path, rebuild=True, keys=keys, metadata=metadata)
    # Read now, into buffers: a chunk that does not fit its tensor, or a file that fails to read,
    # must fail the load before anything is copied in (DCP alone would read into the parameters).
    with dcp_errors(path):
        copy_ins: list[Callable[[], Any]] = [sharded.stage_tensors(tensors, path, strict=strict, metadata=metadata)]
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
    for key, template in apart.items():  # (its tensors were read into it: this sets the rest)
        copy_ins.append(functools.partial(inv.extras[key].load_state_dict, template))
    return _Read(common, mine, copy_ins, path / "common.pt", rank_file)


def _sharded_extras(common: Any, inv: Inventory) -> dict[str, Any]:
    """A template of the state of each ``state.extra`` object a sharded checkpoint holds with its
    tensors (``contents.sharded_extras``): the live object's ``state_dict()``, whose tensors it
    reads into. One the state lacks is left out here (``_check_common`` names it)."""
    extra = common.get("extra") if isinstance(common, Mapping) else None
    if not isinstance(extra, Mapping):
        return {}
    return {key: inv.extras[key].state_dict() for key, entry in extra.items()
            if isinstance(entry, Mapping) and "sharded" in entry
            and callable(getattr(inv.extras.get(key), "load_state_dict", None))}


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested state dict's entries by their dotted path, as DCP stores them."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_sharded_common(path: Path) -> dict[str, Any]:
    """A sharded checkpoint's ``common.pt``, every file of it checked first against its manifest
    (format 2 on; on every rank together).

    Raises:
        CheckpointError: see :func:`ltransform.checkpoint.api.load`.
    """
    verified = sharded.verify_files(path)
    common = io.read_file(sharded.member(path, "common.pt"))
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
    if io.not_regular(mine) != "missing":
        return sharded.member(path, mine.name)
    saved = sorted(p for p in path.glob("rank-*.pt") if io.not_regular(p) is None)
    if not saved:
        raise io.CheckpointNotFoundError(f"lt.load: the sharded checkpoint {str(path)!r} has no {mine.name!r} (nor "
                                         f"any rank-R.pt: each rank's RNG states): it is incomplete; load an "
                                         f"earlier checkpoint")
    return saved[env.rank() % len(saved)]


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
        cause: Any = next(iter(failures.values()), error) if isinstance(failures, Mapping) and failures else error
        cause = cause[0] if isinstance(cause, tuple) and cause else cause
        if isinstance(cause, io.CheckpointError):
            raise cause from None
        names = [".metadata", *sorted(p.name for p in path.glob("*.distcp"))]
        raise io.FileFormatError(f"lt.load: the sharded checkpoint {str(path)!r}: its DCP files {names} cannot "
                                 f"be read ({type(cause).__name__}: {io.reason(cause)}); they are corrupt or "
                                 f"incomplete; load an earlier checkpoint") from error
