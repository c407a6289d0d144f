"""guard_nonfinite: skip or stop on inf/NaN gradients, against a hand-written PyTorch loop.

The data meets a NaN loss at micro-batch 2 (NaN inputs) and an inf gradient with a finite loss
at micro-batch 5 (``sqrt`` of a zero that depends on a weight: value 0, derivative +inf).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ltransform as lt

N = 2  # micro-steps per update
NAN_AT, INF_AT = 2, 5


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def make_data(n: int = 8, nan_at: int | None = NAN_AT, inf_at: int | None = INF_AT, seed: int = 1,
              size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    gen = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        x, y = torch.randn(size, 4, generator=gen), torch.randn(size, 1, generator=gen)
        if i == nan_at:
            x[0, 0] = float("nan")
        data.append((x, y, i == inf_at))
    return data


def loss_fn(model, batch):
    x, y, inf_grad = batch
    loss = F.mse_loss(model(x), y)
    if inf_grad:
        w = model[0].weight
        loss = loss + torch.sqrt(w - w.detach()).sum()  # adds 0; its gradient is +inf
    return loss


def build(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 / (1 + k))
    return optimizer, scheduler


def reference(data, policy: str):
    """The plain loop: accumulate N, skip (or stop before) an update with non-finite gradients,
    clip, step the optimizer and the scheduler only on an applied update."""
    model = make_model()
    optimizer, scheduler = build(model)
    applied = skipped = 0
    for i, batch in enumerate(data):
        (loss_fn(model, batch) / N).backward()
        if (i + 1) % N:
            continue
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
        if finite:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            applied += 1
        optimizer.zero_grad(set_to_none=True)
        if not finite:
            if policy == "stop":
                break
            skipped += 1
    return model, optimizer, applied, skipped


ORDERS = {
    "guard first": lambda policy: lt.pipe(lt.train_step(loss_fn), lt.guard_nonfinite(policy), lt.accumulate(N),
                                          lt.clip_gradients(max_norm=1.0)),
    "guard last": lambda policy: lt.pipe(lt.train_step(loss_fn), lt.clip_gradients(max_norm=1.0),
                                         lt.accumulate(N), lt.guard_nonfinite(policy)),
}


def new_state():
    model = make_model()
    optimizer, scheduler = build(model)
    return lt.State(model=model, optimizer=optimizer, scheduler=scheduler)


def assert_same(model, ref_model, optimizer, ref_optimizer):
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    ours, theirs = optimizer.state_dict(), ref_optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]  # the scheduler's lr, stepped alike
    for k, s in ours["state"].items():
        for name, value in s.items():
            assert torch.equal(value, theirs["state"][k][name]), name


@pytest.mark.timeout(120)
def test_skip_equals_the_plain_loop_bitwise_in_either_order():
    data = make_data()
    ref_model, ref_opt, applied, skipped = reference(data, "skip")
    assert (applied, skipped) == (2, 2)
    results = {}
    for name, make in ORDERS.items():
        state = lt.run(make("skip"), new_state(), data, max_epochs=1, progress=False)
        assert (state.step, state.micro_step) == (applied, len(data))  # a skipped update is no step
        assert state.extra["nonfinite"].skipped == 2
        assert_same(state.model, ref_model, state.optimizer, ref_opt)
        results[name] = [p.detach().clone() for p in state.model.parameters()]
    for p, q in zip(*results.values()):
        assert torch.equal(p, q)


@pytest.mark.timeout(120)
def test_skipped_updates_are_reported_as_a_tensor_and_checkpointed(tmp_path):
    step = ORDERS["guard first"]("skip")
    state, seen = new_state(), []
    for batch in make_data():
        state, metrics = step(state, batch)
        if "skipped_updates" in metrics:
            assert type(metrics["skipped_updates"]) is torch.Tensor
            seen.append(int(metrics["skipped_updates"]))
    assert seen == [0, 1, 2, 2]  # one per update: applied, NaN loss, inf gradient, applied
    lt.save(tmp_path / "ckpt.pt", state)
    fresh = lt.prepare(step, new_state())
    assert fresh.extra["nonfinite"].skipped == 0
    loaded = lt.load(tmp_path / "ckpt.pt", fresh)
    assert loaded.extra["nonfinite"].skipped == 2 and loaded.step == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("order", list(ORDERS))
def test_stop_raises_naming_step_micro_batch_and_rank_with_the_parameters_before_it(order):
    data = make_data()
    ref_model, ref_opt, applied, _ = reference(data, "stop")
    state = lt.prepare(ORDERS[order]("stop"), new_state())
    with pytest.raises(lt.NonFiniteError, match=r"at step 1 \(micro-steps 2-3\); first non-finite loss: "
                                                r"rank 0, micro-step 2 \(loss=nan\)") as caught:
        lt.run(ORDERS[order]("stop"), state, data, max_epochs=1, progress=False)
    error = caught.value
    assert (error.step, error.micro_steps, [o[:2] for o in error.origins]) == (1, range(2, 4), [(0, 2)])
    assert math.isnan(error.origins[0][2])
    assert "policy='skip' would skip such updates" in str(caught.value)
    assert applied == 1
    assert_same(state.model, ref_model, state.optimizer, ref_opt)
    assert all(p.grad is None for p in state.model.parameters())  # zeroed, as after a skip


@pytest.mark.timeout(120)
def test_stop_on_an_inf_gradient_with_finite_losses_names_the_micro_batches():
    data = make_data(nan_at=None)
    step = ORDERS["guard last"]("stop")
    state = new_state()
    with pytest.raises(lt.NonFiniteError, match=r"at step 2 \(micro-steps 4-5\); every loss was finite, so a "
                                                r"gradient became inf/NaN in backward \(rank 0\)"):
        for batch in data:
            state, _ = step(state, batch)
    ref_model, ref_opt, _, _ = reference(data, "stop")
    assert_same(state.model, ref_model, state.optimizer, ref_opt)


@pytest.mark.timeout(120)
def test_limits_of_skipped_updates_stop_the_run():
    step = lt.pipe(lt.train_step(loss_fn), lt.guard_nonfinite("skip", max_consecutive=1))
    data = make_data(n=4, nan_at=1, inf_at=2)
    with pytest.raises(lt.NonFiniteError, match=r"at step 1 \(micro-step 2\).*2 updates skipped in a row, "
                                                r"over the limit of 1"):
        lt.run(step, new_state(), data, max_epochs=1, progress=False)
    step = lt.pipe(lt.train_step(loss_fn), lt.guard_nonfinite("skip", max_skips=1))
    data = make_data(n=4, nan_at=0, inf_at=2)
    with pytest.raises(lt.NonFiniteError, match="2 updates skipped in all, over the limit of 1"):
        lt.run(step, new_state(), data, max_epochs=1, progress=False)
    step = lt.pipe(lt.train_step(loss_fn), lt.guard_nonfinite("skip", max_consecutive=1))
    state = lt.run(step, new_state(), make_data(n=4, nan_at=0, inf_at=2), max_epochs=1, progress=False)
    assert (state.step, state.extra["nonfinite"].skipped, state.extra["nonfinite"].consecutive) == (2, 2, 0)


def test_bad_options_are_named_with_the_fix():
    with pytest.raises(ValueError, match=r"unknown policy 'ignore'; expected one of: 'skip', 'stop'"):
        lt.guard_nonfinite("ignore")
    with pytest.raises(ValueError, match="max_consecutive must be a positive int or None, got 0"):
        lt.guard_nonfinite("skip", max_consecutive=0)
    with pytest.raises(ValueError, match="max_skips applies to policy='skip' only"):
        lt.guard_nonfinite("stop", max_skips=3)
    for pipeline in ((lt.guard_nonfinite(), lt.with_precision("16-mixed")),
                     (lt.with_precision("16-mixed"), lt.guard_nonfinite())):
        with pytest.raises(ValueError, match=r"cannot be combined with .*the grad scaler of '16-mixed' "
                                             r"already skips updates with inf/NaN gradients"):
            lt.pipe(lt.train_step(loss_fn), *pipeline)
    with pytest.raises(ValueError, match="a step takes one guard transform"):
        lt.pipe(lt.train_step(loss_fn), lt.guard_nonfinite(), lt.guard_nonfinite("stop"))
    lt.pipe(lt.train_step(loss_fn), lt.guard_nonfinite(), lt.with_precision("bf16-mixed"))  # no scaler: fine


def test_explain_shows_the_guard_where_it_runs():
    out = io.StringIO()
    lt.explain(ORDERS["guard last"]("stop"), file=out)
    text = out.getvalue()
    assert "[LOSS_CHECK] guard: keep the loss (detached)" in text
    boundary = text.split("non-boundary")[0]
    assert boundary.index("[FINITE_CHECK] guard: if a gradient is inf/NaN, raise NonFiniteError") < boundary.index(
        "[CLIP]") < boundary.index("optimizer.step()")
    assert "guard_nonfinite('stop')" in text


# --- 2 ranks: only rank 1's batches are bad ------------------------------------------------------

def _rank_data(rank, nan_loss=True):
    """Rank 1: a NaN loss at micro-batch 2 and, at micro-batch 4, an inf input that saturates
    ``tanh`` (a finite loss) but makes its weight gradients NaN (0 * inf); rank 0: all finite.
    (The ``sqrt`` trick of ``loss_fn`` reads a weight outside forward: not for FSDP.)"""
    data = make_data(n=6, nan_at=2 if rank == 1 and nan_loss else None, inf_at=None, seed=10 + rank)
    if rank == 1:
        data[4][0][0, 0] = float("inf")
    return data


def _two_rank_worker():
    out = {}
    for strategy in ("ddp", "fsdp"):
        for policy, nan_loss in (("skip", True), ("stop", True), ("stop", False)):
            model = make_model()
            if strategy == "fsdp":
                model = lt.shard(model, policy={torch.nn.Linear})
            optimizer, scheduler = build(model)
            state = lt.State(model=model, optimizer=optimizer, scheduler=scheduler)
            step = lt.pipe(lt.train_step(loss_fn), lt.guard_nonfinite(policy), lt.accumulate(N),
                           lt.distribute(strategy))
            error = None
            try:
                state = lt.run(step, state, _rank_data(lt.rank(), nan_loss), max_epochs=1, progress=False)
            except lt.NonFiniteError as caught:
                error = (str(caught), caught.step, caught.origins)
            params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
                      for p in model.parameters()]
            mine = {"params": params, "step": state.step, "error": error,
                    "skipped": state.extra["nonfinite"].skipped if "nonfinite" in state.extra else None}
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
            out[strategy, policy, nan_loss] = everyone
    return out


def _reference_two_ranks(policy):
    """One process on both ranks' batches (2B): the same updates, skipped alike."""
    data = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), False) for a, b in zip(_rank_data(0), _rank_data(1))]
    model = make_model()
    optimizer, scheduler = build(model)
    for i, batch in enumerate(data):
        (loss_fn(model, batch) / N).backward()
        if (i + 1) % N == 0:
            finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
            if finite:
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if not finite and policy == "stop":
                break
    return model


@pytest.fixture(scope="module")
def two_ranks():
    return lt.launch(_two_rank_worker, devices=2)


@pytest.mark.timeout(300)
@pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_skip_the_same_updates_and_stay_equal(two_ranks, strategy):
    ranks = two_ranks[strategy, "skip", True]
    assert [r["error"] for r in ranks] == [None, None]
    assert [r["step"] for r in ranks] == [1, 1] and [r["skipped"] for r in ranks] == [2, 2]
    for p, q, ref in zip(ranks[0]["params"], ranks[1]["params"], _reference_two_ranks("skip").parameters()):
        assert torch.equal(p, q)  # bitwise equal across ranks
        torch.testing.assert_close(p, ref)  # and N ranks with B == 1 rank with N·B


@pytest.mark.timeout(300)
@pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_stop_together_naming_the_rank_of_the_bad_batch(two_ranks, strategy):
    ranks = two_ranks[strategy, "stop", True]
    for r in ranks:
        message, step, origins = r["error"]
        assert step == 1 and [o[:2] for o in origins] == [(1, 2)]
        assert "at step 1 (micro-steps 2-3); first non-finite loss: rank 1, micro-step 2 (loss=nan)" in message
    for p, q, ref in zip(ranks[0]["params"], ranks[1]["params"], _reference_two_ranks("stop").parameters()):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, ref)


@pytest.mark.timeout(60)
def test_counters_set_under_a_bound_step_are_not_guessed():
    step = lt.pipe(lt.train_step(loss_fn), lt.guard_nonfinite("stop"))
    state = lt.prepare(step, new_state())
    state = lt.State(model=state.model, optimizer=state.optimizer, scheduler=state.scheduler, step=10,
                     micro_step=20, extra=state.extra)  # as a load of a checkpoint without the guard's counts
    with pytest.raises(lt.NonFiniteError, match=r"at a step whose number the guard lost track of \(micro-step 20\)"):
        step(state, make_data(n=1, nan_at=0)[0])


@pytest.mark.timeout(300)
@pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_stop_together_on_a_gradient_with_finite_losses(two_ranks, strategy):
    for r in two_ranks[strategy, "stop", False]:
        message, step, origins = r["error"]
        assert step == 2 and origins == ()
        assert ("at step 2 (micro-steps 4-5); every loss was finite, so a gradient became inf/NaN in backward "
                "(on a rank the gradients reduced across ranks cannot tell)") in message
