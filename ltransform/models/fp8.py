"""fp8 layers: Transformer Engine's or torchao's, swapped in for ``nn.Linear`` (and norms).

Both ``to_precision(model, name)`` (before ``shard``/``torch.compile``) and
``with_precision(step, name)`` (when the step is prepared, for a model not converted yet)
call :func:`convert`. The swap keeps the original ``Parameter`` objects, so an optimizer
built before it still holds the parameters that train. The extras are imported here, only
when an fp8 precision is used.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ltransform.core.precisions import Precision
from ltransform.models.select import selector

TRANSFORMER_ENGINE = "transformer-engine"
TORCHAO = "torchao"
_PIP = {TRANSFORMER_ENGINE: "pip install 'ltransform[te]' (or pip install transformer-engine[pytorch]; "
                            "it needs a CUDA build of torch)",
        TORCHAO: "pip install 'ltransform[torchao]' (or pip install 'torchao>=0.13,<0.18')"}
_MODULE = {TRANSFORMER_ENGINE: "transformer_engine", TORCHAO: "torchao"}
TORCHAO_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


def check_installed(p: Precision, call: str) -> None:
    """ImportError naming the pip command when ``p``'s fp8 library is missing (nothing imported)."""
    if p.fp8 is not None and importlib.util.find_spec(_MODULE[p.fp8]) is None:
        raise ImportError(f"{call}({p.name!r}) needs {_MODULE[p.fp8]}: {_PIP[p.fp8]}")


def converted(model: torch.nn.Module, p: Precision) -> bool:
    return any(is_fp8_layer(m, p.fp8) for m in model.modules())


def is_fp8_layer(module: torch.nn.Module, kind: str | None = None) -> bool:
    """A layer that one of the fp8 libraries swapped in (found by its classes' modules, so
    neither library is imported to ask; FSDP2 makes a subclass of each sharded layer's class)."""
    for cls in type(module).__mro__:
        origin = cls.__module__
        if origin.startswith("transformer_engine.") and kind in (None, TRANSFORMER_ENGINE):
            return True
        if origin.startswith("torchao.") and cls.__name__ == "Float8Linear" and kind in (None, TORCHAO):
            return True
    return False


def check_device(model: torch.nn.Module, p: Precision, call: str) -> None:
    """fp8 matmuls need compute capability 8.9+ (Ada, Hopper, Blackwell). torchao's layers also
    run on the CPU (torch emulates ``_scaled_mm`` there, slowly: for tests); a model still on
    the meta device is checked when it is used."""
    for device in {t.device for t in model.parameters()}:
        check_one_device(device, p, call)


def check_one_device(device: torch.device, p: Precision, call: str) -> None:
    if device.type == "meta" or (device.type == "cpu" and p.fp8 == TORCHAO):
        return
    needs = (f"{p.name!r} runs fp8 matmuls on an NVIDIA GPU of compute capability 8.9 or newer "
             f"(Ada, Hopper, Blackwell)")
    if device.type != "cuda":
        raise RuntimeError(f"{call}: {needs}, but the model is on {device}; move it to the GPU "
                           f"first, or use 'bf16-mixed'")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise RuntimeError(f"{call}: {needs}, but {device} ({torch.cuda.get_device_name(device)}) has "
                           f"compute capability {major}.{minor}; use 'bf16-mixed' on this GPU")


def convert(model: torch.nn.Module, p: Precision, *, recipe: Any = None, skip: Any = None,
            call: str) -> None:
    """Swap ``model``'s eligible layers for ``p``'s fp8 layers, in place, after casting it to
    ``p``'s weight dtype. Linear layers with a dimension that is not a multiple of 16 (the fp8
    GEMMs' requirement) are left as they were, with a warning naming them."""
    check_device(model, p, call)
    skipped = selector(skip, call=call, option="skip", default=False)
    if p.fp8 == TRANSFORMER_ENGINE:
        if recipe is not None:
            raise ValueError(f"{call}: a Transformer Engine recipe applies when the step runs; pass it "
                             f"to with_precision(step, {p.name!r}, recipe=...)")
        te = transformer_engine()
    else:
        config = _torchao_config(recipe, call)
    # everything that can fail has; now the model changes
    eligible, misfit = {}, []
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and not skipped(name, module):
            if module.in_features % 16 == 0 and module.out_features % 16 == 0:
                eligible[name] = module
            else:
                misfit.append(name)
    if misfit:
        warnings.warn(f"{call}({p.name!r}): {len(misfit)} linear layer(s) keep their precision because "
                      f"a dimension is not a multiple of 16, which fp8 matmuls need: {', '.join(misfit[:6])}",
                      stacklevel=3)
    model.to(p.param_dtype)
    if p.fp8 == TRANSFORMER_ENGINE:
        _to_transformer_engine(te, model, eligible, skipped, p.param_dtype)
    else:
        chosen = {id(m) for m in eligible.values()}
        torchao_float8(call).convert_to_float8_training(model, config=config,
                                                        module_filter_fn=lambda m, _: id(m) in chosen)


def _to_transformer_engine(te: Any, model: torch.nn.Module, linears: dict[str, torch.nn.Linear],
                           skipped: Any, dtype: torch.dtype) -> None:
    swaps = {}
    for name, module in model.named_modules():
        if name in linears:
            swaps[name] = _te_layer(te.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                              params_dtype=dtype, device="meta"), module)
        elif _te_norm(module) and not skipped(name, module):
            kind = te.LayerNorm if isinstance(module, torch.nn.LayerNorm) else te.RMSNorm
            # RMSNorm's default eps is that of the dtype it computes in (float32 for 16-bit inputs)
            eps = module.eps if module.eps is not None else torch.finfo(torch.promote_types(dtype, torch.float32)).eps
            swaps[name] = _te_layer(kind(module.normalized_shape[0], eps=eps,
                                         params_dtype=dtype, device="meta"), module)
    for name, layer in swaps.items():
        model.set_submodule(name, layer)


def _te_norm(module: torch.nn.Module) -> bool:
    """Norms TE has an equal of: one normalized dimension, with a learned scale (and shift)."""
    if type(module) is torch.nn.LayerNorm:
        return len(module.normalized_shape) == 1 and module.weight is not None and module.bias is not None
    if type(module) is torch.nn.RMSNorm:
        return len(module.normalized_shape) == 1 and module.weight is not None
    return False


def _te_layer(layer: torch.nn.Module, original: torch.nn.Module) -> torch.nn.Module:
    # TE builds its parameters on meta (no memory); the original Parameter objects take their
    # place, so an optimizer holding them stays valid.
    for name, param in original.named_parameters(recurse=False):
        setattr(layer, name, param)
    return layer


def torchao_float8(call: str) -> Any:
    """``torchao.float8``, or an ImportError naming the pip command where the installed torchao
    does not import next to this torch: torchao's wheels name no torch version, so pip can pair
    them wrongly (torchao 0.18 does not import on torch 2.9, nor 0.12 on torch 2.13)."""
    try:
        import torchao.float8
    except ImportError as error:
        try:
            installed = f"torchao {importlib.metadata.version('torchao')}"
        except importlib.metadata.PackageNotFoundError:
            installed = "the installed torchao"
        raise ImportError(f"{call}: {installed} does not import with torch {torch.__version__} ({error}); "
                          f"install a torchao that does: {_PIP[TORCHAO]}") from error
    return torchao.float8


def _torchao_config(recipe: Any, call: str) -> Any:
    Float8LinearConfig = torchao_float8(call).Float8LinearConfig

    from ltransform.distributed.env import world_size

    if recipe is None:
        # Sharded float8 weights all-gather in fp8 (half of bf16's bytes). Only a model that
        # is converted before lt.shard, so on several ranks, can be sharded.
        return Float8LinearConfig(enable_fsdp_float8_all_gather=world_size() > 1)
    if isinstance(recipe, str):
        if recipe not in TORCHAO_RECIPES:
            raise ValueError(f"{call}: unknown torchao float8 recipe {recipe!r}; expected one of: "
                             f"{', '.join(map(repr, TORCHAO_RECIPES))}, or a torchao Float8LinearConfig")
        return Float8LinearConfig.from_recipe_name(recipe)
    if isinstance(recipe, Float8LinearConfig):
        return recipe
    raise TypeError(f"{call}: a torchao recipe is a name ({', '.join(map(repr, TORCHAO_RECIPES))}) or a "
                    f"Float8LinearConfig, got {type(recipe).__name__}")


def transformer_engine() -> Any:
    try:
        import transformer_engine.pytorch as te
    except ImportError as error:
        raise ImportError(f"Transformer Engine is not installed: {_PIP[TRANSFORMER_ENGINE]}") from error
    return te


def te_autocast(recipe: Any) -> Callable[[], Any]:
    """A factory of Transformer Engine's fp8 autocast context with ``recipe`` (None: TE's
    default): ``te.autocast`` where it exists (newer TE), else the older ``te.fp8_autocast``."""
    te = transformer_engine()
    if hasattr(te, "autocast"):
        return lambda: te.autocast(enabled=True, recipe=recipe)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe)
