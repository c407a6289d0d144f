"""lt.compile: regional torch.compile as a model transform, in the one checked order."""

from __future__ import annotations

import contextlib

import pytest
import torch

import ltransform as lt
from ltransform.distributed import wrappers
from ltransform.examples.gpt import GPT, Block, GPTConfig, loss_fn

TINY = GPTConfig(vocab=64, block=16, n_layer=3, n_head=2, n_embd=32)


class Graphs:
    """A torch.compile backend that counts the graphs dynamo hands it, then runs them with
    ``inner`` (AOTAutograd's eager backend: the same ATen ops as eager, traced through autograd)."""

    def __init__(self, inner: str = "aot_eager") -> None:
        self.count = 0
        self.inner = inner

    def __call__(self, gm, example_inputs):
        from torch._dynamo import lookup_backend  # test-only: the registered backend by name

        self.count += 1
        return lookup_backend(self.inner)(gm, example_inputs)


@contextlib.contextmanager
def no_recompiles():
    """Any recompilation inside raises (torch.compiler's public stance)."""
    torch.compiler.set_stance("fail_on_recompile")
    try:
        yield
    finally:
        torch.compiler.set_stance("default")


def gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY)


def tokens(batches: int, batch: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        x = torch.randint(0, TINY.vocab, (batch, TINY.block + 1), generator=gen)
        out.append((x[:, :-1], x[:, 1:]))
    return out


def train(model, data, *transforms, eval_data=None):
    """lt.run over ``data``; returns the loss of each step."""
    losses: list[float] = []
    state = lt.State(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    step = lt.pipe(lt.train_step(loss_fn), *transforms)
    extra = {} if eval_data is None else dict(eval_step=lt.eval_step(loss_fn), eval_data=eval_data, eval_every=2)
    lt.run(step, state, data, progress=False, log_every=1,
           loggers=[lambda metrics, step: "loss" in metrics and losses.append(float(metrics["loss"]))], **extra)
    return losses


def test_regional_compile_picks_the_repeated_blocks_and_keeps_names_and_type():
    model = gpt()
    keys = list(model.state_dict())
    compiled = lt.compile(model, backend=Graphs())
    assert compiled is model and type(model) is GPT
    assert list(model.state_dict()) == keys  # no _orig_mod. prefix: checkpoints are interchangeable
    chosen = [name for name, m in model.named_modules() if wrappers.is_compiled_in_place(m)]
    assert chosen == ["blocks.0", "blocks.1", "blocks.2"]


def test_torchs_own_modules_compile_too_and_a_deep_copy_runs_its_own_weights():
    """module.compile() compiles torch's Module._call_impl, which dynamo skips for torch.nn's own
    classes: lt.compile compiles the class's forward instead, so a Sequential of Linears (and a
    Sequential root with regional=False) really runs compiled."""
    import copy

    graphs = Graphs()
    model = lt.compile(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)), backend=graphs)
    model(torch.ones(1, 4))
    assert graphs.count >= 1
    whole = Graphs()
    root = lt.compile(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()), regional=False, backend=whole)
    root(torch.ones(1, 4))
    assert whole.count == 1
    twin = copy.deepcopy(root)  # its compiled forward is bound to the copy, not to the original
    with torch.no_grad():
        twin[0].weight.zero_()
        twin[0].bias.zero_()
    assert torch.equal(twin(torch.ones(1, 4)), torch.zeros(1, 4))
    assert not torch.equal(root(torch.ones(1, 4)), torch.zeros(1, 4))


def test_a_policy_picks_blocks_and_whole_model_compile_is_in_place():
    model = lt.compile(gpt(), policy={torch.nn.LayerNorm}, backend="eager")
    assert sorted(n for n, m in model.named_modules() if wrappers.is_compiled_in_place(m)) == [
        "blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "blocks.2.ln1", "blocks.2.ln2", "ln"]
    whole = lt.compile(gpt(), regional=False, backend="eager")
    assert [n for n, m in whole.named_modules() if wrappers.is_compiled_in_place(m)] == [""]
    piped = lt.pipe(gpt(), lt.compile(policy={Block}, backend="eager"))
    assert [n for n, m in piped.named_modules() if wrappers.is_compiled_in_place(m)] == [
        "blocks.0", "blocks.1", "blocks.2"]
    assert repr(lt.compile(policy={Block}, backend="eager")).startswith("lt.compile(policy={")


def test_compiled_training_equals_eager_and_compiles_once_per_graph():
    """aot_eager runs the same ATen ops through AOTAutograd: equal to eager bitwise-close; the
    backend sees one forward graph per distinct input (the first block's input needs no grad),
    and after warm-up no step recompiles, evaluation (no_grad) included."""
    data = tokens(8)
    reference = train(gpt(), data[:2]) + train(gpt(), data)[2:]  # the same runs, eager
    graphs = Graphs()
    model = lt.compile(gpt(), policy={Block}, backend=graphs)
    warm = train(model, data[:2], eval_data=tokens(1, seed=3))
    warm_count = graphs.count
    assert 1 <= warm_count <= 4
    model = lt.compile(gpt(), policy={Block}, backend=graphs)  # a new model of the same shapes: same graphs
    with no_recompiles():
        losses = train(model, data, eval_data=tokens(1, seed=3))
    assert graphs.count == warm_count  # dynamo's cache served the second model: no compile at all
    torch.testing.assert_close(torch.tensor(warm), torch.tensor(reference[:2]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(train(gpt(), data)), rtol=1e-5, atol=1e-6)


def test_compile_composes_with_checkpointing_precision_and_accumulation_without_recompiles():
    data = tokens(8)
    transforms = (lt.with_precision("bf16-mixed"), lt.accumulate(2), lt.clip_gradients(max_norm=1.0))
    eager = train(lt.checkpoint_activations(gpt(), policy={Block}), data, *transforms)
    graphs = Graphs()
    model = lt.pipe(gpt(), lt.checkpoint_activations(policy={Block}), lt.compile(policy={Block}, backend=graphs))
    train(model, data[:4], *transforms)  # warm-up: boundary and non-boundary micro-steps
    warm_count = graphs.count
    assert warm_count >= 1
    model = lt.pipe(gpt(), lt.checkpoint_activations(policy={Block}), lt.compile(policy={Block}, backend=graphs))
    with no_recompiles():
        losses = train(model, data, *transforms)
    assert graphs.count == warm_count
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager), rtol=1e-3, atol=1e-3)


def test_compiled_blocks_under_ddp_equal_eager(one_rank_group):
    """Composable DDP (``replicate`` on the root) over compiled blocks: its hooks stay eager."""
    data = tokens(4)
    transforms = (lt.with_precision("bf16-mixed"), lt.accumulate(2), lt.distribute("ddp"))
    graphs = Graphs()
    losses = train(lt.compile(gpt(), backend=graphs), data, *transforms)
    assert graphs.count >= 1
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(train(gpt(), data, *transforms)),
                               rtol=1e-3, atol=1e-3)


def test_inductor_on_cpu_matches_eager_within_float_tolerance():
    """The real backend (inductor's C++ code on CPU): fused kernels round differently, so the
    losses agree to float32 tolerance, not bitwise; and no recompile after the first steps."""
    data = tokens(6)
    eager = train(gpt(), data)
    model = lt.compile(gpt(), policy={Block})
    losses = train(model, data[:2])
    with no_recompiles():
        losses += train(lt.compile(gpt(), policy={Block}), data)[2:]  # same shapes: served by the cache
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager), rtol=1e-4, atol=1e-5)


def test_order_and_usage_errors_name_the_fix(one_rank_group):
    with pytest.raises(RuntimeError, match=r"torch.compile must be applied before shard; reorder: lt.pipe\(model, "
                                           r"lt.parallelize\(plan=...\), lt.checkpoint_activations\(policy=...\), "
                                           r"lt.to_precision\(name\), "
                                           r"lt.compile\(policy=...\), lt.shard\(policy=...\)\)"):
        lt.compile(lt.shard(gpt(), policy={Block}), policy={Block})
    compiled = lt.compile(gpt(), backend="eager")
    with pytest.raises(RuntimeError, match="checkpoint_activations must be applied before torch.compile"):
        lt.checkpoint_activations(compiled, policy={Block})
    with pytest.raises(RuntimeError, match="already compiled"):
        lt.compile(compiled)
    with pytest.raises(RuntimeError, match="already compiled"):
        lt.compile(torch.compile(gpt()))
    lt.shard(compiled, policy={Block})  # the right order: compile, then shard


def test_a_hugging_face_llama_compiles_its_decoder_layers_once_without_the_kv_cache():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=10,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=r"use_cache is True: .* set model.config.use_cache = False first"):
        lt.compile(model)
    model.config.use_cache = False
    graphs = Graphs()
    lt.compile(model, backend=graphs)
    assert [n for n, m in model.named_modules() if wrappers.is_compiled_in_place(m)] == [
        f"model.layers.{i}" for i in range(10)]
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    assert 1 <= graphs.count <= 3  # one graph for all ten layers (not one per layer, nor past the recompile limit)
    with no_recompiles():
        model(ids, labels=ids).loss.backward()


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="found no repeated blocks .* give policy=\\{YourBlock\\}, or regional=False"):
        lt.compile(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    with pytest.raises(ValueError, match="policy .* matches no submodule"):
        lt.compile(gpt(), policy={torch.nn.Conv1d})
    with pytest.raises(ValueError, match="with regional=False the whole model is compiled: drop the policy"):
        lt.compile(gpt(), policy={Block}, regional=False)
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got function"):
        lt.compile(loss_fn)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        lt.compile(gpt(), bogus=1)
    with pytest.raises(TypeError, match="regional must be True or False"):
        lt.compile(gpt(), regional="yes")


def _sharded_compiled_run(compiled: bool) -> dict:
    """On each of 2 ranks: checkpointing → compile → shard, trained with bf16-mixed, accumulation,
    clipping and FSDP; a second model of the same shapes then trains with recompiles forbidden."""
    graphs = Graphs()
    transforms = (lt.with_precision("bf16-mixed"), lt.accumulate(2), lt.clip_gradients(max_norm=1.0),
                  lt.distribute("fsdp"))
    data = tokens(8, batch=2, seed=1 + lt.rank())

    def model():
        chain = [lt.checkpoint_activations(policy={Block})]
        chain += [lt.compile(policy={Block}, backend=graphs)] if compiled else []
        return lt.pipe(gpt(), *chain, lt.shard(policy={Block}, precision="bf16-mixed"))

    warm = train(model(), data[:4], *transforms)
    warm_count = graphs.count
    with no_recompiles() if compiled else contextlib.nullcontext():
        losses = train(model(), data, *transforms)
    return dict(warm=warm, losses=losses, warm_count=warm_count, count=graphs.count)


def _eager_and_compiled() -> tuple[dict, dict]:
    return _sharded_compiled_run(False), _sharded_compiled_run(True)


def test_compiled_blocks_under_fsdp_on_2_ranks_equal_eager_without_recompiles():
    eager, compiled = lt.launch(_eager_and_compiled, devices=2)  # rank 0's results
    assert compiled["warm_count"] >= 1 and compiled["count"] == compiled["warm_count"]
    assert eager["count"] == 0
    torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]), rtol=1e-3, atol=1e-3)
