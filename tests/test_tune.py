"""lt.find_lr and lt.find_batch_size on toy problems whose answers are known, on 1 and 2 ranks.

The 2-rank cases run in one ``lt.launch(devices=2)`` job (gloo on the CPU), once per module; rank 0
returns what every rank saw.
"""

from __future__ import annotations

import copy
import random
import time

import attrs
import pytest
import torch
import torch.nn.functional as F

import ltransform as lt
from helpers import assert_same_params
from ltransform.distributed import env
from ltransform.runner.batch_size import is_out_of_memory
from ltransform.runner.lr_finder import suggest

# ---------------------------------------------------------------- the toy problems


def regression(seed: int = 0, n: int = 64, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Least squares: loss = mean((Xw - y)^2) has Hessian H = 2/N X^T X, so gradient descent
    diverges for lr > 2 / L, L = H's largest eigenvalue; that bound is returned."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    y = x @ torch.randn(d, 1, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(n, 1, generator=gen,
                                                                                       dtype=torch.float64)
    hessian = 2 / n * x.T @ x
    return x, y, 2 / torch.linalg.eigvalsh(hessian).max().item()


def squared_error(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def linear_state(d: int = 8) -> lt.State:
    torch.manual_seed(3)
    model = torch.nn.Linear(d, 1, bias=False).double()
    return lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def dropout_state() -> lt.State:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5)
    return lt.State(model=model, optimizer=optimizer, scheduler=scheduler)


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def data(batches: int = 5, seed: int = 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(batches)]


def fits_up_to(limit: int, calls: list | None = None):
    """``fn(batch_size)``: a real allocation; beyond ``limit`` one of batch_size * 2**48 bytes, more
    than any machine's address space, which torch's CPU allocator refuses at once."""
    def fn(batch_size: int) -> None:
        began = time.monotonic()
        try:
            torch.ones(batch_size * (2**10 if batch_size <= limit else 2**48), dtype=torch.uint8)
        finally:
            if calls is not None:
                calls.append((batch_size, time.monotonic() - began))
    return fn


# ---------------------------------------------------------------- find_lr, one process


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_suggestion_lies_in_the_stable_range_of_gradient_descent(seed):
    x, y, stable = regression(seed)
    found = lt.find_lr(lt.train_step(squared_error), linear_state(), [(x, y)], min_lr=1e-5, max_lr=10.0)
    assert found.diverged and found.lrs[-1] > stable  # it ran past the divergence point, then stopped
    assert 1e-3 * stable < found.suggestion < stable
    assert len(found.lrs) == len(found.losses) < 100


def test_the_sweep_is_exponential_or_linear_from_min_to_max():
    x, y, _ = regression()
    step = lt.train_step(squared_error)
    exp = lt.find_lr(step, linear_state(), [(x, y)], min_lr=1e-6, max_lr=1e-2, steps=5, diverge=None)
    torch.testing.assert_close(torch.tensor(exp.lrs), torch.tensor([1e-6, 1e-5, 1e-4, 1e-3, 1e-2]), rtol=1e-12,
                               atol=0)
    lin = lt.find_lr(step, linear_state(), [(x, y)], min_lr=0.01, max_lr=0.05, steps=5, mode="linear")
    torch.testing.assert_close(torch.tensor(lin.lrs), torch.tensor([0.01, 0.02, 0.03, 0.04, 0.05]), rtol=1e-12,
                               atol=1e-15)
    assert not exp.diverged and lin.mode == "linear" and exp.mode == "exponential"


def test_the_losses_are_a_hand_written_sweep_smoothed_as_lightning_does():
    x, y, _ = regression()
    found = lt.find_lr(lt.train_step(squared_error), linear_state(), [(x, y)], min_lr=1e-3, max_lr=0.1, steps=20,
                       smoothing=0.9)
    ref = linear_state()
    average, losses = 0.0, []
    for i, lr in enumerate(found.lrs):
        ref.optimizer.param_groups[0]["lr"] = lr
        loss = squared_error(ref.model, (x, y))
        loss.backward()
        ref.optimizer.step()
        ref.optimizer.zero_grad(set_to_none=True)
        average = 0.9 * average + 0.1 * loss.item()
        losses.append(average / (1 - 0.9 ** (i + 1)))
    assert found.losses == pytest.approx(losses, rel=1e-12)


def test_suggest_picks_the_steepest_descent_against_log_lr():
    lrs = [10.0 ** k for k in range(-6, 1)]
    losses = [5.0, 4.9, 4.0, 2.0, 1.5, 1.4, 9.0]
    # central differences over log(lr): -0.5, -1.45, -1.25, -0.3 at 1e-5 ... 1e-2
    assert suggest(lrs, losses, skip_begin=0, skip_end=1) == 1e-4
    assert suggest(lrs, losses, skip_begin=3, skip_end=1) == 1e-3  # (2.0 -> 1.5 -> 1.4)
    assert suggest(lrs, losses, skip_begin=5, skip_end=1) is None  # fewer than two points left
    assert suggest(lrs, [*losses[:6], float("nan")], skip_begin=0, skip_end=0) == 1e-4  # NaN left out


def snapshot(state):
    return {
        "params": [(p.detach().clone(), None if p.grad is None else p.grad.clone())
                   for p in state.model.parameters()],
        "optimizer": copy.deepcopy(state.optimizer.state_dict()),
        "scheduler": copy.deepcopy(state.scheduler.state_dict()),
        "rng": (torch.get_rng_state(), random.getstate()),
        "counters": (state.step, state.micro_step, state.epoch, dict(state.extra)),
    }


def assert_same_snapshot(a, b):
    for (p, g), (q, h) in zip(a["params"], b["params"]):
        assert torch.equal(p, q)
        assert (g is None and h is None) or torch.equal(g, h)
    assert str(a["optimizer"]) == str(b["optimizer"])
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"][0], b["rng"][0]) and a["rng"][1] == b["rng"][1]
    assert a["counters"] == b["counters"]


@pytest.mark.parametrize("transforms", [(), (lt.accumulate(2),), (lt.with_precision("16-mixed"), lt.accumulate(3))],
                         ids=["plain", "accumulate", "16-mixed"])
def test_the_state_after_find_lr_is_bitwise_the_state_before(transforms):
    step = lt.pipe(lt.train_step(mse), *transforms)
    state = dropout_state()
    state = lt.run(step, state, data(5), max_epochs=1, progress=False)  # Adam moments, a scheduler, a window open
    assert state.micro_step == 5 and any(p.grad is not None for p in state.model.parameters()) == bool(transforms)
    random.seed(7)
    before = snapshot(state)
    found = lt.find_lr(step, state, data(), min_lr=1e-6, max_lr=10.0, steps=30)
    assert len(found.lrs) >= 2
    assert_same_snapshot(snapshot(state), before)
    # and training from it gives what training from an untouched copy gives
    twin = dropout_state()
    twin = lt.run(step, twin, data(5), max_epochs=1, progress=False)
    random.seed(7)
    state_rng = torch.get_rng_state()
    after = lt.run(step, state, data(), max_epochs=3, progress=False)
    torch.set_rng_state(state_rng)
    untouched = lt.run(step, twin, data(), max_epochs=3, progress=False)
    assert_same_params(after.model, untouched.model, exact=True)


def test_find_lr_restores_the_state_when_the_step_raises():
    state = dropout_state()
    before = snapshot(state)
    calls = []

    def loss(model, batch):
        calls.append(1)
        if len(calls) == 4:
            raise ValueError("a bad batch")
        return mse(model, batch)

    with pytest.raises(ValueError, match="a bad batch"):
        lt.find_lr(lt.train_step(loss), state, data(), steps=10)
    assert_same_snapshot(snapshot(state), before)


def one_cycle_state(kind: str = "State"):
    """AdamW under OneCycleLR (which also cycles the betas) for 30 steps, the scheduler held as
    ``kind`` says: an lt.State's scheduler, an entry of its extra, or a dict state's key."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=30)
    if kind == "dict":
        return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 0, "micro_step": 0}
    if kind == "extra":
        return lt.State(model=model, optimizer=optimizer, extra={"schedule": scheduler})
    return lt.State(model=model, optimizer=optimizer, scheduler=scheduler)


def scheduler_of(state):
    if isinstance(state, dict):
        return state["scheduler"]
    return state.scheduler if state.scheduler is not None else state.extra["schedule"]


def without_scheduler(state):
    if isinstance(state, dict):
        return {**state, "scheduler": None}
    return attrs.evolve(state, scheduler=None, extra={})


@pytest.mark.parametrize("kind", ["State", "extra", "dict"])
def test_find_lr_sweeps_with_the_schedulers_taken_out_and_puts_them_back(kind):
    step = lt.train_step(mse)
    state = lt.run(step, one_cycle_state(kind), data(5), max_epochs=1, progress=False)  # bound, 5 steps in
    scheduler = scheduler_of(state)
    assert scheduler.last_epoch == 5
    model, optimizer = (state["model"], state["optimizer"]) if kind == "dict" else (state.model, state.optimizer)
    before = {"params": [p.detach().clone() for p in model.parameters()],
              "optimizer": copy.deepcopy(optimizer.state_dict()),
              "scheduler": copy.deepcopy(scheduler.state_dict()),
              "groups": [(g["lr"], g["betas"]) for g in optimizer.param_groups]}
    # 40 updates, past the 30 OneCycleLR allows: no scheduler steps during the sweep
    found = lt.find_lr(step, state, data(), min_lr=1e-5, max_lr=1.0, steps=40, diverge=None)
    assert len(found.lrs) == 40 and found.suggestion is not None
    assert all(torch.equal(p, q) for p, q in zip(before["params"], model.parameters()))
    assert str(optimizer.state_dict()) == str(before["optimizer"])
    assert scheduler.state_dict() == before["scheduler"] and scheduler.last_epoch == 5
    assert [(g["lr"], g["betas"]) for g in optimizer.param_groups] == before["groups"]  # bitwise: == on floats
    # the same sweep as on the same state with no scheduler at all (a new step: bound to it afresh)
    twin = lt.run(step, one_cycle_state(kind), data(5), max_epochs=1, progress=False)
    assert lt.find_lr(lt.train_step(mse), without_scheduler(twin), data(), min_lr=1e-5, max_lr=1.0, steps=40,
                      diverge=None) == found
    # and training on (the scheduler steps again) gives what training an untouched twin gives
    after = lt.run(step, state, data(), max_epochs=2, progress=False)
    untouched = lt.run(step, twin, data(), max_epochs=2, progress=False)
    model_of = (lambda s: s["model"]) if kind == "dict" else (lambda s: s.model)
    assert_same_params(model_of(after), model_of(untouched), exact=True)
    assert scheduler.last_epoch == scheduler_of(untouched).last_epoch == 10  # (epoch 2 of 2)


def test_find_lr_trains_in_train_mode_and_puts_each_module_s_mode_back():
    state = dropout_state()
    state.model.eval()  # as from_pretrained leaves a model
    state.model[0].train()  # and one part in its own mode
    modes = [m.training for m in state.model.modules()]
    twin = dropout_state()
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    found = lt.find_lr(lt.train_step(mse), state, data(), min_lr=1e-3, max_lr=1e-1, steps=5, smoothing=0.0,
                       diverge=None)
    assert [m.training for m in state.model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)

    def by_hand(model, optimizer, train):
        model.train(train)
        losses = []
        for lr, batch in zip(found.lrs, data()):
            optimizer.param_groups[0]["lr"] = lr
            loss = mse(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    torch.set_rng_state(rng)
    assert list(found.losses) == by_hand(twin.model, twin.optimizer, train=True)  # dropout on, bitwise
    evaluated = dropout_state()
    assert list(found.losses) != by_hand(evaluated.model, evaluated.optimizer, train=False)


@pytest.mark.parametrize(("options", "match"), [
    ({"mode": "cosine"}, r"lt\.find_lr: unknown mode 'cosine'; expected one of: 'exponential', 'linear'"),
    ({"min_lr": 0}, r"lt\.find_lr: min_lr must be a positive finite number, got 0"),
    ({"max_lr": float("inf")}, r"lt\.find_lr: max_lr must be a positive finite number, got inf"),
    ({"min_lr": 1.0, "max_lr": 0.1}, r"lt\.find_lr: max_lr must be greater than min_lr, got min_lr=1.0, max_lr=0.1"),
    ({"steps": 1}, r"lt\.find_lr: steps must be an int >= 2 \(updates to try\), got 1"),
    ({"smoothing": 1.0}, r"lt\.find_lr: smoothing must be a number in \[0, 1\), got 1.0"),
    ({"diverge": 0.5}, r"lt\.find_lr: diverge must be a number > 1 .* or None, got 0.5"),
    ({"skip_begin": -1}, r"lt\.find_lr: skip_begin must be an int >= 0, got -1"),
])
def test_find_lr_bad_options_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        lt.find_lr(lt.train_step(mse), dropout_state(), data(), **options)


def test_find_lr_needs_an_optimizer_a_loss_and_batches():
    model = torch.nn.Linear(4, 1)
    with pytest.raises(ValueError, match=r"lt\.find_lr: the state has no optimizer; give it one"):
        lt.find_lr(lt.train_step(mse), lt.State(model=model), data())

    def no_loss(state, batch):
        return state, {"accuracy": torch.tensor(1.0)}

    with pytest.raises(KeyError, match=r"lt\.find_lr: the step's metrics have no 'loss' \(got \['accuracy'\]\)"):
        lt.find_lr(no_loss, dropout_state(), data())
    with pytest.raises(ValueError, match=r"lt\.find_lr: data yielded no batches"):
        lt.find_lr(lt.train_step(mse), dropout_state(), iter(data()), steps=10)


def test_plot_draws_the_curve_and_the_suggestion():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    x, y, _ = regression()
    found = lt.find_lr(lt.train_step(squared_error), linear_state(), [(x, y)], min_lr=1e-5, max_lr=10.0)
    ax = found.plot()
    assert ax.get_xscale() == "log" and len(ax.lines) == 2


# ---------------------------------------------------------------- find_batch_size, one process


def test_a_real_cpu_allocator_failure_is_out_of_memory_and_comes_at_once():
    began = time.monotonic()
    with pytest.raises(RuntimeError) as caught:
        torch.ones(2**48 * 32, dtype=torch.uint8)
    assert time.monotonic() - began < 1.0  # refused, not swapped
    assert is_out_of_memory(caught.value) and "can't allocate memory" in str(caught.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00G."))
    # torch's own messages (AT_CUDNN_CHECK, TORCH_CUDABLAS_CHECK): cuDNN's answer to too large an input,
    # cuBLAS out of memory for its handle; Lightning's and Accelerate's checks count both
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you "
                                         "passed in a non-contiguous input."))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_INVALID_VALUE when calling `cublasSgemm( "
                                             "handle, opa, opb, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc)`"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # a ValueError is not an allocator's


@pytest.mark.parametrize(("mode", "limit", "expected"), [
    ("power", 24, 16), ("binsearch", 24, 24), ("power", 1, 1), ("binsearch", 37, 37), ("binsearch", 1, 1),
])
def test_find_batch_size_finds_the_largest_size_that_fits(mode, limit, expected):
    calls = []
    assert lt.find_batch_size(fits_up_to(limit, calls), mode=mode) == expected
    assert calls[0][0] == 1 and all(seconds < 1.0 for _, seconds in calls)
    tried = [size for size, _ in calls]
    doubling = [s for s in tried if s & (s - 1) == 0]
    assert doubling[:len(doubling)] == [2**k for k in range(len(doubling))]
    if mode == "power":
        assert tried == [2**k for k in range(len(tried))] and tried[-1] == 2 * expected


def test_a_cudnn_refusal_counts_as_running_out_of_memory():
    def fn(batch_size):
        if batch_size > 8:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                               "non-contiguous input.")

    assert lt.find_batch_size(fn, mode="binsearch") == 8


def test_find_batch_size_starts_at_start_and_stops_at_max_size():
    calls = []
    assert lt.find_batch_size(fits_up_to(100, calls), start=3, max_size=20) == 20
    assert [size for size, _ in calls] == [3, 6, 12, 20]
    assert lt.find_batch_size(fits_up_to(100), start=8, max_size=8) == 8


def test_a_non_oom_error_propagates_unchanged():
    error = ValueError("a shape mismatch")

    def fn(batch_size):
        if batch_size == 4:
            raise error
        torch.ones(batch_size)

    with pytest.raises(ValueError) as caught:
        lt.find_batch_size(fn)
    assert caught.value is error


def test_even_start_running_out_of_memory_is_an_error():
    with pytest.raises(RuntimeError, match=r"lt\.find_batch_size: batch_size=2 already runs out of memory; try a "
                                           r"smaller start"):
        lt.find_batch_size(fits_up_to(1), start=2)


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"start": 0}, ValueError, r"lt\.find_batch_size: start must be a positive int, got 0"),
    ({"start": 2.0}, ValueError, r"lt\.find_batch_size: start must be a positive int, got 2.0"),
    ({"max_size": 0}, ValueError, r"lt\.find_batch_size: max_size must be an int >= start \(1\) or None, got 0"),
    ({"mode": "linear"}, ValueError,
     r"lt\.find_batch_size: unknown mode 'linear'; expected one of: 'power', 'binsearch'"),
])
def test_find_batch_size_bad_options_are_clear_errors(options, error, match):
    with pytest.raises(error, match=match):
        lt.find_batch_size(fits_up_to(8), **options)
    with pytest.raises(TypeError, match=r"lt\.find_batch_size: fn must be callable as fn\(batch_size\), got int"):
        lt.find_batch_size(3)


# ---------------------------------------------------------------- 2 ranks


def _find_lr_on(shard: int | None) -> tuple:
    """find_lr of gradient descent on least squares; ``shard``: this rank's half of the batch under
    DDP (None: one process with all of it)."""
    x, y, stable = regression(0)
    batch = (x, y) if shard is None else (x.chunk(2)[shard], y.chunk(2)[shard])
    step = lt.train_step(squared_error) if shard is None else lt.pipe(lt.train_step(squared_error),
                                                                     lt.distribute("ddp"))
    state = linear_state()
    before = [p.detach().clone() for p in state.model.parameters()]
    found = lt.find_lr(step, state, [batch], min_lr=1e-5, max_lr=10.0)
    same = all(torch.equal(a, b) for a, b in zip(before, state.model.parameters()))
    return found, stable, same


def _find_lr_scheduled_on(shard: int | None) -> tuple:
    """find_lr past the end of a OneCycleLR, on a state two steps into it (bound by lt.run: under
    DDP the sweep prepares the state again, without the scheduler); ``shard`` as above."""
    x, y, _ = regression(0)
    batch = (x, y) if shard is None else (x.chunk(2)[shard], y.chunk(2)[shard])
    step = lt.train_step(squared_error) if shard is None else lt.pipe(lt.train_step(squared_error),
                                                                     lt.distribute("ddp"))
    state = linear_state()
    state = attrs.evolve(state, scheduler=torch.optim.lr_scheduler.OneCycleLR(
        state.optimizer, max_lr=0.05, total_steps=10, cycle_momentum=False))
    state = lt.run(step, state, [batch], max_steps=2, progress=False)
    before = ([p.detach().clone() for p in state.model.parameters()], copy.deepcopy(state.scheduler.state_dict()),
              copy.deepcopy(state.optimizer.state_dict()))
    found = lt.find_lr(step, state, [batch], min_lr=1e-5, max_lr=10.0, steps=30)
    same = (all(torch.equal(a, b) for a, b in zip(before[0], state.model.parameters()))
            and before[1] == state.scheduler.state_dict() and str(before[2]) == str(state.optimizer.state_dict()))
    return found, same


def _sizes() -> dict:
    rank = lt.rank()
    out = {"power": lt.find_batch_size(fits_up_to(24 if rank == 0 else 12)),
           "binsearch": lt.find_batch_size(fits_up_to(24 if rank == 0 else 12), mode="binsearch")}

    def fn(batch_size):
        if rank == 1 and batch_size == 4:
            raise ValueError("rank 1's own error")
        torch.ones(batch_size)

    try:
        lt.find_batch_size(fn)
    except (ValueError, RuntimeError) as error:
        out["error"] = f"{type(error).__name__}: {error}"
    return out


def _scenarios() -> dict:
    found, stable, same = _find_lr_on(lt.rank())
    scheduled, scheduled_same = _find_lr_scheduled_on(lt.rank())
    mine = {"found": found, "stable": stable, "restored": same, "scheduled": scheduled,
            "scheduled restored": scheduled_same, **_sizes()}
    return dict(zip(range(lt.world_size()), env.all_gather_objects(mine)))


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return lt.launch(_scenarios, devices=2, timeout=120)


def test_find_lr_on_2_ranks_agrees_and_equals_one_process_with_the_whole_batch(two_ranks):
    one, _, _ = _find_lr_on(None)
    a, b = two_ranks[0]["found"], two_ranks[1]["found"]
    assert a == b  # the same record on every rank: lrs, losses (averaged across ranks), suggestion
    assert a.lrs == one.lrs and a.suggestion == one.suggestion
    # (float64 sums split in two: the last, diverging, point moves by 1e-9)
    assert a.losses == pytest.approx(one.losses, rel=1e-6)
    assert a.suggestion < two_ranks[0]["stable"]
    assert two_ranks[0]["restored"] and two_ranks[1]["restored"]


def test_find_lr_on_2_ranks_takes_the_scheduler_out_as_on_one_process(two_ranks):
    one, one_same = _find_lr_scheduled_on(None)
    a, b = two_ranks[0]["scheduled"], two_ranks[1]["scheduled"]
    assert a == b and len(a.lrs) > 10  # past the scheduler's 10 steps (8 left)
    assert a.lrs == one.lrs and a.suggestion == one.suggestion
    assert a.losses == pytest.approx(one.losses, rel=1e-6)
    assert one_same and two_ranks[0]["scheduled restored"] and two_ranks[1]["scheduled restored"]


def test_find_batch_size_on_2_ranks_returns_what_fits_on_every_rank(two_ranks):
    for rank in (0, 1):
        assert two_ranks[rank]["power"] == 8 and two_ranks[rank]["binsearch"] == 12


def test_a_non_oom_error_on_one_rank_raises_on_every_rank_instead_of_hanging(two_ranks):
    assert two_ranks[1]["error"] == "ValueError: rank 1's own error"
    assert two_ranks[0]["error"].startswith("RuntimeError: lt.find_batch_size: fn(4) raised an error other than "
                                            "running out of memory on another rank")
