"""Tensor parallel x FSDP on a 2 x 2 ("dp", "tp") mesh of 4 gloo ranks: lt.parallelize(model, plan, mesh=2)
then lt.shard(model, policy=...) (which shards over the mesh's "dp" dimension) trains as one process with
the whole batch; its sharded checkpoints load in one process, on 2 FSDP ranks, and back on 2 x 2."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

import ltransform as lt
from ltransform.examples.gpt import GPTConfig
from ltransform.examples.gpt import loss_fn as gpt_loss
from ltransform.models.order import applied
from test_parallelize import adam, gpt, llama, llama_loss, max_difference, tokens, train, whole

TP = 2  # on 4 ranks: dp = 2 groups of tp = 2


def _block(make):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from ltransform.examples.gpt import Block

    return Block if make is gpt else LlamaDecoderLayer


def two_d(make, precision: str = "32-true", *, model=None, plan=None, checkpoint=False):
    """``make()`` (or ``model``, made by ``make``) tensor parallel on "tp" (by ``plan``, default the ready
    one), its blocks' activations recomputed if ``checkpoint``, sharded (FSDP2) on "dp"; and this rank's dp
    index."""
    plan = plan or (lt.plans.gpt if make is gpt else lt.plans.llama)
    model = lt.parallelize(make() if model is None else model, plan, mesh=TP)
    if checkpoint:
        model = lt.checkpoint_activations(model, policy={_block(make)})
    model = lt.shard(model, policy={_block(make)}, precision=precision if precision.endswith("mixed") else None)
    return model, lt.models.parallelize.tensor_parallel([model]).dp_rank


def half(batch, dp_rank: int):
    """This dp group's half of a global batch (its rows; both halves of one size, so the mean of the two
    halves' mean losses is the whole batch's)."""
    def rows(t):
        n = t.shape[0] // 2
        return t[dp_rank * n:(dp_rank + 1) * n]
    return tuple(rows(t) for t in batch) if isinstance(batch, tuple) else rows(batch)


def sgd(model):
    """For bf16: Adam's first update moves every weight by about +-lr whatever the size of its gradient, so a
    gradient near 0 whose sign bf16's rounding flips moves lr the other way; SGD's difference is lr times the
    gradients' difference, which bounds what it tests."""
    return torch.optim.SGD(model.parameters(), lr=0.1)


def _compare(make, batches, loss_fn, precision="32-true", *transforms, plan=None, checkpoint=False) -> dict:
    """2 x 2 (each dp group its half of every batch) against one process with the whole batches."""
    optimizer = sgd if precision == "bf16-mixed" else adam
    reference, ref_norms = train(make(), batches, loss_fn, *transforms, precision=precision, optimizer=optimizer)
    model, dp_rank = two_d(make, precision, plan=plan, checkpoint=checkpoint)
    _, norms = train(model, [half(b, dp_rank) for b in batches], loss_fn, *transforms, lt.distribute("auto"),
                     precision=precision, optimizer=optimizer)
    kinds = {tuple(p.device_mesh.mesh_dim_names) for p in model.parameters()}
    by_name = {n: (whole(p) - q).abs().max().item()
               for (n, p), q in zip(model.named_parameters(), reference.parameters())}
    checkpointed = "checkpoint_activations" in applied(model)
    return dict(diff=max(by_name.values()), by_name=by_name, norms=norms, ref_norms=ref_norms, meshes=kinds,
                checkpointed=checkpointed)


def _run_splits_by_dp() -> dict:
    """lt.run: the DataLoader split over the 2 dp groups, both tp ranks of a group seeing the same batches."""
    import torch.distributed as dist

    x, y = (torch.cat(t) for t in zip(*tokens(4)))  # 16 windows
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    seen: list[torch.Tensor] = []

    def loss_fn(model, batch):
        seen.append(batch[0].clone())
        return gpt_loss(model, batch)

    model, _ = two_d(gpt)
    state = lt.State(model=model, optimizer=adam(model))
    step = lt.pipe(lt.train_step(loss_fn), lt.clip_gradients(max_norm=0.5), lt.distribute("auto"))
    state = lt.run(step, state, loader, progress=False)  # each dp group: every other window, 2 batches of 4
    reference, _ = train(gpt(), [(x[:8], y[:8]), (x[8:], y[8:])], gpt_loss, lt.clip_gradients(max_norm=0.5))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, torch.stack(seen))
    return dict(steps=state.step, diff=max_difference(model, reference), seen=everyone, windows=x)


def _loss_parallel() -> dict:
    """lt.plans.gpt(model, loss_parallel=True): the head's logits stay split over the vocabulary; lt.distribute
    computes the loss (and its backward) under loss_parallel, in training and in evaluation."""
    model, _ = two_d(gpt, plan=lambda m: lt.plans.gpt(m, loss_parallel=True))
    x, y = tokens(1)[0]
    logits = model(x)
    step = lt.pipe(lt.eval_step(gpt_loss), lt.distribute("auto"))
    _, metrics = step(lt.State(model=model), (x, y))
    reference = gpt_loss(gpt(), (x, y))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        lt.explain(step, lt.State(model=model))
    return dict(placements=str(logits.placements), shape=tuple(logits.shape), eval_loss=metrics["loss"],
                reference=reference.detach(), explain=printed.getvalue())


def snapshot(state) -> dict:
    """Every parameter and optimizer state tensor, whole (collective: every rank calls it), by name."""
    model, optimizer = state.model, state.optimizer
    out = {f"param/{n}": whole(p).detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        for key, value in optimizer.state[p].items():
            out[f"optim/{n}/{key}"] = whole(value).detach().clone()
    return out


def _checkpoint_step():
    return lt.pipe(lt.train_step(gpt_loss), lt.with_precision("32-true"), lt.clip_gradients(max_norm=0.5),
                   lt.distribute("auto"))


def _checkpoint(directory: str) -> dict:
    """2 steps, a sharded checkpoint, 2 more steps; and a fresh 2 x 2 model loading the checkpoint, then the
    same 2 steps."""
    data = tokens(4, seed=3)
    model, dp_rank = two_d(gpt)
    step, state = _checkpoint_step(), lt.State(model=model, optimizer=adam(model))
    for batch in data[:2]:
        state, _ = step(state, half(batch, dp_rank))
    state = lt.checkpoint_sharded(state, directory)  # directory/step-00000002
    saved = snapshot(state)
    for batch in data[2:]:
        state, _ = step(state, half(batch, dp_rank))
    uninterrupted = snapshot(state)

    torch.manual_seed(5)  # a different start: the load must replace all of it
    fresh, _ = two_d(gpt, model=gpt().apply(_scramble))
    resumed = lt.load(lt.latest_checkpoint(directory), lt.State(model=fresh, optimizer=adam(fresh)))
    loaded = snapshot(resumed)
    for batch in data[2:]:
        resumed, _ = step(resumed, half(batch, dp_rank))
    return dict(saved=saved, loaded=loaded, uninterrupted=uninterrupted, resumed=snapshot(resumed),
                steps=(state.step, resumed.step))


def _scramble(module: torch.nn.Module) -> None:
    for p in module.parameters(recurse=False):
        torch.nn.init.normal_(p.data)


def _scenarios(directory: str) -> dict:
    torch.set_num_threads(1)
    data = tokens(3)
    ids = [x for x, _ in tokens(4, seed=2)]
    clip = (lt.accumulate(2), lt.clip_gradients(max_norm=0.5))
    return dict(
        gpt=_compare(gpt, data, gpt_loss),
        gpt_clip=_compare(gpt, tokens(4), gpt_loss, "32-true", *clip),
        gpt_bf16=_compare(gpt, tokens(4), gpt_loss, "bf16-mixed", *clip),
        llama=_compare(llama, ids[:3], llama_loss),
        llama_clip=_compare(llama, ids, llama_loss, "32-true", *clip),
        llama_bf16=_compare(llama, ids, llama_loss, "bf16-mixed", *clip),
        gpt_loss_parallel=_compare(gpt, tokens(4), gpt_loss, "32-true", *clip,
                                   plan=lambda m: lt.plans.gpt(m, loss_parallel=True)),
        llama_loss_parallel=_compare(llama, ids, llama_loss, "32-true", *clip,
                                     plan=lambda m: lt.plans.llama(m, loss_parallel=True)),
        gpt_checkpointed=_compare(gpt, tokens(4), gpt_loss, "32-true", *clip, checkpoint=True),
        llama_sequence_checkpointed=_compare(llama, ids, llama_loss, "32-true", *clip, checkpoint=True,
                                             plan=lambda m: lt.plans.llama(m, sequence=True)),
        loss_parallel=_loss_parallel(),
        run=_run_splits_by_dp(),
        checkpoint=_checkpoint(directory),
    )


def _load_on_fsdp(directory: str) -> dict:
    """The 2 x 2 checkpoint on 2 ranks, FSDP over both (no tensor parallel)."""
    from ltransform.examples.gpt import Block

    torch.set_num_threads(1)
    model = lt.shard(gpt().apply(_scramble), policy={Block})
    state = lt.load(lt.latest_checkpoint(directory), lt.State(model=model, optimizer=adam(model)))
    meshes = {p.device_mesh.ndim for p in model.parameters()}
    return dict(loaded=snapshot(state), meshes=meshes)


@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("parallelize_2d"))


@pytest.fixture(scope="module")
def four_ranks(directory) -> dict:
    return lt.launch(_scenarios, directory, devices=4)  # rank 0's results


CASES = ["gpt", "gpt_clip", "gpt_bf16", "llama", "llama_clip", "llama_bf16", "gpt_loss_parallel",
         "llama_loss_parallel", "gpt_checkpointed", "llama_sequence_checkpointed"]


@pytest.mark.parametrize("case", CASES)
def test_tensor_parallel_times_fsdp_on_2x2_trains_as_one_process(four_ranks, case):
    result = four_ranks[case]
    assert result["checkpointed"] == case.endswith("checkpointed")  # (its blocks recompute their activations)
    assert result["meshes"] == {("dp",), ("dp", "tp")}  # FSDP on dp everywhere; the plan's layers also on tp
    # bf16-mixed: both sides compute in bf16 (autocast in one process; FSDP's bf16 all-gather, then autocast, on
    # 2 x 2; the norms' weights there rounded to bf16 too), but the sums run in other orders and split (over the
    # tp ranks; half batches over dp), each bf16 rounding 2^-8 ~ 4e-3 relative: the gradients differ by ~5e-4
    # (2 SGD steps of lr 0.1 leave ~5e-5 measured; float32 leaves ~1e-6), the clipped norms by ~3e-4 relative
    tolerance = 5e-4 if case.endswith("bf16") else 1e-5
    assert result["diff"] < tolerance, f"{case}: parameters differ by {result['diff']}: {result['by_name']}"
    if case not in ("gpt", "llama"):
        assert len(result["norms"]) == 2  # two optimizer steps of two micro-steps each
        rtol = 2e-3 if case.endswith("bf16") else 1e-5
        torch.testing.assert_close(torch.tensor(result["norms"]), torch.tensor(result["ref_norms"]),
                                   rtol=rtol, atol=1e-6)
        assert min(result["norms"]) > 0.5  # the clipping really clipped


def test_loss_parallel_keeps_the_logits_split_over_the_vocabulary(four_ranks):
    result = four_ranks["loss_parallel"]
    assert result["placements"] == "(Shard(dim=2),)" and result["shape"] == (4, 8, 32)  # global shape, split
    assert type(result["eval_loss"]) is torch.Tensor  # the metric made whole, a plain tensor
    torch.testing.assert_close(result["eval_loss"], result["reference"], rtol=1e-5, atol=1e-6)
    assert "1. [SYNC] distribute: the step (loss and backward) under loss_parallel()" in result["explain"]


def test_lt_run_splits_the_data_over_dp_and_gives_both_tp_ranks_the_same(four_ranks):
    run = four_ranks["run"]
    assert run["steps"] == 2  # 4 batches of 4 windows over 2 dp groups
    assert run["diff"] < 1e-5
    seen, windows = run["seen"], run["windows"]  # by rank: mesh [[0, 1], [2, 3]], rows dp, columns tp
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])
    assert not torch.equal(seen[0], seen[2])
    for dp in (0, 1):  # a DistributedSampler over 2 replicas: every other window
        assert torch.equal(seen[2 * dp].flatten(0, 1), windows[dp::2])


def _assert_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        assert torch.equal(got[key], want[key]), f"{what}: {key} differs by {(got[key] - want[key]).abs().max()}"


def test_a_2x2_checkpoint_resumes_on_2x2_bitwise(four_ranks):
    result = four_ranks["checkpoint"]
    assert result["steps"] == (4, 4)
    assert any(k.endswith("exp_avg_sq") for k in result["saved"])
    _assert_equal(result["loaded"], result["saved"], "loaded on 2 x 2")
    _assert_equal(result["resumed"], result["uninterrupted"], "resumed on 2 x 2")


def test_a_2x2_checkpoint_loads_in_one_plain_process(four_ranks, directory):
    model = gpt().apply(_scramble)
    state = lt.load(lt.latest_checkpoint(directory), lt.State(model=model, optimizer=adam(model)))
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    _assert_equal(snapshot(state), four_ranks["checkpoint"]["saved"], "loaded in one process")
    data = tokens(4, seed=3)
    state, _ = train_from(state, data[2:])  # the same math on the whole batches: within float noise
    diff = max((snapshot(state)[k] - v).abs().max().item() for k, v in four_ranks["checkpoint"]["uninterrupted"].items()
               if k.startswith("param/"))
    assert diff < 1e-5


def train_from(state, batches):
    step = lt.pipe(lt.train_step(gpt_loss), lt.with_precision("32-true"), lt.clip_gradients(max_norm=0.5))
    for batch in batches:
        state, metrics = step(state, batch)
    return state, metrics


def test_a_2x2_checkpoint_loads_on_2_fsdp_ranks(four_ranks, directory):
    result = lt.launch(_load_on_fsdp, directory, devices=2)
    assert result["meshes"] == {1}  # FSDP only
    _assert_equal(result["loaded"], four_ranks["checkpoint"]["saved"], "loaded on 2 FSDP ranks")


def test_shard_refuses_a_model_tensor_parallel_over_every_rank(one_rank_group):
    model = lt.parallelize(gpt(GPTConfig(vocab=32, block=8, n_layer=1, n_head=2, n_embd=16)), plan=lt.plans.gpt)
    with pytest.raises(ValueError, match=r"shard: the model is tensor parallel over all 1 ranks .* give "
                                         r"lt.parallelize mesh=<tensor-parallel size>"):
        lt.shard(model)


def test_loss_parallel_needs_a_linear_output_projection():
    model = gpt()
    assert "head" in lt.plans.gpt(model, loss_parallel=True) and "head" not in lt.plans.gpt(model)
    assert "lm_head" in lt.plans.llama(llama(), loss_parallel=True)
    model.head = torch.nn.Identity()
    with pytest.raises(ValueError, match="lt.plans: loss_parallel=True splits the output projection 'head', but GPT "
                                         "has no Linear 'head'"):
        lt.plans.gpt(model, loss_parallel=True)
