"""``init_module(empty=True)`` -> ``lt.shard`` -> ``materialize`` initialises every tensor, or says
which it could not: modules without ``reset_parameters`` (an RMSNorm), buffers computed in
``__init__`` (RoPE ``inv_freq``, lost on ``meta``) and tied weights (a head sharing the embedding).

Checked on a small Hugging Face-style model written here and on real ``transformers`` Llama and
GPT-2 models built from tiny configs (no download), plain, sharded on a one-rank gloo group, and
sharded on 2 ranks through ``lt.launch``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import ltransform as lt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DTensor's notice on CPU random ops


class RMSNorm(nn.Module):
    """As in Hugging Face models: a weight, and no ``reset_parameters``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Rotary(nn.Module):
    """RoPE frequencies computed in ``__init__``, a non-persistent buffer (lost on ``meta``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self) -> torch.Tensor:
        return 1.0 / (10000 ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.proj = RMSNorm(dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.norm(x))


class TinyLM(nn.Module):
    """A Hugging Face-style causal LM: its own ``_init_weights(module)``, applied at the end of
    ``__init__``, then the head tied to the embedding (as ``post_init`` does)."""

    def __init__(self, vocab: int = 32, dim: int = 8, layers: int = 2, own_init: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.norm, self.rotary = RMSNorm(dim), Rotary(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if own_init:
            self.apply(self._init_weights)
        else:
            self._init_weights = None  # no initialiser of its own: materialize must say what is left
        self.head.weight = self.embed.weight

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, Rotary):
            module.inv_freq.copy_(module.frequencies())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def built_directly(build, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build()


def materialized(build, *, seed: int = 0, shard_policy=None, **options) -> nn.Module:
    model = lt.init_module(build, empty=True)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if shard_policy is not None:
        model = lt.shard(model, policy=shard_policy)
    torch.manual_seed(seed)
    return lt.materialize(model, **options)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def assert_equal_models(model: nn.Module, reference: nn.Module) -> None:
    ours, theirs = dict(_all_tensors(model)), dict(_all_tensors(reference))
    assert ours.keys() == theirs.keys()
    different = [name for name in theirs if not torch.equal(full(ours[name]), theirs[name])]
    assert not different, f"differ from the directly built model: {different}"


def _all_tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def test_meta_init_then_materialize_equals_a_directly_built_model():
    model = materialized(TinyLM)
    assert_equal_models(model, built_directly(TinyLM))
    assert model.head.weight is model.embed.weight  # the tie survived to_empty


def test_meta_init_shard_materialize_on_one_rank_equals_a_directly_built_model(one_rank_group):
    model = materialized(TinyLM, shard_policy={Block})
    assert hasattr(model.embed.weight, "device_mesh")  # really sharded
    assert_equal_models(model, built_directly(TinyLM))
    assert model.head.weight is model.embed.weight
    out = model(torch.arange(6).view(2, 3))  # and it runs through FSDP2's hooks
    ref = built_directly(TinyLM)(torch.arange(6).view(2, 3))
    assert torch.equal(out, ref)


def test_tensors_no_initialiser_writes_are_named():
    build = lambda: TinyLM(own_init=False)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"materialize: no initialiser wrote blocks\.0\.norm\.weight, "
                                           r"blocks\.1\.norm\.weight, norm\.weight, rotary\.inv_freq: give"):
        materialized(build)
    with pytest.warns(UserWarning, match=r"no initialiser wrote .*rotary\.inv_freq"):
        materialized(build, uninitialized="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        materialized(build, uninitialized="ignore")
    with pytest.raises(ValueError, match=r"materialize: unknown uninitialized='skip'; expected one of: "
                                         r"'raise', 'warn', 'ignore'"):
        lt.materialize(uninitialized="skip")


def test_names_are_agreed_on_a_sharded_model(one_rank_group):
    with pytest.raises(RuntimeError, match=r"no initialiser wrote blocks\.0\.norm\.weight, .*rotary\.inv_freq"):
        materialized(lambda: TinyLM(own_init=False), shard_policy={Block})


def test_a_partial_write_and_every_dtype_are_caught():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 4))
            self.register_buffer("mask", torch.ones(4, dtype=torch.bool))
            self.register_buffer("ids", torch.arange(4))

        def reset_parameters(self) -> None:
            with torch.no_grad():
                self.weight[0].zero_()  # only a row: the rest is still garbage

    with pytest.raises(RuntimeError, match=r"no initialiser wrote weight, mask, ids: give"):
        materialized(Odd)


def test_a_user_init_replaces_the_built_in_ones_and_is_checked_too():
    def init(module):
        if isinstance(module, nn.Linear):
            nn.init.constant_(module.weight, 0.5)

    with pytest.raises(RuntimeError, match=r"no initialiser wrote embed\.weight, blocks\.0\.norm\.weight"):
        materialized(TinyLM, init=init)


# --- a torchtitan-style model: the top model's init_weights() calls its blocks' with arguments ----

class TitanFeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(2 * dim, dim, bias=False)

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.w2.weight, mean=0.0, std=init_std)


class TitanBlock(nn.Module):
    """As torchtitan's llama3 block: ``init_weights()`` without arguments, called by the model's."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.ff = nn.RMSNorm(dim), TitanFeedForward(dim)
        self.weight_init_std = 0.01

    def init_weights(self) -> None:
        self.norm.reset_parameters()
        self.ff.init_weights(self.weight_init_std)


class TitanBlockWithStd(TitanBlock):
    """``init_weights(init_std)``: an initialiser that needs an argument from its caller."""

    def init_weights(self, init_std: float) -> None:
        self.norm.reset_parameters()
        self.ff.init_weights(init_std)


class TitanTransformer(nn.Module):
    """As torchtitan's ``Transformer``: ``freqs_cis`` made by a helper (on meta: lost) and made
    again by ``init_weights(buffer_device=None)``, which initialises everything itself."""

    def __init__(self, vocab: int = 32, dim: int = 8, layers: int = 2, block_needs_std: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.register_buffer("freqs_cis", self._precompute_freqs_cis(), persistent=True)
        block = TitanBlockWithStd if block_needs_std else TitanBlock
        self.layers = nn.ModuleDict({str(i): block(dim) for i in range(layers)})
        self.norm, self.output = nn.RMSNorm(dim), nn.Linear(dim, vocab, bias=False)

    def _precompute_freqs_cis(self) -> torch.Tensor:
        freqs = 1.0 / (10000 ** (torch.arange(0, self.dim, 2)[: self.dim // 2].float() / self.dim))
        return torch.polar(torch.ones(16, self.dim // 2), torch.outer(torch.arange(16).float(), freqs))

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        with torch.device(buffer_device or self.freqs_cis.device):
            self.freqs_cis = self._precompute_freqs_cis()
        nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            layer.init_weights(0.005) if isinstance(layer, TitanBlockWithStd) else layer.init_weights()
        self.norm.reset_parameters()
        std = self.dim ** -0.5
        nn.init.trunc_normal_(self.output.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


@pytest.mark.parametrize("block_needs_std", [True, False], ids=["block-init-needs-std", "block-init-no-args"])
def test_a_torchtitan_style_model_equals_a_direct_build_then_its_init_weights(block_needs_std):
    """Blocks' ``init_weights(init_std)`` is never applied to submodules (it was: TypeError in
    trunc_normal_), nor a no-argument one run besides the model's, which calls it (a second draw
    would shift the random stream); ``freqs_cis``, lost on meta, is made again."""
    build = lambda: TitanTransformer(block_needs_std=block_needs_std)  # noqa: E731
    model = materialized(build)
    reference = built_directly(build)
    reference.init_weights()
    assert_equal_models(model, reference)
    assert torch.is_complex(model.freqs_cis) and not model.freqs_cis.isnan().any()


def test_an_initialiser_that_needs_arguments_is_not_called_with_a_submodule():
    """A block whose ``init_weights(init_std)`` has no caller: materialize does not guess the
    argument (it passed each submodule as ``init_std``), the ``reset_parameters`` stand."""
    model = materialized(lambda: TitanBlockWithStd(8))
    assert_equal_models(model, built_directly(lambda: TitanBlockWithStd(8)))


# --- real Hugging Face models (what users and the acceptance suite run) ---------------------------

def _llama():
    transformers = pytest.importorskip("transformers", reason="pip install transformers for the real-model checks")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=True)
    return lambda: transformers.LlamaForCausalLM(config)


def _gpt2():
    transformers = pytest.importorskip("transformers", reason="pip install transformers for the real-model checks")
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return lambda: transformers.GPT2LMHeadModel(config)


def _blocks(model_build, name: str) -> set[type]:
    return {type(m) for m in lt.init_module(model_build, empty=True).modules() if type(m).__name__ == name}


@pytest.mark.parametrize("sharded", [False, True])
def test_hugging_face_llama_equals_a_directly_built_one(sharded, request):
    build = _llama()
    if sharded:
        request.getfixturevalue("one_rank_group")
    model = materialized(build, shard_policy=_blocks(build, "LlamaDecoderLayer") if sharded else None)
    assert_equal_models(model, built_directly(build))  # RMSNorm weights and RoPE inv_freq included
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("sharded", [False, True])
def test_hugging_face_gpt2_is_initialised_and_keeps_its_tied_head(sharded, request):
    """GPT-2's Conv1D draws its weights in ``__init__`` (no ``reset_parameters``), which on meta
    draws nothing, so the random stream differs from a direct build; HF's own init then writes
    every tensor, which the sentinel check confirms, with the same distributions."""
    build = _gpt2()
    if sharded:
        request.getfixturevalue("one_rank_group")
    model = materialized(build, shard_policy=_blocks(build, "GPT2Block") if sharded else None)
    assert model.lm_head.weight is model.transformer.wte.weight
    reference = dict(_all_tensors(built_directly(build)))
    for name, tensor in _all_tensors(model):
        tensor, expected = full(tensor), reference[name]
        assert tensor.shape == expected.shape and torch.isfinite(tensor).all(), name
        if expected.std() == 0:  # layer norms and biases: exactly as built
            assert torch.equal(tensor, expected), name
        else:
            assert math.isclose(tensor.std().item(), expected.std().item(), rel_tol=0.3), name


# --- two ranks ---------------------------------------------------------------------------------

def _two_rank_materialize() -> list[dict]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = materialized(TinyLM, shard_policy={Block})
    tensors = {name: full(t).detach() for name, t in _all_tensors(model)}
    mine = {"tensors": tensors, "tied": model.head.weight is model.embed.weight,
            "local_rows": model.embed.weight.to_local().shape[0],
            "warned": any("sharded over a CPU device mesh" in str(w.message) for w in caught)}
    gathered = [None] * lt.world_size()
    torch.distributed.all_gather_object(gathered, mine)  # rank 0 returns both ranks' results
    return gathered


@pytest.mark.timeout(180)
def test_meta_init_shard_materialize_on_two_ranks():
    """On 2 ranks each initialises its own shard. torch's DTensor random ops on a CPU mesh draw
    from each rank's own generator (equal seeds: equal shards), which materialize warns about,
    so random weights are checked for being written, not bitwise; everything deterministic
    (norms, RoPE frequencies, zero biases) equals a direct build."""
    ranks = lt.launch(_two_rank_materialize, devices=2, start_method="fork")  # no re-imports
    reference = dict(_all_tensors(built_directly(TinyLM)))
    for result in ranks:
        assert result["tied"] and result["local_rows"] == 16 and result["warned"]
        for name, expected in reference.items():
            tensor = result["tensors"][name]
            assert tensor.shape == expected.shape and torch.isfinite(tensor).all(), name
            if name.endswith(("norm.weight", "inv_freq", "bias")):
                assert torch.equal(tensor, expected), name
