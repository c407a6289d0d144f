"""``init_module`` and ``materialize``: build a model where and how it will live."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ltransform.core.compose import MISSING, Partial
from ltransform.core.precisions import resolve_precision


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def init_module(
    build: Any = MISSING,
    /,
    *args: Any,
    device: str | torch.device | None = None,
    precision: Any = "32-true",
    empty: bool = False,
) -> Any:
    """Build a model directly on ``device`` in ``precision``'s weight dtype, or on ``meta``.

    Building in place avoids materializing a float32 copy on the CPU first. With
    ``empty=True`` the model is built on the meta device (no memory at all); call
    :func:`materialize` (after sharding, for a model too big for one device) to allocate it.

    Args:
        build: a function returning the module (e.g. the class); omit for the partial form.
        *args: passed to ``build``.
        device: where to allocate (default: ``lt.device()``, this rank's accelerator, else the CPU).
        precision: a precision name; ``-true`` modes build in their dtype directly.
        empty: build on the meta device, allocating nothing.

    Example:
        >>> import torch, ltransform as lt
        >>> model = lt.init_module(torch.nn.Linear, 4, 4, precision="bf16-true")
        >>> model.weight.dtype
        torch.bfloat16
    """
    record = resolve_precision(precision, "init_module")
    if build is MISSING:
        return Partial(
            lambda b: init_module(b, device=device, precision=record, empty=empty),
            f"init_module(device={device!r}, precision={record.name!r}, empty={empty})",
        )
    if not callable(build):
        raise TypeError(f"init_module: expected a function that builds the model, got {build!r}")
    with _placed(torch.device("meta") if empty else device, record.param_dtype):
        return build(*args)


@contextlib.contextmanager
def _placed(device: str | torch.device | None, dtype: torch.dtype | None) -> Iterator[None]:
    """New tensors on ``device`` (None: ``lt.device()``) in ``dtype`` (None: the default as it is)."""
    if device is None:
        from ltransform.distributed import env

        device = env.device()
    with contextlib.ExitStack() as stack:
        if dtype is not None:
            stack.enter_context(_default_dtype(dtype))
        stack.enter_context(torch.device(device))
        yield


def init_tensor(precision: Any = None, *, device: str | torch.device | None = None) -> Any:
    """A context in which new tensors are created on ``device`` in ``precision``'s weight dtype:
    ``lt.init_module`` for the plain tensors of a custom loop (buffers, caches, inputs).

    Tensor factories without a ``device`` (``torch.zeros``, ``torch.randn``, ...) allocate on
    ``device``, and floating-point ones without a ``dtype`` take the precision's (``"bf16-true"``:
    ``torch.bfloat16``; a mixed precision's weights stay ``torch.float32``). Both are restored
    when the block ends, also on an error.

    Args:
        precision: a precision name or record (as ``lt.with_precision`` takes); None keeps the
            default dtype as it is.
        device: where to allocate (default: ``lt.device()``, this rank's accelerator, else the CPU).

    Returns:
        A context manager.

    Raises:
        ValueError: an unknown precision (lists the valid ones).

    Example:
        >>> import torch, ltransform as lt
        >>> with lt.init_tensor("bf16-true", device="cpu"):
        ...     cache = torch.zeros(2, 3)
        >>> cache.dtype, torch.zeros(1).dtype
        (torch.bfloat16, torch.float32)
    """
    dtype = None if precision is None else resolve_precision(precision, "init_tensor").param_dtype
    return _placed(device, dtype)


_UNINITIALIZED = ("raise", "warn", "ignore")


def materialize(
    model: Any = MISSING,
    /,
    *,
    device: str | torch.device | None = None,
    init: Callable[[torch.nn.Module], None] | None = None,
    uninitialized: str = "raise",
) -> Any:
    """Allocate a model built with ``init_module(..., empty=True)`` and initialise all of it.

    Each submodule's ``reset_parameters()`` runs (in ``model.modules()`` order, as construction
    did), then the model's own initialiser if it has one: Hugging Face's ``initialize_weights()``
    / ``init_weights()`` (which also recompute RoPE ``inv_freq`` buffers) or an
    ``_init_weights(module)`` applied to every submodule, innermost model first; or torchtitan's
    ``init_weights()`` (optional arguments left at their defaults), only the outermost one, since
    it calls its blocks' own, with the arguments they need. An initialiser that requires arguments
    is never called by ``materialize``. With ``init``, ``init(module)`` is called on every
    submodule instead of all of these. Tied parameters (a head sharing the embedding's weight)
    are initialised as at construction, each alias on its own, then tied again to the first one,
    as ``tie_weights`` does. A model sharded with ``lt.shard`` allocates and initialises only
    this rank's shard.

    Every parameter and buffer is first filled with a sentinel (NaN; for integers their extreme
    value, for booleans an invalid byte); one still holding it afterwards was not (fully)
    written by any initialiser, e.g. a buffer computed in ``__init__`` (on ``meta``, so lost) or
    the weight of a module without ``reset_parameters``.

    Note:
        On a CPU device mesh of several ranks torch's random initialisers fill each shard from
        its rank's own generator (correct, global-tensor random numbers are for CUDA-like
        meshes), so equal seeds repeat values across shards; ``materialize`` warns then.

    Args:
        model: the module on the meta device; omit it for the partial form.
        device: where to allocate; default ``lt.device()`` (this rank's GPU, else the CPU).
        init: an initialiser called on every submodule instead of the built-in ones.
        uninitialized: ``"raise"`` (default), ``"warn"`` or ``"ignore"`` (which also skips the
            sentinel fill and check) for tensors no initialiser wrote.

    Returns:
        ``model``, allocated and initialised in place. A model that ``lt.shard`` on XLA already
        allocated (FSDPv2 cannot take a meta model) is only re-initialised with ``init``, if given;
        any other model with nothing on ``meta`` is returned as it is.

    Raises:
        RuntimeError: with ``uninitialized="raise"``, naming each parameter or buffer left
            uninitialised and how to initialise it.
        ValueError: an unknown ``uninitialized``; ``init`` or ``device`` given for a model with
            nothing on ``meta``. TypeError: ``model`` is not a module.

    Example:
        >>> import torch, ltransform as lt
        >>> model = lt.init_module(torch.nn.Linear, 2, 2, empty=True)
        >>> lt.materialize(model).weight.device.type
        'cpu'
    """
    if uninitialized not in _UNINITIALIZED:
        raise ValueError(f"materialize: unknown uninitialized={uninitialized!r}; expected one of: "
                         f"{', '.join(map(repr, _UNINITIALIZED))}")
    if model is MISSING:
        return Partial(lambda m: materialize(m, device=device, init=init, uninitialized=uninitialized),
                       f"materialize(device={device!r})")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"materialize: expected a torch.nn.Module, got {type(model).__name__}")
    if not any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers())):
        if getattr(model, SHARD_MATERIALIZED, False):  # lt.shard on XLA allocated it (it cannot take meta)
            if init is not None:
                with torch.no_grad():
                    _initialise(model, init)
            return model
        if init is not None or device is not None:
            raise ValueError("materialize: nothing of this model is on the meta device, so there is nothing to "
                             "allocate; build it with lt.init_module(..., empty=True) (to re-initialise a "
                             "built model, call its reset_parameters())")
        return model
    if device is None:
        from ltransform.distributed.env import device as this_device

        device = this_device()
    check = materialize_then_check(model, device, init, uninitialized)
    check()
    return model


SHARD_MATERIALIZED = "_ltransform_materialized_by_shard"  # set by lt.shard on XLA


def materialize_then_check(model: torch.nn.Module, device: Any, init: Any = None,
                           uninitialized: str = "raise") -> Callable[[], None]:
    """Materialize ``model`` (as :func:`materialize`) and return the check for tensors no initialiser
    wrote, to call later: on XLA the initialisers are only traced until something reads a value, so
    a model sharded before the check is initialised shard by shard, never whole on one device."""
    ties = _tied(model)
    model.to_empty(device=device)  # breaks ties of plain tensors (not of FSDP2's DTensors)
    _untie(model, ties)
    check = uninitialized != "ignore"
    if check:
        _fill_sentinel(model)
    _initialise(model, init)
    _tie(model, ties)
    _warn_if_shards_repeat(model)

    def check_written() -> None:
        missing = _still_sentinel(model) if check else []
        if missing:
            message = (f"materialize: no initialiser wrote {', '.join(missing)}: give the module(s) a "
                       f"reset_parameters(), the model an init_weights() or _init_weights(module), or "
                       f"pass materialize(init=fn); uninitialized='warn' or 'ignore' lets it pass")
            if uninitialized == "raise":
                raise RuntimeError(message)
            warnings.warn(message, stacklevel=3)

    return check_written


def _warn_if_shards_repeat(model: torch.nn.Module) -> None:
    """torch's DTensor random ops follow the global tensor only on CUDA-like meshes; on a CPU
    mesh each rank fills its shard from its own generator, so equal seeds repeat the values."""
    meshes = {id(p.device_mesh): p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh")}
    if any(mesh.device_type == "cpu" and mesh.size() > 1 for mesh in meshes.values()):
        warnings.warn("materialize: this model is sharded over a CPU device mesh, where torch's random "
                      "initialisers fill each rank's shard from that rank's own generator, so equal seeds "
                      "give every shard the same values; on CPU, build the model whole and lt.shard it, "
                      "or load weights after materialize", stacklevel=3)


def _named_tensors(model: torch.nn.Module, *, aliases: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=not aliases)
    yield from ((n, b) for n, b in model.named_buffers(remove_duplicate=not aliases) if b is not None)


def _tied(model: torch.nn.Module) -> list[list[str]]:
    """Names sharing one tensor, the first registered first (the one the others are tied to)."""
    names: dict[int, list[str]] = {}
    for name, tensor in _named_tensors(model, aliases=True):
        names.setdefault(id(tensor), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _set(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(owner), attribute, tensor)


def _get(model: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(owner), attribute)


def _untie(model: torch.nn.Module, ties: list[list[str]]) -> None:
    """Give each alias storage of its own (``to_empty`` already did for plain tensors), so every
    initialiser writes where it wrote at construction, before the model tied them."""
    for first, *aliases in ties:
        source = _get(model, first)
        for alias in aliases:
            if _get(model, alias) is source:
                scratch = torch.empty_like(source)
                _set(model, alias, torch.nn.Parameter(scratch, source.requires_grad)
                     if isinstance(source, torch.nn.Parameter) else scratch)


def _tie(model: torch.nn.Module, ties: list[list[str]]) -> None:
    for first, *aliases in ties:
        source = _get(model, first)
        for alias in aliases:
            _set(model, alias, source)


def _initialise(model: torch.nn.Module, init: Callable[[torch.nn.Module], None] | None) -> None:
    """Replay what construction did: a submodel with its own initialiser (a Hugging Face model
    inside another) was initialised when it was built, before the modules built after it, so
    each runs after the ``reset_parameters`` of its own modules, innermost first."""
    if init is not None:
        for module in model.modules():
            init(module)
        return
    for module in model.modules():  # transformers 4 marks modules initialised while on meta
        if getattr(module, "_is_hf_initialized", False):
            # (a plain bool; torch's stubs type every Module attribute Tensor | Module)
            module._is_hf_initialized = False  # type: ignore[assignment]
    reset: set[int] = set()
    for owner, own in _initialisers(model, covered=False, seen=set()):
        if own is None and owner is not model:
            continue
        for module in owner.modules():
            if id(module) not in reset:
                reset.add(id(module))
                reset_parameters = getattr(module, "reset_parameters", None)
                if callable(reset_parameters):
                    reset_parameters()
        if own is not None:
            own()


def _initialisers(module: torch.nn.Module, *, covered: bool,
                  seen: set[int]) -> Iterator[tuple[torch.nn.Module, Callable[[], Any] | None]]:
    """Each module with its initialiser (or None), innermost first. ``covered``: an ancestor has a
    no-argument initialiser, which is responsible for this module (torchtitan's
    ``Transformer.init_weights()`` calls its blocks' own, with the arguments they need)."""
    seen.add(id(module))
    own, whole = _own_initialiser(module, covered=covered)
    for child in module.children():
        if id(child) not in seen:
            yield from _initialisers(child, covered=covered or whole, seen=seen)
    yield module, own


def _own_initialiser(module: torch.nn.Module, *, covered: bool) -> tuple[Callable[[], Any] | None, bool]:
    """The module's initialiser and whether it is a whole-model one (called without arguments).

    A Hugging Face style module (a ``PreTrainedModel``, or one with ``_init_weights(module)``)
    always has its own, as its ``post_init`` ran at construction: ``initialize_weights()`` /
    ``init_weights()`` if callable without arguments, else ``_init_weights`` applied to every
    submodule. Any other module's ``init_weights()`` / ``initialize_weights()`` runs only when it
    takes no required arguments and no ancestor has one; an initialiser that needs arguments
    (torchtitan's ``init_weights(init_std)``) is its caller's business, never guessed."""
    per_module = _per_module_initialiser(module)
    if covered and per_module is None and not _is_pretrained(module):
        return None, False
    for name in ("initialize_weights", "init_weights", "_init_weights"):
        method = getattr(module, name, None)
        if callable(method) and _needs_no_arguments(method):
            return method, True
    if per_module is not None:
        return (lambda: module.apply(per_module)), False
    return None, False


def _per_module_initialiser(module: torch.nn.Module) -> Callable[[torch.nn.Module], Any] | None:
    """Hugging Face's ``_init_weights(module)``: one required argument, the submodule."""
    method = getattr(module, "_init_weights", None)
    if not callable(method) or _needs_no_arguments(method):
        return None
    try:
        inspect.signature(method).bind(module)
    except TypeError:
        return None
    return method


def _needs_no_arguments(method: Callable[..., Any]) -> bool:
    try:
        inspect.signature(method).bind()
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): call it as it is
        return True
    return True


def _is_pretrained(module: torch.nn.Module) -> bool:
    """A ``transformers.PreTrainedModel``, known without importing transformers."""
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
               for cls in type(module).__mro__)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor; the tensor itself otherwise."""
    # (one with a device_mesh is a DTensor, known without importing DTensor)
    return tensor.to_local() if hasattr(tensor, "device_mesh") else tensor  # type: ignore[attr-defined]


def _sentinel(tensor: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The view to fill and the value: NaN, a signed integer's minimum, an unsigned one's
    maximum, or byte 255 (no valid bool). Each is found again by one comparison and ``any()``
    (not ``amax()``, which XLA returns unreduced)."""
    if tensor.dtype == torch.bool:
        return tensor.view(torch.uint8), 255
    if tensor.is_complex():
        return torch.view_as_real(tensor), float("nan")
    if tensor.is_floating_point():
        return tensor, float("nan")
    info = torch.iinfo(tensor.dtype)
    return tensor, info.min if info.min < 0 else info.max


def _holds_sentinel(tensor: torch.Tensor) -> torch.Tensor:
    view, value = _sentinel(tensor)
    if view.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=view.device)
    if value != value:  # (not amax(): on XLA it returns the tensor unreduced)
        return view.isnan().any()
    return (view == value).any()


@torch.no_grad()
def _fill_sentinel(model: torch.nn.Module) -> None:
    for _, tensor in _named_tensors(model):
        view, value = _sentinel(_local(tensor))
        view.fill_(value)


@torch.no_grad()
def _still_sentinel(model: torch.nn.Module) -> list[str]:
    """Names of the tensors (this rank's shards; all ranks agree for a sharded model) that
    still hold the sentinel anywhere, with one host sync for all."""
    named = list(_named_tensors(model))
    if not named:
        return []
    flags = [_holds_sentinel(_local(tensor)) for _, tensor in named]
    hits = torch.stack([flag.to(flags[0].device) for flag in flags]).tolist()
    missing = [name for (name, _), hit in zip(named, hits) if hit]
    if any(hasattr(t, "device_mesh") for _, t in named):
        from ltransform.distributed import env

        missing = sorted(set().union(*env.all_gather_objects(missing)), key=[n for n, _ in named].index)
    return missing
