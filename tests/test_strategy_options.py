"""DDP's options (``lt.Strategy(find_unused_parameters=, static_graph=, timeout=)``), ``lt.sync_batchnorm``,
``lt.no_backward_sync`` and ``lt.init_tensor``.

The 2-rank cases run in real processes (``lt.launch(devices=2)``, gloo on the CPU), launched once per
module; each is compared with a hand-written loop in one process on the double batch (rank r's batch is
rows ``r*B:(r+1)*B`` of it).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import ltransform as lt
from helpers import assert_same_params, make_data, make_model, mse
from ltransform.distributed import env

HALF = 4  # each rank's batch; the reference trains on 2 * HALF rows


class Branchy(torch.nn.Module):
    """A submodule (``extra``) used only on the steps whose batch says so."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.extra, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        if use_extra:
            h = torch.tanh(self.extra(h))
        return self.head(h)


def _branchy(seed: int = 0) -> Branchy:
    torch.manual_seed(seed)
    return Branchy()


def _branchy_loss(model, batch):
    x, y, use_extra = batch
    return F.mse_loss(model(x, use_extra), y)


def _branchy_data() -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    return [(x, y, i % 2 == 0) for i, (x, y) in enumerate(make_data(6, 2 * HALF))]


def _batchnormed(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1)).double()


def _mine(batch):
    """This rank's rows of a double batch."""
    lo = lt.rank() * HALF
    return tuple(part[lo:lo + HALF] if isinstance(part, torch.Tensor) else part for part in batch)


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: a None and a zero gradient agree


def _reference(model, loss, data):
    """One process, the double batch: the hand-written loop every 2-rank run must equal."""
    opt = _sgd(model)
    for batch in data:
        loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return model


def _reference_accumulated(model, loss, data, n):
    """One process, the double batch, ``n`` micro-steps per update (each loss divided by ``n``)."""
    opt = _sgd(model)
    for i, batch in enumerate(data):
        (loss(model, batch) / n).backward()
        if (i + 1) % n == 0:
            opt.step()
            opt.zero_grad()
    return model


def _train(model, loss, data, strategy, *, accumulate=None):
    step = lt.pipe(lt.train_step(loss), lt.distribute(strategy), *([lt.accumulate(accumulate)] if accumulate else []))
    state = lt.State(model=model, optimizer=_sgd(model))
    for batch in data:
        state, _ = step(state, _mine(batch))
    return model


def _tensors(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def _error(fn) -> str:
    try:
        fn()
    except Exception as error:  # noqa: BLE001  (the test reads the error each rank got)
        return f"{type(error).__name__}: {error}"
    return "no error"


# ---------------------------------------------------------------- the 2-rank scenarios


def _sync_batchnorm() -> dict:
    data = [(x.double(), y.double()) for x, y in make_data(4, 2 * HALF)]
    synced = _train(lt.pipe(_batchnormed(), lt.sync_batchnorm()), mse, data, "ddp")
    plain = _train(_batchnormed(), mse, data, "ddp")
    return {"synced": _tensors(synced), "plain": _tensors(plain), "type": type(synced[1]).__name__}


def _sync_batchnorm_half() -> dict:
    """float16 and bfloat16 inputs whose per-rank count (32 * 48 * 48 = 73728 per channel) is above float16's
    largest number: each rank's output, gradient and running statistics, against one process's float32 math
    on the double batch (what torch's GPU kernels compute), cast to the input's dtype."""
    env.ensure_process_group()  # (lt.launch leaves it to the first collective; unsynchronised without it)
    gen = torch.Generator().manual_seed(3)
    whole = torch.randn(64, 2, 48, 48, generator=gen) * 2 + 3
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        layer = lt.sync_batchnorm(torch.nn.BatchNorm2d(2).to(dtype))
        x = whole[lt.rank() * 32:(lt.rank() + 1) * 32].to(dtype).requires_grad_()
        y = layer(x)
        (grad,) = torch.autograd.grad((y.float() ** 3).sum(), x)
        ref = torch.nn.BatchNorm2d(2)  # float32, the double batch (rounded to dtype first, as the ranks' inputs)
        wide = whole.to(dtype).float().requires_grad_()
        want = ref(wide)
        (grads,) = torch.autograd.grad((want.to(dtype).float() ** 3).sum(), wide)
        mine = slice(lt.rank() * 32, (lt.rank() + 1) * 32)
        stats = {name: (getattr(layer, f"running_{name}").float() - getattr(ref, f"running_{name}").to(dtype).float())
                 for name in ("mean", "var")}
        out[str(dtype)] = {"y": (y.float() - want[mine].to(dtype).float()).abs().max().item(),
                           "finite": bool(y.isfinite().all()),
                           "grad": ((grad.float() - grads[mine].to(dtype).float()).abs().max()
                                    / grads.abs().max()).item(),
                           **{name: diff.abs().max().item() for name, diff in stats.items()}}
    return out


def _no_backward_sync(strategy: str) -> dict:
    def build():
        model = make_model()
        return lt.shard(model, policy={torch.nn.Linear}) if strategy == "fsdp" else model

    data = make_data(4, 2 * HALF)
    by_accumulate = _train(build(), mse, data, strategy, accumulate=2)
    model = build()
    state = lt.prepare(lt.distribute(lt.train_step(mse), strategy), lt.State(model=model, optimizer=_sgd(model)))
    model, opt, inside = state.model, state.optimizer, []
    for i, batch in enumerate(data):
        boundary = i % 2 == 1
        with lt.no_backward_sync(model, enabled=not boundary):
            (mse(model, _mine(batch)) / 2).backward()
        if not boundary and strategy == "ddp":  # (FSDP2 keeps them on its unsharded parameters until it reduces)
            inside.append([p.grad.clone() for p in model.parameters()])
        elif boundary:
            opt.step()
            opt.zero_grad()
    return {"hand": _tensors(model), "accumulate": _tensors(by_accumulate), "inside": inside}


def _ddp_options() -> dict:
    data = _branchy_data()
    unused = lt.Strategy(name="ddp", find_unused_parameters=True)
    static = lt.Strategy(name="ddp", static_graph=True)
    out: dict = {"unused": _tensors(_train(_branchy(), _branchy_loss, data, unused)),
                 "static": _tensors(_train(make_model(), mse, make_data(4, 2 * HALF), static)),
                 "static_branch": _tensors(_train(_branchy(), _branchy_loss, [d[:2] + (True,) for d in data], static)),
                 # DDP records the graph on the first iteration, which therefore synchronises (without: torch's
                 # "expect_autograd_hooks_ INTERNAL ASSERT"); the later windows reduce only at their boundary
                 "static_accumulate": {n: _tensors(_train(make_model(), mse, make_data(6, 2 * HALF), static,
                                                          accumulate=n)) for n in (2, 3)}}
    out["without"] = _error(lambda: _train(_branchy(), _branchy_loss, data, "ddp"))  # last: it leaves DDP mid-step
    return out


def _scenarios() -> dict:
    mine = {"sync_batchnorm": _sync_batchnorm(), "sync_batchnorm_half": _sync_batchnorm_half(),
            "no_sync_ddp": _no_backward_sync("ddp"),
            "no_sync_fsdp": _no_backward_sync("fsdp"), "ddp": _ddp_options()}
    return dict(zip(range(lt.world_size()), env.all_gather_objects(mine)))


def _timing_out(seconds: float, late: float) -> dict:
    """Rank 1 takes ``late`` seconds longer than rank 0 over its forward (in ``lt.run``): rank 0's gradient group
    gives up after ``seconds``."""
    def slow(model, batch):
        if lt.rank() == 1:
            time.sleep(late)
        return mse(model, batch)

    model = make_model()
    step = lt.distribute(lt.train_step(slow), lt.Strategy(name="ddp", timeout=seconds))
    state = lt.prepare(step, lt.State(model=model, optimizer=_sgd(model)))  # (new_group: every rank meets here)
    start = time.monotonic()
    error = _error(lambda: lt.run(step, state, [_mine(make_data(1, 2 * HALF)[0])], progress=False,
                                  distributed_sampler=False))
    return {"rank": lt.rank(), "error": error, "waited": time.monotonic() - start}


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return lt.launch(_scenarios, devices=2, timeout=120)


# ---------------------------------------------------------------- find_unused_parameters, static_graph, timeout


@pytest.mark.timeout(300)
def test_a_conditional_branch_fails_without_find_unused_parameters(two_ranks):
    for rank in (0, 1):
        error = two_ranks[rank]["ddp"]["without"]
        assert error.startswith("RuntimeError: Expected to have finished reduction in the prior iteration"), error
        assert "find_unused_parameters=True" in error  # torch's own advice, which lt.Strategy now reaches


def test_find_unused_parameters_trains_a_conditional_branch_as_one_process(two_ranks):
    ref = _reference(_branchy(), _branchy_loss, _branchy_data())
    for rank in (0, 1):
        got = two_ranks[rank]["ddp"]["unused"]
        for name, value in _tensors(ref).items():
            torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)
    assert not torch.equal(two_ranks[0]["ddp"]["unused"]["extra.weight"], _branchy().extra.weight)  # it trained


def test_static_graph_with_accumulate_trains_as_one_process(two_ranks):
    for n in (2, 3):
        ref = _tensors(_reference_accumulated(make_model(), mse, make_data(6, 2 * HALF), n))
        for rank in (0, 1):
            got = two_ranks[rank]["ddp"]["static_accumulate"][n]
            for name, value in ref.items():
                torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)
    assert not torch.equal(ref["0.weight"], _tensors(make_model())["0.weight"])  # it trained


def test_static_graph_trains_as_one_process(two_ranks):
    ref = _reference(make_model(), mse, make_data(4, 2 * HALF))
    branch = _reference(_branchy(), _branchy_loss, [d[:2] + (True,) for d in _branchy_data()])
    for rank in (0, 1):
        for name, value in _tensors(ref).items():
            torch.testing.assert_close(two_ranks[rank]["ddp"]["static"][name], value, atol=1e-6, rtol=0, msg=name)
        for name, value in _tensors(branch).items():
            torch.testing.assert_close(two_ranks[rank]["ddp"]["static_branch"][name], value, atol=1e-6, rtol=0)


@pytest.mark.timeout(300)
def test_timeout_is_the_gradient_groups_collective_timeout():
    result = lt.launch(_timing_out, 1.5, 5.0, devices=2, timeout=60)  # the default group: 60 s
    assert result["rank"] == 0 and result["error"] != "no error"
    assert "timed out" in result["error"].lower(), result["error"]
    assert 1.4 < result["waited"] < 4.5  # it gave up at 1.5 s, before rank 1 came (and long before 60 s)
    # lt.run's message names the gradient group's timeout and its setting, not the default group's
    assert result["error"].startswith("CollectiveError: rank 0: a collective of the step call (step 1) did not "
                                      "complete within 1.5 s (the gradient all-reduce's timeout, "
                                      "lt.Strategy(timeout=))"), result["error"]
    assert "raise that limit: lt.Strategy(name='ddp', timeout=SECONDS)" in result["error"]
    assert "60 s" not in result["error"] and "lt.launch" not in result["error"]


def test_a_timeout_names_the_group_that_timed_out(one_rank_group, monkeypatch):
    monkeypatch.setenv("LTRANSFORM_COLLECTIVE_TIMEOUT", "60")  # the default group's (as lt.launch(timeout=60))
    model = make_model()
    lt.prepare(lt.distribute(lt.train_step(mse), lt.Strategy(name="ddp", timeout=2.5)),
               lt.State(model=model, optimizer=_sgd(model)))  # makes the gradient group (2.5 s)

    def message(ms: int) -> str:
        error = RuntimeError(f"[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting {ms}ms for recv operation")
        return str(env.collective_error(error, "a collective of the step call (step 3)"))

    gradient = message(2500)
    assert gradient.startswith("rank 0: a collective of the step call (step 3) did not complete within 2.5 s (the "
                               "gradient all-reduce's timeout, lt.Strategy(timeout=)): another rank is stuck"), gradient
    assert "raise that limit: lt.Strategy(name='ddp', timeout=SECONDS)" in gradient and "lt.launch" not in gradient
    default = message(60000)  # the default group's: lt.launch's advice, the gradient group's setting mentioned
    assert "did not complete within 60 s: another rank" in default
    assert ("raise the limit: lt.launch(..., timeout=SECONDS), ltransform run --timeout SECONDS or "
            "LTRANSFORM_COLLECTIVE_TIMEOUT=SECONDS (the gradient all-reduce's group: lt.Strategy(name='ddp', "
            "timeout=SECONDS))") in default


@pytest.mark.parametrize(("options", "match"), [
    ({"name": "fsdp", "find_unused_parameters": True}, r"Strategy\(name='fsdp', find_unused_parameters=True\): "
     r"find_unused_parameters is an option of DDP; it applies to name='ddp' \(or 'auto'\)"),
    ({"name": "hsdp", "static_graph": True}, "static_graph is an option of DDP"),
    ({"name": "single", "timeout": 5}, r"timeout=5\): timeout is an option of DDP.*lt.launch\(timeout=SECONDS\)"),
    ({"name": "ddp", "timeout": 0}, r"Strategy\(timeout=0\): expected a positive number of seconds"),
    ({"name": "ddp", "timeout": float("inf")}, r"Strategy\(timeout=inf\): expected a positive finite number of "
     r"seconds \(at most 8.64e\+13\), or a datetime.timedelta"),
    ({"name": "ddp", "timeout": float("nan")}, r"Strategy\(timeout=nan\): expected a positive finite number"),
    ({"name": "ddp", "timeout": 1e300}, r"Strategy\(timeout=1e\+300\): expected a positive finite number"),
])
def test_options_of_another_strategy_or_bad_values_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        lt.Strategy(**options)


@pytest.mark.parametrize("option", ["find_unused_parameters", "static_graph", "sync_micro_steps", "graph_per_update"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_flags_take_true_or_false(option, value):
    with pytest.raises(TypeError, match=rf"Strategy\({option}={value!r}\): expected True or False"):
        lt.Strategy(name="auto", **{option: value})


def test_timeout_takes_seconds_or_a_timedelta():
    import datetime

    assert lt.Strategy(name="ddp", timeout=90).timeout == datetime.timedelta(seconds=90)
    assert lt.Strategy(name="ddp", timeout=datetime.timedelta(minutes=1)).timeout.total_seconds() == 60
    with pytest.raises(TypeError, match=r"Strategy\(timeout='90'\): expected seconds \(a number\) or a datetime"):
        lt.Strategy(name="ddp", timeout="90")


def test_auto_with_ddp_options_on_a_sharded_model_is_a_clear_error(one_rank_group):
    model = lt.shard(make_model(), policy={torch.nn.Linear})
    step = lt.distribute(lt.train_step(mse), lt.Strategy(name="auto", static_graph=True))
    with pytest.raises(RuntimeError, match=r"resolved to 'fsdp' for this model, but the strategy has DDP options"):
        lt.prepare(step, lt.State(model=model, optimizer=_sgd(model)))


def test_ddp_options_on_one_process_train_as_a_plain_loop():
    model = _branchy()
    step = lt.distribute(lt.train_step(_branchy_loss), lt.Strategy(name="ddp", find_unused_parameters=True,
                                                                   static_graph=True, timeout=5))
    state = lt.State(model=model, optimizer=_sgd(model))
    for batch in _branchy_data():
        state, _ = step(state, batch)
    assert_same_params(model, _reference(_branchy(), _branchy_loss, _branchy_data()))


# ---------------------------------------------------------------- sync_batchnorm


def test_sync_batchnorm_on_2_ranks_equals_one_process_on_the_double_batch(two_ranks):
    data = [(x.double(), y.double()) for x, y in make_data(4, 2 * HALF)]
    ref = _tensors(_reference(_batchnormed(), mse, data))
    for rank in (0, 1):
        got = two_ranks[rank]["sync_batchnorm"]
        assert got["type"] == "SyncBatchNorm"
        assert got["synced"].keys() == ref.keys()  # the same state_dict (running stats included)
        for name, value in ref.items():
            torch.testing.assert_close(got["synced"][name], value, atol=1e-12, rtol=1e-12, msg=name)
    plain = two_ranks[0]["sync_batchnorm"]["plain"]
    assert (plain["1.running_var"] - ref["1.running_var"]).abs().max() > 1e-3  # per-rank statistics differ
    assert (plain["0.weight"] - ref["0.weight"]).abs().max() > 1e-4


def test_sync_batchnorm_on_one_process_is_plain_batchnorm():
    x = torch.randn(16, 4, 5)
    for momentum in (0.1, None):
        plain = torch.nn.BatchNorm1d(4, momentum=momentum)
        synced = lt.sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(4, momentum=momentum)))
        for _ in range(2):
            assert torch.equal(synced(x), plain(x))
        assert all(torch.equal(a, b) for a, b in zip(synced.state_dict().values(), plain.state_dict().values()))
        synced.eval(), plain.eval()
        assert torch.equal(synced(x), plain(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sync_batchnorm_in_a_one_rank_group_on_the_cpu_is_plain_batchnorm_bit_for_bit(one_rank_group, dtype):
    x = (torch.randn(16, 4, 3, 3) * 3 + 1).to(dtype).requires_grad_()
    for momentum in (0.1, None):
        plain = torch.nn.BatchNorm2d(4, momentum=momentum).to(dtype)
        synced = lt.sync_batchnorm(torch.nn.BatchNorm2d(4, momentum=momentum).to(dtype))  # a bare layer: a new one
        assert isinstance(synced, torch.nn.SyncBatchNorm)
        for _ in range(3):  # torch's SyncBatchNorm raises on CPU tensors in a group; this one computes them
            got, want = synced(x), plain(x)
            assert torch.equal(got, want)
            assert torch.equal(torch.autograd.grad((got.float() ** 3).sum(), x)[0],
                               torch.autograd.grad((want.float() ** 3).sum(), x)[0])
        assert all(torch.equal(a, b) for a, b in zip(synced.state_dict().values(), plain.state_dict().values()))


def test_sync_batchnorm_in_half_precision_on_2_ranks_uses_float32_statistics(two_ranks):
    for rank in (0, 1):
        # at most one rounding apart (y is within +-5; the statistics below 4): float16 sums over 73728 elements
        # overflowed (NaN), bfloat16 ones rounded the count and the sums
        for dtype, ulp in (("torch.float16", 2 ** -9), ("torch.bfloat16", 2 ** -7)):
            got = two_ranks[rank]["sync_batchnorm_half"][dtype]
            assert got["finite"], got
            assert max(got["y"], got["grad"], got["mean"], got["var"]) <= ulp, got  # (grad: relative to the largest)


def test_sync_batchnorm_is_pipeable_and_checks_its_order(one_rank_group):
    assert repr(lt.sync_batchnorm()) == "lt.sync_batchnorm()"
    model = lt.pipe(_batchnormed().float(), lt.sync_batchnorm(), lt.shard(policy={torch.nn.Linear}))
    assert isinstance(model[1], torch.nn.SyncBatchNorm)
    order = r"reorder: lt.pipe\(model, lt.sync_batchnorm\(\), lt.checkpoint_activations\(policy=...\), "
    with pytest.raises(RuntimeError, match="sync_batchnorm must be applied before shard; " + order):
        lt.sync_batchnorm(lt.shard(_batchnormed().float(), policy={torch.nn.Linear}))
    replicated = _batchnormed().float()
    lt.prepare(lt.distribute(lt.train_step(mse), "ddp"), lt.State(model=replicated, optimizer=_sgd(replicated)))
    with pytest.raises(RuntimeError, match=r"sync_batchnorm must be applied before replicate; .*, then lt.distribute"):
        lt.sync_batchnorm(replicated)
    with pytest.raises(TypeError, match="sync_batchnorm: expected a torch.nn.Module, got str"):
        lt.sync_batchnorm("model")


def test_sync_batchnorm_before_compile():
    compiled = lt.compile(_batchnormed(), backend="eager")
    with pytest.raises(RuntimeError, match="sync_batchnorm must be applied before torch.compile"):
        lt.sync_batchnorm(compiled)


# ---------------------------------------------------------------- no_backward_sync


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_no_backward_sync_by_hand_equals_accumulate_on_2_ranks(two_ranks, strategy):
    for rank in (0, 1):
        got = two_ranks[rank][f"no_sync_{strategy}"]
        for name, value in got["accumulate"].items():
            assert torch.equal(got["hand"][name], value), name
    assert two_ranks[0][f"no_sync_{strategy}"]["hand"]["0.weight"].shape == (16, 4)
    assert len(two_ranks[0][f"no_sync_{strategy}"]["inside"]) == (2 if strategy == "ddp" else 0)
    for zero, one in zip(two_ranks[0][f"no_sync_{strategy}"]["inside"], two_ranks[1][f"no_sync_{strategy}"]["inside"]):
        assert all(not torch.equal(a, b) for a, b in zip(zero, one))  # each rank kept its own gradients


def test_no_backward_sync_on_a_plain_model_is_a_no_op():
    model, ref = make_model(), make_model()
    batch = make_data(1)[0]
    with lt.no_backward_sync(model):
        mse(model, batch).backward()
    mse(ref, batch).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))
    with pytest.raises(TypeError, match="no_backward_sync: expected the model"):
        with lt.no_backward_sync(lt.State(model=model)):
            pass


def test_no_backward_sync_restores_the_setting_on_one_rank(one_rank_group):
    model = lt.shard(make_model(), policy={torch.nn.Linear})
    from ltransform.distributed import wrappers

    with pytest.raises(ValueError, match="boom"):
        with lt.no_backward_sync(model):
            assert not wrappers.gradient_sync(model)
            raise ValueError("boom")
    assert wrappers.gradient_sync(model)
    with lt.no_backward_sync(model, enabled=False):
        assert wrappers.gradient_sync(model)


# ---------------------------------------------------------------- init_tensor


def test_init_tensor_sets_dtype_and_device_and_restores_them():
    assert torch.get_default_dtype() == torch.float32
    with lt.init_tensor("bf16-true"):
        made = torch.zeros(2)
        assert made.dtype == torch.bfloat16 and made.device == lt.device()
        assert torch.arange(3).dtype == torch.int64  # integers keep theirs
    assert torch.get_default_dtype() == torch.float32
    with lt.init_tensor("64-true", device="meta"):
        assert torch.empty(1).device.type == "meta" and torch.empty(1).dtype == torch.float64
    with pytest.raises(ValueError, match="boom"):
        with lt.init_tensor("16-true", device="meta"):
            raise ValueError("boom")
    assert torch.get_default_dtype() == torch.float32 and torch.empty(1).device.type == "cpu"
    with lt.init_tensor():  # no precision: the default dtype as it is
        assert torch.zeros(1).dtype == torch.float32
    with lt.init_tensor("bf16-mixed"):  # mixed: weights (and new tensors) stay float32
        assert torch.zeros(1).dtype == torch.float32


def test_init_tensor_names_the_valid_precisions():
    with pytest.raises(ValueError, match=r"init_tensor: unknown precision 'bogus'; expected one of: '16-mixed'"):
        lt.init_tensor("bogus")
