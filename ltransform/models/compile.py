"""``compile``: ``torch.compile`` as a model transform, per block (regional) or whole, in place."""

from __future__ import annotations

from typing import Any

import torch

from ltransform.core.compose import MISSING, Partial
from ltransform.distributed import env, wrappers
from ltransform.models.order import applied, check_order
from ltransform.models.shard import Policy, _matches, _outermost, _policy


def compile(model: Any = MISSING, /, policy: Policy = None, *, regional: bool = True, **options: Any) -> Any:
    """Compile ``model`` with ``torch.compile``, block by block (regional) or as a whole, in place.

    Regional compilation compiles the ``forward`` of each block the policy picks, in place, so
    the repeated blocks of a transformer share one compiled graph: compile time is that of one
    block, not of the whole model, and what runs around a block's forward (FSDP2's gathers,
    activation checkpointing's hooks) stays eager. The model keeps its type and its parameter names, so
    checkpoints written before and after compiling are interchangeable (``torch.compile(model)``
    returns a wrapper whose state dict keys gain an ``_orig_mod.`` prefix).

    Args:
        model: the module; omit it for the partial form.
        policy: which blocks to compile: a set of module classes (e.g. ``{Block}``), a predicate
            ``module -> bool``, or a minimum parameter count, as for :func:`shard`. None with
            ``regional=True``: the repeated blocks, i.e. the children of every ``ModuleList`` /
            ``Sequential`` / ``ModuleDict`` that holds two or more modules of one class.
        regional: compile the blocks (True) or the whole model's forward (False; then
            ``policy`` must be None).
        **options: passed to ``torch.compile`` (``backend``, ``mode``, ``fullgraph``,
            ``dynamic``, ``options``).

    Returns:
        The same module, its blocks (or itself) compiled in place; nothing is compiled until the
        first forward.

    Raises:
        RuntimeError: applied twice, or after ``shard`` (compile must come before it), or to
            a model ``torch.compile`` already wrapped.
        ValueError: no block found or matched; a policy together with ``regional=False``; a
            Hugging Face model with ``config.use_cache`` on (set it to False to train).
        TypeError: a model that is not a module, an option ``torch.compile`` does not take.

    Example:
        >>> import torch, ltransform as lt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> model = lt.compile(model, backend="eager")  # both Linear layers: the repeated blocks
        >>> model(torch.ones(1, 4)).shape
        torch.Size([1, 4])

    Note:
        The one order of model transforms: ``checkpoint_activations`` and ``to_precision``
        before ``compile``, ``compile`` before ``shard`` (each checks it). On XLA the whole step
        is traced and compiled by torch_xla already: ``compile`` returns the model unchanged.
    """
    if not isinstance(regional, bool):
        raise TypeError(f"compile: regional must be True or False, got {regional!r}")
    if not regional and policy is not None:
        raise ValueError("compile: a policy picks blocks to compile one by one; with regional=False the whole "
                         "model is compiled: drop the policy, or keep regional=True")
    match = _policy(policy)
    if model is MISSING:
        text = "compile(" + ", ".join([*([f"policy={policy!r}"] if policy is not None else []),
                                       *([] if regional else ["regional=False"]),
                                       *(f"{k}={v!r}" for k, v in options.items())]) + ")"
        return Partial(lambda m: compile(m, policy, regional=regional, **options), text)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compile: expected a torch.nn.Module, got {type(model).__name__}")
    check_order(model, "torch.compile")
    if "torch.compile" in applied(model):
        raise RuntimeError("compile: the model (or one of its blocks) is already compiled; compile once, "
                           "with lt.compile(model) or lt.compile(model, policy={Block})")
    if getattr(getattr(model, "config", None), "use_cache", False) is True:  # a Hugging Face model
        raise ValueError(
            "compile: model.config.use_cache is True: a Hugging Face model then builds a KV cache in every "
            "forward, whose per-layer state makes torch.compile recompile each layer (and leave the layers past "
            "its recompile limit uncompiled); to train, set model.config.use_cache = False first")
    if env.accelerator() == "xla":
        return model
    if not regional:
        blocks = [model]
    else:
        blocks = _outermost(_matches(model, match)) if match is not None else _repeated(model)
        if not blocks:
            found = (f"policy {policy!r} matches no submodule" if match is not None else
                     "found no repeated blocks (two or more modules of one class in a ModuleList, Sequential or "
                     "ModuleDict)")
            raise ValueError(f"compile: {found} of {type(model).__name__}; give policy={{YourBlock}}, or "
                             f"regional=False to compile the whole model")
    for block in blocks:
        wrappers.compile_forward(block, **options)
    return model


def _repeated(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The children of every ``ModuleList`` / ``Sequential`` / ``ModuleDict`` holding two or more
    modules of one class, outermost first (a repeated block's own repeated layers are not compiled again)."""
    found: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            kinds = [type(child) for child in module.children()]
            found += [child for child in module.children() if kinds.count(type(child)) > 1]
    return _outermost(found)
