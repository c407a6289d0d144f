"""lt.throughput, lt.memory_monitor, lt.lr_monitor: values against hand-computed ones, called at log
points only, the peak table, and samples/s over 2 real gloo ranks."""

from __future__ import annotations

import resource
import time
import warnings
from collections.abc import Iterator, Mapping

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

import ltransform as lt
from ltransform.runner.hooks.peaks import device_model, matmul_dtype, peak_tflops

D, B = 64, 32


def linear_state(d: int = D, lr: float = 0.1) -> lt.State:
    torch.manual_seed(0)
    model = torch.nn.Linear(d, d, bias=False)
    return lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr))


def square(model, x):
    return model(x).pow(2).mean()


def batches(n: int, b: int = B, d: int = D) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(b, d, generator=gen) for _ in range(n)]  # not requiring grad


def logged_by(hooks, step, state, data, **options) -> dict[int, dict[str, float]]:
    """Run; every logged value by step (a logger that keeps them)."""
    rows: dict[int, dict[str, float]] = {}
    lt.run(step, state, data, loggers=[lambda values, at: rows.setdefault(at, {}).update(values)],
           hooks=hooks, progress=False, **options)
    return rows


class Counted:
    """A hook as it is, with the steps it is called at recorded."""

    reads_state = False

    def __init__(self, hook):
        self.hook, self.calls, self.ends, self.__name__ = hook, [], [], hook.__name__

    def __call__(self, state, run):
        self.calls.append(run.step)
        return self.hook(state, run)

    def next_step(self, step):
        return self.hook.next_step(step)

    def start(self, state, run):
        return self.hook.start(state, run)

    def end(self, state, run):
        self.ends.append(run.step)
        return self.hook.end(state, run)

    def close(self, run=None):
        if hasattr(self.hook, "close"):
            self.hook.close(run)


# --- throughput: FLOPs, TFLOP/s and MFU of a matmul-only model -------------------------------

def test_mfu_of_a_matmul_only_model_is_the_hand_computed_flops_over_time_over_peak():
    # Linear(D, D, bias=False) on x (B, D) that does not require grad: forward one mm, 2·B·D·D;
    # backward only the weight's gradient (grad_out^T @ x), 2·B·D·D; pow/mean and SGD are no matmuls
    flops = 4 * B * D * D
    peak = 2.5  # TFLOP/s
    clock: dict[int, float] = {}

    def tick(state, run):  # every step, just before the throughput hook, in the same event
        clock[run.step] = time.perf_counter()

    rows = logged_by([tick, lt.throughput(peak=peak)], lt.train_step(square), linear_state(), batches(30),
                     log_every=10)
    assert sorted(rows) == [10, 20, 30]
    for at, first in ((10, 1), (20, 10), (30, 20)):  # the first window starts after the first step
        row = rows[at]
        assert row["throughput/flops_per_step"] == flops
        seconds = row["throughput/seconds"]
        assert row["throughput/tflops"] == pytest.approx(flops * (at - first) / seconds / 1e12, rel=1e-12)
        assert row["throughput/mfu"] == pytest.approx(row["throughput/tflops"] / peak, rel=1e-12)
        assert row["throughput/samples_per_s"] == pytest.approx((at - first) * B / seconds, rel=1e-12)
        # measured apart, over the same steps: the two clocks are read microseconds apart at each
        # end; 25% leaves room for a scheduler pause between them on a loaded machine
        assert seconds == pytest.approx(clock[at] - clock[first], rel=0.25)
        assert "throughput/tokens_per_s" not in row  # float inputs: no token ids


def test_under_accumulate_the_flops_of_a_step_double():
    rows = logged_by([lt.throughput(peak=1.0)], lt.accumulate(lt.train_step(square), 2), linear_state(),
                     batches(40), log_every=10)
    row = rows[10]
    assert row["throughput/flops_per_step"] == 2 * 4 * B * D * D
    assert row["throughput/samples_per_s"] == pytest.approx(2 * 9 * B / row["throughput/seconds"], rel=1e-12)
    assert row["throughput/tflops"] == pytest.approx(2 * 4 * B * D * D * 9 / row["throughput/seconds"] / 1e12)


def test_flops_given_or_disabled():
    rows = logged_by([lt.throughput(flops=1e9, peak=4.0)], lt.train_step(square), linear_state(), batches(20),
                     log_every=10)
    row = rows[10]
    assert row["throughput/flops_per_step"] == 1e9
    assert row["throughput/mfu"] == pytest.approx(1e9 * 9 / row["throughput/seconds"] / 1e12 / 4.0, rel=1e-12)
    rows = logged_by([lt.throughput(flops=False)], lt.train_step(square), linear_state(), batches(20), log_every=10)
    assert {k for k in rows[10] if k.startswith("throughput/")} == {"throughput/seconds", "throughput/samples_per_s"}


def test_on_the_cpu_tflops_is_logged_and_mfu_is_not():
    rows = logged_by([lt.throughput()], lt.train_step(square), linear_state(), batches(10), log_every=5)
    assert "throughput/tflops" in rows[5] and "throughput/mfu" not in rows[5]


def test_the_count_is_kept_for_the_same_step_and_batches_and_redone_for_other_batch_shapes():
    step, state, hook = lt.train_step(square), linear_state(), lt.throughput(peak=1.0)
    counted = Counted(hook)
    state = lt.run(step, state, batches(10), log_every=5, hooks=[counted], progress=False)
    assert hook.flops == 4 * B * D * D
    counted.calls.clear()
    state = lt.run(step, state, batches(10), max_epochs=2, log_every=5, hooks=[counted], progress=False)
    assert counted.calls == [11, 15, 20]  # no count: the window starts at the first step
    assert hook.flops == 4 * B * D * D
    counted.calls.clear()
    lt.run(step, state, batches(10, b=2 * B), max_epochs=3, log_every=5, hooks=[counted], progress=False)
    assert counted.calls == [21, 22, 25, 30]  # the first step shows other shapes: counted at the next
    assert hook.flops == 4 * 2 * B * D * D


def test_an_evaluation_inside_the_counted_step_is_counted_again_then_warned_about():
    ev = lt.eval_step(square)
    rows = logged_by([lt.throughput()], lt.train_step(square), linear_state(), batches(10), log_every=5,
                     eval_step=ev, eval_data=batches(1), eval_every=3)
    assert rows[5]["throughput/flops_per_step"] == 4 * B * D * D  # evaluated at 3 only, not at step 1
    with pytest.warns(RuntimeWarning, match=r"lt.throughput: an evaluation ran at each of the 3 steps"):
        rows = logged_by([lt.throughput()], lt.train_step(square), linear_state(), batches(10), log_every=5,
                         eval_step=ev, eval_data=batches(1), eval_every=1)
    assert rows[5]["throughput/flops_per_step"] == 4 * B * D * D + 2 * B * D * D  # one eval forward too


def test_the_flop_counter_is_left_on_an_error_in_the_counted_step():
    def failing(model, x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        lt.run(lt.train_step(failing), linear_state(), batches(3), hooks=[lt.throughput()], progress=False)
    assert _get_current_dispatch_mode() is None
    with pytest.raises(RuntimeError, match="boom"):  # and the hook's next run counts afresh
        hook = lt.throughput()
        lt.run(lt.train_step(failing), linear_state(), batches(3), hooks=[hook], progress=False)
    lt.run(lt.train_step(square), linear_state(), batches(3), hooks=[hook], progress=False, log_every=2)
    assert hook.flops == 4 * B * D * D and _get_current_dispatch_mode() is None


# --- samples/s and tokens/s ------------------------------------------------------------------

V, T = 48, 12


def token_state() -> lt.State:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(V, D), torch.nn.Linear(D, V, bias=False))
    return lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def next_token(model, batch):
    ids, targets = batch
    return F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())


def token_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randint(V, (B, T), generator=gen), torch.randint(V, (B, T), generator=gen)) for _ in range(n)]


def test_samples_and_tokens_per_second_are_micro_steps_times_batch_over_seconds():
    step = lt.accumulate(lt.train_step(next_token), 2)
    rows = logged_by([lt.throughput()], step, token_state(), token_batches(24), log_every=4)
    for at, first in ((4, 1), (8, 4), (12, 8)):
        row, micros = rows[at], 2 * (at - first)
        assert row["throughput/samples_per_s"] == pytest.approx(micros * B / row["throughput/seconds"], rel=1e-12)
        assert row["throughput/tokens_per_s"] == pytest.approx(micros * B * T / row["throughput/seconds"], rel=1e-12)
    # the embedding is a lookup; the head's mm forward 2·(B·T)·D·V, backward its input's and its
    # weight's gradients, as much each; two micro-steps a step
    assert rows[4]["throughput/flops_per_step"] == 2 * 6 * B * T * D * V


def test_samples_and_tokens_given_as_functions():
    def loss(model, batch):
        return next_token(model, (batch["ids"], batch["targets"]))

    data = [{"mask": torch.ones(B, T), "ids": ids, "targets": y} for ids, y in token_batches(10)]
    rows = logged_by([lt.throughput(flops=False, samples=lambda b: 3, tokens=lambda b: int(b["mask"].sum()) // 2)],
                     lt.train_step(loss), token_state(), data, log_every=5)
    row = rows[5]
    assert row["throughput/samples_per_s"] == pytest.approx(4 * 3 / row["throughput/seconds"], rel=1e-12)
    assert row["throughput/tokens_per_s"] == pytest.approx(4 * B * T // 2 / row["throughput/seconds"], rel=1e-12)


# --- called at log points only ---------------------------------------------------------------

class Watched(Mapping):
    """Metrics that record every read of their values."""

    reads: list[str] = []

    def __init__(self, **values):
        self._values = values

    def __getitem__(self, name):
        Watched.reads.append(name)
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        Watched.reads.append("iter")
        return iter(self._values)

    def __len__(self):
        return len(self._values)


def test_the_monitors_are_called_at_log_points_only_and_do_not_read_the_metrics():
    def step(state, x):
        loss = square(state.model, x)
        lt.backward(loss)
        lt.optimizer_step(state.optimizer)
        return state, Watched(loss=loss.detach())

    monitors = [Counted(lt.throughput()), Counted(lt.memory_monitor()), Counted(lt.lr_monitor(every=15))]
    Watched.reads.clear()
    lt.run(step, linear_state(), batches(32), log_every=10, hooks=monitors, progress=False)
    assert monitors[0].calls == [1, 10, 20, 30]  # the first step (count, start the window), the log points
    assert monitors[1].calls == [10, 20, 30]
    assert monitors[2].calls == [15, 30]
    assert [m.ends for m in monitors] == [[32]] * 3  # and the end (which logs the last 2 steps)
    assert Watched.reads == []  # no logger, no bar, one process: nobody converted the metrics


def test_without_log_points_nothing_is_counted_or_called():
    hook = Counted(lt.throughput())
    lt.run(lt.train_step(square), linear_state(), batches(5), log_every=None, hooks=[hook], progress=False)
    assert hook.calls == [] and hook.hook.flops is None


# --- memory and learning rates ---------------------------------------------------------------

def test_memory_monitor_logs_the_peak_rss_on_the_cpu():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    rows = logged_by([lt.memory_monitor(every=5)], lt.train_step(square), linear_state(), batches(10), log_every=None)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    assert sorted(rows) == [5, 10]
    assert set(rows[5]) == {"memory/max_rss_gb"}
    assert before <= rows[5]["memory/max_rss_gb"] <= rows[10]["memory/max_rss_gb"] <= after


def test_lr_monitor_logs_each_group_as_the_scheduler_sets_it():
    def groups(model):
        return [{"params": [model.weight], "momentum": 0.9},
                {"params": [model.bias], "lr": 0.01, "momentum": 0.5, "name": "bias"}]

    lambdas = [lambda s: 1 / (1 + s), lambda s: 0.5 ** s]
    torch.manual_seed(0)
    model = torch.nn.Linear(D, D)
    optimizer = torch.optim.SGD(groups(model), lr=0.1)
    state = lt.State(model=model, optimizer=optimizer,
                     scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas))
    rows = logged_by([lt.lr_monitor(momentum=True)], lt.train_step(square), state, batches(10), log_every=4)
    reference = torch.optim.SGD(groups(torch.nn.Linear(D, D)), lr=0.1)  # plain PyTorch, stepped as often
    schedule = torch.optim.lr_scheduler.LambdaLR(reference, lambdas)
    for n in range(1, 11):
        reference.step()
        schedule.step()
        if n in rows:
            assert rows[n]["lr/0"] == reference.param_groups[0]["lr"] == pytest.approx(0.1 / (1 + n))
            assert rows[n]["lr/bias"] == reference.param_groups[1]["lr"] == pytest.approx(0.01 * 0.5 ** n)
            assert (rows[n]["momentum/0"], rows[n]["momentum/bias"]) == (0.9, 0.5)
    assert sorted(rows) == [4, 8, 10]


def test_lr_monitor_names_with_several_optimizers_and_one_group():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(D, D, bias=False), torch.nn.Linear(D, D)
    state = {"model": a, "head": b, "optimizer": torch.optim.Adam(a.parameters(), lr=1e-3, betas=(0.8, 0.99)),
             "head_opt": torch.optim.SGD([{"params": [b.weight]}, {"params": [b.bias], "lr": 0.5}], lr=0.2),
             "step": 0, "micro_step": 0}

    def step(state, x):
        lt.backward(square(state["model"], x) + square(state["head"], x))
        lt.optimizer_step(state["optimizer"])
        lt.optimizer_step(state["head_opt"])
        return state, {}

    rows = logged_by([lt.lr_monitor(momentum=True)], step, state, batches(2), log_every=2)
    assert rows[2] == {"lr": 1e-3, "epoch": 0,  # (lt.run's own logging)
                       "lr/optimizer": 1e-3, "momentum/optimizer": 0.8, "lr/head_opt/0": 0.2,
                       "momentum/head_opt/0": 0.0, "lr/head_opt/1": 0.5, "momentum/head_opt/1": 0.0}
    single = logged_by([lt.lr_monitor()], lt.train_step(square), linear_state(lr=0.3), batches(2), log_every=2)
    assert single[2]["lr"] == 0.3


# --- the peak table --------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "model"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100-SXM4-40GB", "A100"), ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", None), ("Tesla T4", None),
    ("v4-8", "TPU v4"), ("v5litepod-16", "TPU v5e"), ("TPU v5 lite", "TPU v5e"), ("v5p-128", "TPU v5p"),
    ("TPU v5", "TPU v5p"), ("v6e", "TPU v6e"), ("TPU v4", "TPU v4"), ("cpu", None),
])
def test_device_names_map_to_the_table(name, model):
    assert device_model(name) == model


@pytest.mark.parametrize(("name", "dtype", "peak"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.5), ("NVIDIA H100 80GB HBM3", "fp8", 1979.0),
    ("NVIDIA H100 80GB HBM3", "tf32", 494.5), ("NVIDIA H100 80GB HBM3", "fp32", 67.0),
    ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H200", "fp16", 989.5), ("NVIDIA H200 NVL", "bf16", 835.5),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA A100-PCIE-40GB", "tf32", 156.0),
    ("NVIDIA A100-SXM4-80GB", "fp8", None), ("NVIDIA L4", "bf16", 121.0), ("NVIDIA L4", "fp8", 242.5),
    ("v4-8", "bf16", 275.0), ("v5litepod-8", "bf16", 197.0), ("v5p-8", "bf16", 459.0), ("v5p-8", "fp32", None),
    ("Tesla T4", "fp16", None),
])
def test_peak_tflops(name, dtype, peak):
    assert peak_tflops(name, dtype) == peak


def test_peak_dtype_of_a_precision():
    assert [matmul_dtype(p) for p in (None, "32-true", "bf16-mixed", "bf16-true", "16-mixed", "64-true",
                                      "torchao-float8")] == ["fp32", "fp32", "bf16", "bf16", "fp16", None, "fp8"]
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert matmul_dtype(None) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    with pytest.raises(ValueError, match=r"peak_tflops: unknown dtype 'int8'; expected one of: 'fp32'"):
        peak_tflops("NVIDIA L4", "int8")


# --- bad options -----------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda: lt.throughput(flops=0), ValueError, r"lt.throughput: flops must be None \(count them\), False"),
    (lambda: lt.throughput(flops=True), ValueError, r"flops must be .* got True"),
    (lambda: lt.throughput(peak=-1), ValueError, r"lt.throughput: peak must be a positive number .* got -1"),
    (lambda: lt.throughput(samples=3), TypeError, r"lt.throughput: samples must be a function batch -> int"),
    (lambda: lt.throughput(every=0), ValueError, r"lt.throughput: every must be a positive int"),
    (lambda: lt.memory_monitor(every=2.5), ValueError, r"lt.memory_monitor: every must be a positive int .* 2.5"),
    (lambda: lt.lr_monitor(every=True), ValueError, r"lt.lr_monitor: every must be a positive int .* True"),
])
def test_bad_options(make, error, message):
    with pytest.raises(error, match=message):
        make()


# --- 2 processes -----------------------------------------------------------------------------

class Keep:
    """Keeps what was logged on this rank (loggers run on rank 0 only)."""

    __name__ = "keep"
    reads_state = False

    def __init__(self):
        self.logged = {}

    def __call__(self, state, run):
        self.logged[run.step] = {k: v for k, (at, v) in run.logged.items() if at == run.step}


def two_ranks() -> list[dict[int, dict[str, float]]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keep = Keep()
        keep.next_step = lambda step: (step // 5 + 1) * 5
        lt.run(lt.distribute(lt.train_step(square), "ddp"), linear_state(d=8), batches(10, b=4, d=8),
               log_every=5, hooks=[lt.throughput(peak=1.0), lt.memory_monitor(), keep], progress=False)
    from ltransform.distributed import env

    return env.all_gather_objects(keep.logged)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_on_two_ranks_samples_count_both_processes_and_every_rank_logs_the_same():
    first, second = lt.launch(two_ranks, devices=2)
    assert first == second  # the longest rank's seconds, the largest peak memory: the same everywhere
    for at, start in ((5, 1), (10, 5)):
        row = first[at]
        assert row["throughput/samples_per_s"] == pytest.approx((at - start) * 4 * 2 / row["throughput/seconds"],
                                                                rel=1e-12)
        assert row["throughput/flops_per_step"] == 4 * 4 * 8 * 8  # a process's own batch
        assert row["memory/max_rss_gb"] > 0


def test_a_compiled_model_is_not_counted_so_torch_compile_keeps_compiling_it(capsys):
    graphs = []

    def backend(gm, example_inputs):  # torch.compile's backend: count the graphs it is given
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    compiled = torch.compile(model, backend=backend)
    data = [(torch.randn(4, 8), torch.randn(4, 1)) for _ in range(6)]
    logged = []
    lt.run(lt.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])),
           lt.State(model=compiled, optimizer=torch.optim.SGD(compiled.parameters(), lr=0.1)), data,
           progress=False, log_every=2, loggers=[lambda m, s: logged.append(dict(m))], hooks=[lt.throughput()])
    assert graphs  # compiled: FlopCounterMode was not entered around it
    assert "the model is compiled" in capsys.readouterr().err
    assert "throughput/samples_per_s" in logged[-1] and "throughput/tflops" not in logged[-1]
