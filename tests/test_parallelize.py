"""lt.parallelize (tensor parallel) and lt.plans: 2 gloo ranks train as one process with the same batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ltransform as lt
from ltransform.examples.gpt import GPT, GPTConfig
from ltransform.examples.gpt import loss_fn as gpt_loss

TINY = GPTConfig(vocab=32, block=8, n_layer=2, n_head=2, n_embd=16)


def gpt(cfg: GPTConfig = TINY) -> GPT:
    torch.manual_seed(0)
    return GPT(cfg)


def llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    options = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=16, use_cache=False) | overrides
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**options))


def llama_loss(model, batch):
    return model(batch, labels=batch).loss


def tokens(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    windows = [torch.randint(0, TINY.vocab, (4, TINY.block + 1), generator=gen) for _ in range(n)]
    return [(w[:, :-1], w[:, 1:]) for w in windows]


def whole(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((whole(p) - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def adam(model):
    # (eps: the demo GPT's key bias has a gradient of exactly 0 in exact arithmetic, float noise of ~1e-9 in
    # practice, different with the sum split over ranks; Adam's default eps=1e-8 would blow that noise up to
    # updates of ~lr)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-5)


def train(model, batches, loss_fn, *transforms, precision="32-true", optimizer=adam):
    """Direct step calls; the model, and the grad norms each optimizer step reported."""
    optimizer = optimizer(model)
    step = lt.pipe(lt.train_step(loss_fn), lt.with_precision(precision), *transforms)
    state, norms = lt.State(model=model, optimizer=optimizer), []
    for batch in batches:
        state, metrics = step(state, batch)
        if "grad_norm" in metrics:
            norms.append(float(metrics["grad_norm"]))
    return model, norms


def _compare(make, plan, batches, loss_fn, *transforms) -> dict:
    """Tensor parallel against one process (the same batches), on this rank."""
    reference, ref_norms = train(make(), batches, loss_fn, *transforms)
    parallel, norms = train(lt.parallelize(make(), plan=plan), batches, loss_fn, *transforms, lt.distribute("auto"))
    split = sum(1 for p in parallel.parameters() if hasattr(p, "device_mesh"))
    return dict(diff=max_difference(parallel, reference), norms=norms, ref_norms=ref_norms, split=split)


def _errors() -> dict:
    out = {}
    for name, call in {
        "heads": lambda: lt.parallelize(gpt(GPTConfig(vocab=32, block=8, n_layer=1, n_head=1, n_embd=16)),
                                        plan=lt.plans.gpt),
        "kv_heads": lambda: lt.parallelize(llama(num_key_value_heads=1), plan=lt.plans.llama),
        "features": lambda: lt.parallelize(torch.nn.Sequential(torch.nn.Linear(4, 3)), plan={"0": "colwise"}),
        "mesh": lambda: lt.parallelize(gpt(), plan=lt.plans.gpt, mesh=3),
        "ddp": lambda: train(lt.parallelize(gpt(), plan=lt.plans.gpt), tokens(1), gpt_loss, lt.distribute("ddp")),
        "unsharded_2d": lambda: train(lt.parallelize(gpt(), plan=lt.plans.gpt, mesh=1), tokens(1), gpt_loss,
                                      lt.distribute("auto")),
    }.items():
        try:
            call()
            out[name] = "no error"
        except (ValueError, RuntimeError) as error:
            out[name] = str(error)
    return out


def _run_keeps_the_whole_loader() -> dict:
    """lt.run on a tensor-parallel model: the DataLoader is not split across the ranks (dp size 1)."""
    x, y = (torch.cat(t) for t in zip(*tokens(4)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    model = lt.parallelize(gpt(), plan=lt.plans.gpt)
    state = lt.State(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-5))
    step = lt.pipe(lt.train_step(gpt_loss), lt.with_precision("32-true"), lt.distribute("auto"))
    state = lt.run(step, state, loader, progress=False)
    reference, _ = train(gpt(), tokens(4), gpt_loss)
    return dict(steps=state.step, diff=max_difference(model, reference))


def _hybrid() -> dict:
    """A 2-D ("dp", "tp") mesh, tensor parallel on "tp" and lt.shard on "dp" (here 2 x 1: the plumbing of the
    composition on 2 ranks): lt.run splits a DataLoader by the dp size, and it trains as one process with the
    whole batch."""
    from torch.distributed.device_mesh import init_device_mesh

    from ltransform.examples.gpt import Block

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
    model = lt.pipe(gpt(), lt.parallelize(plan=lt.plans.gpt, mesh=mesh), lt.shard(policy={Block}, mesh=mesh["dp"]))
    x, y = (torch.cat(t) for t in zip(*tokens(4)))  # 16 windows
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    state = lt.State(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-5))
    step = lt.pipe(lt.train_step(gpt_loss), lt.clip_gradients(max_norm=0.5), lt.distribute("auto"))
    state = lt.run(step, state, loader, progress=False)  # each rank: every other window, 2 batches of 4
    reference, _ = train(gpt(), [(x[:8], y[:8]), (x[8:], y[8:])], gpt_loss, lt.clip_gradients(max_norm=0.5))
    return dict(steps=state.step, diff=max_difference(model, reference))


def _scenarios() -> dict:
    torch.set_num_threads(1)
    data = tokens(3)
    ids = [x for x, _ in tokens(4, seed=2)]
    clip = (lt.accumulate(2), lt.clip_gradients(max_norm=0.5))
    return dict(
        gpt=_compare(gpt, lt.plans.gpt, data, gpt_loss),
        gpt_sequence=_compare(gpt, lambda m: lt.plans.gpt(m, sequence=True), data, gpt_loss),
        gpt_clip=_compare(gpt, lt.plans.gpt, tokens(4), gpt_loss, *clip),
        llama=_compare(llama, lt.plans.llama, ids[:3], llama_loss),
        llama_clip=_compare(llama, lt.plans.llama, ids, llama_loss, *clip),
        llama_sequence=_compare(llama, lambda m: lt.plans.llama(m, sequence=True), ids[:3], llama_loss),
        run=_run_keeps_the_whole_loader(),
        hybrid=_hybrid(),
        errors=_errors(),
    )


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return lt.launch(_scenarios, devices=2)  # rank 0's results


@pytest.mark.parametrize("case", ["gpt", "gpt_sequence", "gpt_clip", "llama", "llama_clip", "llama_sequence"])
def test_tensor_parallel_on_2_ranks_trains_as_one_process(two_ranks, case):
    result = two_ranks[case]
    assert result["split"] > 0  # the plan's layers really are DTensors
    assert result["diff"] < 1e-5, f"{case}: parameters differ by {result['diff']}"
    if case.endswith("clip"):
        assert len(result["norms"]) == 2  # two optimizer steps of two micro-steps each
        torch.testing.assert_close(torch.tensor(result["norms"]), torch.tensor(result["ref_norms"]),
                                   rtol=1e-5, atol=1e-6)
        assert min(result["norms"]) > 0.5  # the clipping really clipped


def test_lt_run_gives_every_tensor_parallel_rank_the_whole_loader(two_ranks):
    assert two_ranks["run"]["steps"] == 4  # not 2: each rank saw every batch
    assert two_ranks["run"]["diff"] < 1e-5


def test_a_2d_mesh_shards_on_dp_and_splits_the_data_by_the_dp_size(two_ranks):
    assert two_ranks["hybrid"]["steps"] == 2  # half of the 4 batches of 4: the data split over dp = 2
    assert two_ranks["hybrid"]["diff"] < 1e-5


def test_errors_on_2_ranks_name_the_fix(two_ranks):
    errors = two_ranks["errors"]
    assert "'blocks.0.attn.qkv' holds 1 attention heads (heads), which cannot be split evenly over 2" in errors["heads"]
    assert "holds 1 attention heads (num_key_value_heads)" in errors["kv_heads"]
    assert "'0' has 3 output features, which ColwiseParallel cannot split evenly over 2 ranks" in errors["features"]
    assert "a tensor-parallel size of 3 does not divide the world size 2" in errors["mesh"]
    assert "distribute('ddp'): the model is tensor parallel (lt.parallelize); use distribute('auto')" in errors["ddp"]
    assert ("tensor parallel over 1 of 2 ranks, and nothing shares gradients across its 2 data-parallel groups; "
            "shard it over the mesh's 'dp' dimension after lt.parallelize: lt.shard(model, policy=..., "
            "mesh=mesh['dp'])") in errors["unsharded_2d"]


def test_one_plain_process_returns_the_model_unchanged():
    model = gpt()
    before = {n: p for n, p in model.named_parameters()}
    assert lt.parallelize(model, plan=lt.plans.gpt, mesh=2) is model
    assert {n: p for n, p in model.named_parameters()} == before
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    assert "parallelize" not in lt.models.order.applied(model)


def test_the_partial_form_pipes():
    transform = lt.parallelize(plan=lt.plans.gpt)
    assert repr(transform) == "lt.parallelize(plan=gpt)"
    assert repr(lt.parallelize(plan={"blocks.*.mlp.0": "colwise"})) == "lt.parallelize(plan={1 entries})"
    model = gpt()
    assert lt.pipe(model, transform, lt.checkpoint_activations(policy={torch.nn.LayerNorm})) is model


def test_xla_is_refused_not_ignored(monkeypatch):
    from ltransform.distributed import env

    monkeypatch.setattr(env, "accelerator", lambda: "xla")
    with pytest.raises(RuntimeError, match="tensor parallel on XLA is not supported yet .* on XLA use lt.shard"):
        lt.parallelize(gpt(), plan=lt.plans.gpt)


def test_ready_plans_name_the_layers():
    plan = lt.plans.gpt(gpt())
    assert sorted(plan) == sorted(f"blocks.{i}.{name}" for i in range(2)
                                  for name in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2"))
    assert {"blocks.0.ln1", "blocks.0.ln2", "blocks.0", "blocks.0.attn"} <= set(lt.plans.gpt(gpt(), sequence=True))
    assert "model.layers.1.self_attn.k_proj" in lt.plans.llama(llama())
    assert "model.layers.0.mlp.down_proj" in lt.plans.llama(llama())
    with pytest.raises(ValueError, match="lt.plans.llama: GPT has no decoder layers .* write a plan for it"):
        lt.plans.llama(gpt())
    with pytest.raises(ValueError, match="lt.plans.gpt: Sequential has no blocks with attn.qkv"):
        lt.plans.gpt(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_bad_plans_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown style 'columnwise' for 'blocks.\*.attn.qkv'; expected one of: "
                                         r"'colwise', 'rowwise', 'sequence', or a ParallelStyle object"):
        lt.parallelize(gpt(), plan={"blocks.*.attn.qkv": "columnwise"})
    with pytest.raises(ValueError, match=r"the plan's 'blocks.\*.attention.qkv' matches no module of GPT"):
        lt.parallelize(gpt(), plan={"blocks.*.attention.qkv": "colwise"})
    with pytest.raises(TypeError, match=r"'colwise' splits a Linear or Embedding layer, but 'blocks.0.ln1' is a "
                                        r"LayerNorm; use 'sequence' for norms"):
        lt.parallelize(gpt(), plan={"blocks.*.ln1": "colwise"})
    with pytest.raises(ValueError, match=r"module 'blocks.0.attn.qkv' is matched by both 'blocks.\*.attn.qkv' and "
                                         r"'blocks.0.\*'"):
        lt.parallelize(gpt(), plan={"blocks.*.attn.qkv": "colwise", "blocks.0.*": "sequence"})
    with pytest.raises(ValueError, match="parallelize: give a plan"):
        lt.parallelize(gpt())
    with pytest.raises(ValueError, match="the plan is empty"):
        lt.parallelize(gpt(), plan={})
    with pytest.raises(TypeError, match="plan must be a dict of module names or patterns to styles"):
        lt.parallelize(gpt(), plan=["blocks.0.attn.qkv"])
    with pytest.raises(TypeError, match="a plan function must return a dict, got list"):
        lt.parallelize(gpt(), plan=lambda m: [])
    with pytest.raises(TypeError, match="mesh must be None, a tensor-parallel size"):
        lt.parallelize(gpt(), plan=lt.plans.gpt, mesh=(1, 2))
    with pytest.raises(ValueError, match="a tensor-parallel size must be positive, got 0"):
        lt.parallelize(plan=lt.plans.gpt, mesh=0)
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got function"):
        lt.parallelize(gpt_loss, plan={"x": "colwise"})


REORDER = (r"; reorder: lt.pipe\(model, lt.parallelize\(plan=...\), lt.checkpoint_activations\(policy=...\), "
           r"lt.to_precision\(name\), lt.compile\(policy=...\), lt.shard\(policy=...\)\)")


def test_tensor_parallel_comes_first():
    with pytest.raises(RuntimeError, match="parallelize must be applied before checkpoint_activations" + REORDER):
        lt.parallelize(lt.checkpoint_activations(gpt(), policy={torch.nn.LayerNorm}), plan=lt.plans.gpt)
    with pytest.raises(RuntimeError, match="parallelize must be applied before torch.compile"):
        lt.parallelize(lt.compile(gpt(), backend="eager"), plan=lt.plans.gpt)
    with pytest.raises(RuntimeError, match="parallelize must be applied before torch.compile"):
        lt.parallelize(torch.compile(gpt(), backend="eager"), plan=lt.plans.gpt)


def test_order_on_a_real_group(one_rank_group):
    with pytest.raises(RuntimeError, match="parallelize must be applied before shard" + REORDER):
        lt.parallelize(lt.shard(gpt()), plan=lt.plans.gpt)
    model = lt.parallelize(gpt(), plan=lt.plans.gpt)
    assert "parallelize" in lt.models.order.applied(model)
    with pytest.raises(RuntimeError, match="the model is already tensor parallel; apply lt.parallelize once"):
        lt.parallelize(model, plan=lt.plans.gpt)
    model = lt.pipe(model, lt.checkpoint_activations(policy={torch.nn.LayerNorm}), lt.compile(backend="eager"))
    x, y = tokens(1)[0]
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()  # one rank: a 1-rank mesh, the same math
