"""``quantize``: replace ``nn.Linear`` layers with bitsandbytes' 4-bit or 8-bit layers, or torchao's NF4."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import attrs
import torch

from ltransform.core.compose import MISSING, Partial
from ltransform.models.weights import (aliases, check_missing, fill, open_weights, placed, read,
                                       release_freed_memory)
from ltransform.models.adapters import LowRank
from ltransform.models.nf4 import MODES as NF4_MODES
from ltransform.models.nf4 import check_sizes, nf4_layer
from ltransform.models.order import check_order
from ltransform.models.select import selector
from ltransform.core.state import mark_replaced


@attrs.frozen(kw_only=True)
class Quantization:
    """What a quantization mode does to each ``nn.Linear``.

    Args:
        name: the mode's name.
        bits: 4 (``Linear4bit``) or 8 (``Linear8bitLt``).
        quant_type: ``"nf4"`` or ``"fp4"`` for 4 bits.
        double_quant: quantize the quantization constants too (``compress_statistics``).
        trainable: 8 bits only: keep trainable 16/32-bit weights, quantized on the fly in the
            forward (``has_fp16_weights=True``); otherwise the weights are frozen int8.
    """

    name: str
    bits: int = attrs.field(validator=attrs.validators.in_((4, 8)))
    quant_type: str | None = None
    double_quant: bool = False
    trainable: bool = False


QUANTIZATIONS = {q.name: q for q in (
    Quantization(name="int8", bits=8),
    Quantization(name="int8-training", bits=8, trainable=True),
    Quantization(name="nf4", bits=4, quant_type="nf4"),
    Quantization(name="nf4-dq", bits=4, quant_type="nf4", double_quant=True),
    Quantization(name="fp4", bits=4, quant_type="fp4"),
    Quantization(name="fp4-dq", bits=4, quant_type="fp4", double_quant=True),
)}

BACKENDS = ("bitsandbytes", "torchao")
Skip = Any  # names, glob patterns, or a predicate (name, module) -> bool
Make = Callable[[torch.Tensor, "torch.nn.Parameter | None"], torch.nn.Module]  # (weight, bias) -> the new layer


def quantize(model: Any = MISSING, /, mode: Any = MISSING, *, backend: str = "bitsandbytes", skip: Skip = None,
             compute_dtype: torch.dtype | None = None, weights: Any = None,
             device: str | torch.device | None = None) -> Any:
    """Replace every ``nn.Linear`` of ``model`` (except the skipped ones) with a quantized layer.

    bitsandbytes modes: ``"nf4"`` / ``"fp4"`` (4-bit ``Linear4bit`` of that type), ``"nf4-dq"`` /
    ``"fp4-dq"`` (also quantizing the quantization constants), ``"int8"`` (``Linear8bitLt``
    with frozen int8 weights, for inference) and ``"int8-training"`` (``Linear8bitLt`` keeping
    trainable weights). With ``backend="torchao"``, ``"nf4"`` and ``"nf4-dq"`` give
    :class:`~ltransform.models.nf4.NF4Linear` layers holding torchao's ``NF4Tensor``, which
    ``lt.shard`` can shard (QLoRA across ranks); torchao always quantizes the scalers too, so
    the two modes are the same there. Quantized weights are frozen: train adapters on top, or
    use ``"int8-training"``. Biases are kept as they were.

    Args:
        model: the module; omit it for the partial form.
        mode: the mode's name.
        backend: ``"bitsandbytes"`` (default) or ``"torchao"`` (NF4 only; each weight's size must be
            a multiple of 16384 elements, of 16384 times the ranks to shard it).
        skip: layers to keep in full precision: an iterable of names and glob patterns
            (``{"lm_head", "blocks.*.attn.*"}``) or a predicate ``(name, module) -> bool``.
        compute_dtype: the dtype 4-bit layers compute in (default: the weight's dtype).
        weights: where the weights come from, read one tensor at a time: a ``.safetensors``
            file, a ``torch.save``-d state dict (memory-mapped) or a mapping of names to
            tensors. Required for a model built on the meta device
            (``lt.init_module(..., empty=True)``): each linear layer is loaded, quantized and
            freed before the next, so the full-precision model never exists. The other
            parameters and buffers are loaded too, in the model's dtypes.
        device: where to put the loaded weights (default: where each is, ``lt.device()`` for
            one on meta).

    Returns:
        The same module, with its linear layers replaced in place.

    Raises:
        ValueError: an unknown mode or backend, or a mode the backend lacks (lists the valid
            ones); a meta model and no ``weights``; a stored tensor of the wrong shape.
        RuntimeError: applied after ``add_adapters``, ``torch.compile``, ``shard`` or ``parallelize``.
        KeyError: tensors missing from ``weights`` (all named).
        ImportError: bitsandbytes (torchao) is not installed (names the pip command).

    Example:
        >>> import torch, ltransform as lt
        >>> model = lt.quantize(torch.nn.Sequential(torch.nn.Linear(64, 64)), "nf4")  # doctest: +SKIP
        >>> type(model[0]).__name__  # doctest: +SKIP
        'Linear4bit'
        >>> layers = torch.nn.Sequential(torch.nn.Linear(128, 128))
        >>> model = lt.quantize(layers, "nf4", backend="torchao")  # doctest: +SKIP
        >>> type(model[0].weight).__name__  # doctest: +SKIP
        'NF4Tensor'

    Note:
        Build the optimizer after quantizing: the replaced layers have new parameters. Quantize
        first: ``lt.pipe(model, lt.quantize("nf4", backend="torchao"), lt.add_adapters(rank),
        lt.shard(policy=...))``; tensor parallel cannot split quantized weights.
    """
    if mode is MISSING and not isinstance(model, torch.nn.Module) and model is not MISSING:
        model, mode = MISSING, model
    record = resolve_quantization(mode, backend)
    skipped = selector(skip, call="quantize", option="skip", default=False)
    if model is MISSING:
        text = f"quantize({record.name!r}" + ("" if backend == "bitsandbytes" else f", backend={backend!r}") + ")"
        return Partial(lambda m: quantize(m, record.name, backend=backend, skip=skip, compute_dtype=compute_dtype,
                                          weights=weights, device=device), text)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"quantize: expected a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, LowRank) for m in model.modules()):
        raise RuntimeError("quantize must be applied before add_adapters; reorder: "
                           "lt.pipe(model, lt.quantize(mode), lt.add_adapters(rank))")
    check_order(model, "quantize")
    make = _maker(backend, record, compute_dtype)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is torch.nn.Linear and not skipped(name, module)]
    if backend == "torchao":
        check_sizes(targets)
    if weights is not None:
        return _quantize_from(weights, model, targets, make, device)
    on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise ValueError(f"quantize: the model is on the meta device (e.g. {on_meta[0]!r}); pass "
                         f"weights=PATH (.safetensors or a torch.save-d state dict) or a state dict to "
                         f"load and quantize it layer by layer")
    for name, linear in targets:
        layer = make(linear.weight.data, linear.bias)
        mark_replaced([linear.weight], "lt.quantize")
        model.set_submodule(name, layer)
    return model


def _maker(backend: str, record: Quantization, compute_dtype: torch.dtype | None) -> Make:
    """The function building a quantized layer from a linear layer's weight and bias."""
    if backend == "torchao":
        return functools.partial(nf4_layer, compute_dtype=compute_dtype)
    return functools.partial(_replacement, _bitsandbytes(), record, compute_dtype=compute_dtype)


def _quantize_from(source: Any, model: torch.nn.Module, targets: list[tuple[str, torch.nn.Linear]],
                   make: Make, device: str | torch.device | None) -> torch.nn.Module:
    """Load, quantize and place one linear layer at a time, then load everything else."""
    device = torch.device(device) if device is not None else None
    tied = aliases(model)
    done, missing = set(), []
    with open_weights(source, call="quantize") as stored:
        for name, linear in targets:
            prefix = f"{name}." if name else ""
            weight = read(stored, prefix + "weight", tied)
            bias = None if linear.bias is None else read(stored, prefix + "bias", tied)
            if weight is None or (linear.bias is not None and bias is None):
                missing.append(prefix + ("weight" if weight is None else "bias"))
                continue
            weight = placed(weight, linear.weight, prefix + "weight", device, "quantize")
            if bias is not None:
                bias = torch.nn.Parameter(placed(bias, linear.bias, prefix + "bias", device, "quantize"),
                                          requires_grad=linear.bias.requires_grad)
            model.set_submodule(name, make(weight, bias))
            mark_replaced([linear.weight], "lt.quantize")
            done |= {prefix + "weight", prefix + "bias"}
            on_cpu = weight.device.type == "cpu"
            del weight, bias  # the full-precision copy goes before the next layer is read
            if on_cpu:
                release_freed_memory()
        check_missing(missing, "quantize")
        quantized = {n for n, _ in model.named_parameters()} & done
        fill(model, stored, device=device, call="quantize", done=quantized)
    return model


def resolve_quantization(mode: Any, backend: str = "bitsandbytes") -> Quantization:
    """The record of a mode's name, checked against the backend.

    Raises:
        ValueError: an unknown backend or mode, or a mode the backend lacks (lists the valid ones).
    """
    if backend not in BACKENDS:
        raise ValueError(f"quantize: unknown backend {backend!r}; expected one of: {', '.join(map(repr, BACKENDS))}")
    record = mode if isinstance(mode, Quantization) else QUANTIZATIONS.get(mode) if isinstance(mode, str) else None
    if record is None:
        raise ValueError(f"quantize: unknown mode {mode!r}; expected one of: {', '.join(map(repr, QUANTIZATIONS))}")
    if backend == "torchao" and record.name not in NF4_MODES:
        raise ValueError(f"quantize: mode {record.name!r} is not available with backend='torchao'; expected one of: "
                         f"{', '.join(map(repr, NF4_MODES))} (or backend='bitsandbytes' for {record.name!r})")
    return record


def _replacement(bnb: Any, q: Quantization, weight: torch.Tensor, bias: torch.nn.Parameter | None,
                 compute_dtype: torch.dtype | None) -> torch.nn.Module:
    out_features, in_features = weight.shape
    has_bias = bias is not None
    target = weight.device
    if q.bits == 8 and not q.trainable and target.type not in ("cpu", "meta"):
        # bitsandbytes quantizes Int8Params only when they move from the CPU (Int8Params.to): a
        # weight already on the GPU would stay full precision until the first forward
        weight = weight.cpu()
    if q.bits == 4:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=has_bias,
                                  compute_dtype=compute_dtype or weight.dtype,
                                  compress_statistics=q.double_quant, quant_type=q.quant_type, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=q.double_quant,
                                         quant_type=q.quant_type)
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias,
                                    has_fp16_weights=q.trainable, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=q.trainable, has_fp16_weights=q.trainable)
    if has_bias:
        layer.bias = bias
    if q.bits == 4:
        layer.register_load_state_dict_pre_hook(_load_4bit)
    elif not q.trainable:
        layer.register_load_state_dict_pre_hook(_load_int8)
    return layer.to(target)  # moving the parameters is what quantizes them


# Load hooks of the quantized layers, so that ``layer.load_state_dict(layer.state_dict())``
# round-trips (torch's ``register_load_state_dict_pre_hook``: they run before the layer's own
# loader, and what they pop from the state dict it never sees). They are module-level functions
# so that a quantized model can still be deep-copied and pickled.

def _load_4bit(layer: Any, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Packed 4-bit weights and their quantization state (``weight.absmax``, ``weight.quant_map``,
    ...), which the default loader cannot read: the weight is rebuilt from them
    (``Params4bit.from_prequantized``), then the loader copies the packed data into it."""
    key = f"{prefix}weight"
    stats = [k for k in state_dict if k.startswith(f"{key}.")]
    if key not in state_dict or not stats:  # e.g. a file holding only adapters
        return
    packed = state_dict[key]
    if packed.numel() * packed.element_size() * 2 != layer.in_features * layer.out_features:
        return  # another layer's size: left to the loader, which reports it and changes nothing
    bnb = _bitsandbytes()
    device = layer.weight.device
    layer.weight = bnb.nn.Params4bit.from_prequantized(  # filled by the loader, right after this hook
        data=torch.empty_like(packed, device=device),
        quantized_stats={k[len(key) + 1:]: _copied(state_dict.pop(k), device) for k in stats},
        requires_grad=False, device=device, module=layer)


def _copied(value: Any, device: torch.device) -> Any:
    return value.to(device, copy=True) if isinstance(value, torch.Tensor) else value


def _load_int8(layer: Any, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Frozen int8 weights: their row scales (``SCB``) are copied in place here, the weight by the
    default loader. bitsandbytes' own loader refuses once a forward has moved the scales from the
    weight into the layer's state."""
    if f"{prefix}weight" not in state_dict or f"{prefix}SCB" not in state_dict:
        return
    saved_scales = state_dict.pop(f"{prefix}SCB")
    state_dict.pop(f"{prefix}weight_format", None)
    if state_dict[f"{prefix}weight"].shape != layer.weight.shape:
        return  # another layer's size: the loader reports it and changes nothing
    scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    with torch.no_grad():
        scales.copy_(saved_scales)


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError("quantize needs bitsandbytes: pip install 'ltransform[quant]' "
                          "(or pip install bitsandbytes)") from error
    return bitsandbytes
