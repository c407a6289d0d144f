"""Ready tensor-parallel plans for ``lt.parallelize``: ``lt.plans.gpt`` (the demo GPT) and ``lt.plans.llama``.

Each is a function ``model -> dict`` (pass it as ``plan=``, or call it to see or edit the plan). Attention
is split by heads: the query/key/value projections column-wise, the output projection row-wise, so each
rank computes its own heads and one all-reduce sums the outputs; the MLP likewise (up column-wise, down
row-wise). Embeddings, norms and the head stay replicated. ``sequence=True`` adds sequence parallel:
the norms run on a slice of the sequence, and the activations between the split layers stay split
along the sequence (less activation memory per rank, the same traffic). ``loss_parallel=True`` splits
the output projection column-wise too and leaves its logits split over the vocabulary (a ``DTensor``):
``lt.distribute`` then computes the loss and its backward under torch's ``loss_parallel``, so the
whole ``batch x sequence x vocabulary`` logits are never gathered on one rank (worth it for a large
vocabulary; anything else reading the logits, such as sampling, calls ``logits.full_tensor()``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["gpt", "llama"]


def gpt(model: torch.nn.Module, *, sequence: bool = False, loss_parallel: bool = False) -> dict[str, Any]:
    """The plan for ``ltransform.examples.gpt.GPT``: in every block, ``attn.qkv`` and ``mlp.0`` column-wise,
    ``attn.proj`` and ``mlp.2`` row-wise; with ``sequence=True`` also ``ln1`` / ``ln2`` sequence parallel;
    with ``loss_parallel=True`` also ``head``, its logits left split over the vocabulary (see above).

    The demo's attention groups qkv's features per head and reads its head count from qkv's output,
    so a rank's column slice is whole heads; ``n_head`` must be divisible by the tensor-parallel size.

    Example:
        >>> import ltransform as lt
        >>> from ltransform.examples.gpt import GPT, GPTConfig
        >>> sorted(lt.plans.gpt(GPT(GPTConfig(n_layer=1))))
        ['blocks.0.attn.proj', 'blocks.0.attn.qkv', 'blocks.0.mlp.0', 'blocks.0.mlp.2']
    """
    blocks = [(n, m) for n, m in model.named_modules()
              if isinstance(getattr(m, "attn", None), torch.nn.Module) and hasattr(m.attn, "qkv")
              and isinstance(getattr(m, "mlp", None), torch.nn.Sequential)]
    if not blocks:
        raise ValueError(f"lt.plans.gpt: {type(model).__name__} has no blocks with attn.qkv, attn.proj and an mlp "
                         f"Sequential (the demo GPT's Block); write a plan for it")
    plan: dict[str, Any] = {}
    for name, block in blocks:
        heads = block.attn.heads
        plan |= {f"{name}.attn.qkv": _heads("colwise", heads), f"{name}.attn.proj": _heads("rowwise", heads),
                 f"{name}.mlp.0": "colwise", f"{name}.mlp.2": "rowwise"}
        if sequence:
            plan |= _sequence(name, heads, norms=("ln1", "ln2"), attention="attn", outputs=("attn.proj", "mlp.2"))
    return plan | (_output(model, "head") if loss_parallel else {})


def llama(model: torch.nn.Module, *, sequence: bool = False, loss_parallel: bool = False) -> dict[str, Any]:
    """The plan for Hugging Face Llama-style decoder layers: in every layer ``self_attn.{q,k,v}_proj`` and
    ``mlp.{gate,up}_proj`` column-wise, ``self_attn.o_proj`` and ``mlp.down_proj`` row-wise; with
    ``sequence=True`` also ``input_layernorm`` / ``post_attention_layernorm`` sequence parallel; with
    ``loss_parallel=True`` also ``lm_head`` (of a ``...ForCausalLM``), its logits left split over the
    vocabulary (transformers' own loss, ``model(ids, labels=ids).loss``, then runs under ``loss_parallel``).

    Transformers' attention reshapes with ``-1`` heads, so a rank's column slice is its own heads; both
    ``num_attention_heads`` and ``num_key_value_heads`` must be divisible by the tensor-parallel size
    (checked when applied). Train with ``config.use_cache = False``.
    """
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    layers = [(n, m) for n, m in model.named_modules()
              if all(hasattr(getattr(m, "self_attn", None), p) for p in projections)
              and all(hasattr(getattr(m, "mlp", None), p) for p in ("gate_proj", "up_proj", "down_proj"))]
    if not layers:
        raise ValueError(f"lt.plans.llama: {type(model).__name__} has no decoder layers with "
                         f"self_attn.{{q,k,v,o}}_proj and mlp.{{gate,up,down}}_proj (Llama's); write a plan for it")
    plan: dict[str, Any] = {}
    for name, layer in layers:
        config = layer.self_attn.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        plan |= {f"{name}.self_attn.q_proj": _heads("colwise", heads),
                 f"{name}.self_attn.k_proj": _heads("colwise", kv_heads, "num_key_value_heads"),
                 f"{name}.self_attn.v_proj": _heads("colwise", kv_heads, "num_key_value_heads"),
                 f"{name}.self_attn.o_proj": _heads("rowwise", heads),
                 f"{name}.mlp.gate_proj": "colwise", f"{name}.mlp.up_proj": "colwise",
                 f"{name}.mlp.down_proj": "rowwise"}
        if sequence:  # (transformers passes the attention its hidden_states by name)
            plan |= _sequence(name, heads, norms=("input_layernorm", "post_attention_layernorm"), attention="self_attn",
                              outputs=("self_attn.o_proj", "mlp.down_proj"), by_name="hidden_states")
    return plan | (_output(model, "lm_head") if loss_parallel else {})


def _heads(style: str, heads: int, what: str = "heads", **options: Any) -> Any:
    """A column- or row-wise style that also records how many attention heads its layer holds:
    ``lt.parallelize`` checks that they divide evenly over the tensor-parallel ranks."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    made: Any = (ColwiseParallel if style == "colwise" else RowwiseParallel)(**options)
    made.heads = (heads, what)
    return made


def _output(model: torch.nn.Module, name: str) -> dict[str, Any]:
    """The output projection column-wise, its logits left a ``DTensor`` split over the vocabulary (its last
    dimension), for a loss under torch's ``loss_parallel`` (which ``lt.distribute`` enters: the style is
    marked for it)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel

    if not isinstance(getattr(model, name, None), torch.nn.Linear):
        raise ValueError(f"lt.plans: loss_parallel=True splits the output projection {name!r}, but "
                         f"{type(model).__name__} has no Linear {name!r}")
    made: Any = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False)
    made.loss_parallel = True
    return {name: made}


def _rowwise(**options: Any) -> Any:
    from torch.distributed.tensor.parallel import RowwiseParallel

    return RowwiseParallel(**options)


def _sequence(name: str, heads: int, *, norms: tuple[str, str], attention: str, outputs: tuple[str, str],
              by_name: str | None = None) -> dict[str, Any]:
    """Sequence parallel for one block: the block's input split along the sequence and gathered at its
    end, its norms run on their slice, the attention and the MLP gathering their (split) input, and their
    row-wise output projections (``outputs``: attention's, then the MLP's) leaving their output split
    along the sequence again. ``by_name``: the attention takes its input as that keyword argument."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, SequenceParallel

    split, whole = Shard(1), Replicate()
    gathered: dict[str, Any] = dict(input_layouts=(split,), desired_input_layouts=(whole,))
    attention_input = gathered if by_name is None else dict(input_kwarg_layouts={by_name: split},
                                                            desired_input_kwarg_layouts={by_name: whole})
    return {
        name: _block_io(),
        **{f"{name}.{norm}": SequenceParallel() for norm in norms},
        f"{name}.{attention}": PrepareModuleInput(**attention_input, use_local_output=True),
        f"{name}.mlp": PrepareModuleInput(**gathered, use_local_output=True),
        f"{name}.{outputs[0]}": _heads("rowwise", heads, output_layouts=split, use_local_output=False),
        f"{name}.{outputs[1]}": _rowwise(output_layouts=split, use_local_output=False),
    }


def _block_io() -> Any:
    """Into a block, split the (replicated) activations along the sequence; out of it, gather them
    (the layers between the blocks then see whole, plain tensors)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInputOutput

    return PrepareModuleInputOutput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                    output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),),
                                    use_local_input=False, use_local_output=True)
