"""fp8 precisions: torchao's Float8Linear (real, on the CPU, where torch emulates fp8 matmuls)
and Transformer Engine's layer swap (its logic, through tests/doubles: TE needs an fp8 GPU)."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ltransform as lt
from ltransform.models import fp8

DOUBLES = Path(__file__).parent / "doubles"


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64),
                               torch.nn.LayerNorm(64), torch.nn.Linear(64, 10))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def data(n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen)) for _ in range(n)]


def train(model, step, batches, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2)):
    state = lt.State(model=model, optimizer=optimizer(model.parameters()))
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


# --- torchao -------------------------------------------------------------------------------

@pytest.fixture
def torchao():
    return pytest.importorskip("torchao.float8")


def test_torchao_float8_equals_the_hand_written_torchao_loop_bitwise(torchao):
    reference = mlp()
    torchao.convert_to_float8_training(reference, module_filter_fn=lambda m, _: m.out_features % 16 == 0)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for batch in data():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(reference, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model = mlp()  # the optimizer is built before the step swaps the layers: the parameters stay
    with pytest.warns(UserWarning, match=r"1 linear layer\(s\) keep their precision because a dimension is not "
                                         r"a multiple of 16, which fp8 matmuls need: 4"):
        train(model, lt.pipe(lt.train_step(loss_fn), lt.with_precision("torchao-float8")), data())
    assert [type(m).__name__ for m in model] == ["Float8Linear", "GELU", "Float8Linear", "LayerNorm", "Linear"]
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs)


def test_torchao_float8_trains_like_bf16_mixed(torchao):
    batches = data(n=1) * 40  # one batch again and again: the loss must fall to near zero
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 10-class head stays in bf16
        fp8_losses = train(mlp(), lt.pipe(lt.train_step(loss_fn), lt.with_precision("torchao-float8")), batches)
    bf16_losses = train(mlp(), lt.pipe(lt.train_step(loss_fn), lt.with_precision("bf16-mixed")), batches)
    assert fp8_losses[-1] < 0.2 * fp8_losses[0]
    assert max(abs(a - b) for a, b in zip(fp8_losses, bf16_losses)) < 0.05, (fp8_losses, bf16_losses)


def cpu_scaled_mm_is_rowwise() -> bool:
    """Whether the CPU's fp8 matmul takes one scale per row (torch 2.9's takes one per tensor only)."""
    a, b = torch.ones(16, 32, dtype=torch.float8_e4m3fn), torch.ones(16, 32, dtype=torch.float8_e4m3fn).t()
    try:
        torch._scaled_mm(a, b, scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:  # "Now _scaled_mm only supports per-tensor scaling for CPU backend."
        return False
    return True


def test_to_precision_converts_with_skip_and_a_recipe(torchao):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model = lt.pipe(model, lt.to_precision("torchao-float8", skip={"1"}, recipe="rowwise"))
    assert [type(m).__name__ for m in model] == ["Float8Linear", "Linear", "Float8Linear"]
    assert model[0].config == torchao.Float8LinearConfig.from_recipe_name("rowwise")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    config = torchao.Float8LinearConfig()
    assert lt.to_precision(mlp(), "torchao-float8", recipe=config, skip="4")[0].config is config
    if not cpu_scaled_mm_is_rowwise():
        pytest.skip(f"torch {torch.__version__}'s CPU torch._scaled_mm scales per tensor only, so the rowwise "
                    "recipe cannot train here (the conversion above was checked)")
    state = lt.State(model=model, optimizer=optimizer)  # the optimizer built before still holds them
    step = lt.pipe(lt.train_step(lambda m, b: m(b).square().mean()), lt.with_precision("torchao-float8"))
    before = model[0].weight.detach().clone()
    step(state, torch.randn(16, 64))
    assert not torch.equal(before, model[0].weight)


def test_torchao_errors(torchao, monkeypatch):
    with pytest.raises(ValueError, match="unknown torchao float8 recipe 'columnwise'; expected one of: 'tensorwise', "
                                         "'rowwise', 'rowwise_with_gw_hp', or a torchao Float8LinearConfig"):
        lt.to_precision(mlp(), "torchao-float8", recipe="columnwise")
    with pytest.raises(TypeError, match="a torchao recipe is a name .* or a Float8LinearConfig, got int"):
        lt.to_precision(mlp(), "torchao-float8", recipe=3)
    converted = lt.to_precision(mlp(), "torchao-float8", skip="4")
    step = lt.with_precision(lt.train_step(loss_fn), "torchao-float8", recipe="rowwise")
    with pytest.raises(ValueError, match=r"already converted \(by lt.to_precision\), so a torchao recipe here "
                                         r"would not apply; pass it to lt.to_precision"):
        step(lt.State(model=converted, optimizer=torch.optim.SGD(converted.parameters())), data(1)[0])
    compiled = torch.compile(mlp())
    with pytest.raises(RuntimeError, match="to_precision must be applied before torch.compile; reorder: lt.pipe"):
        lt.to_precision(compiled, "torchao-float8")
    checkpointed = lt.checkpoint_activations(mlp(), policy={torch.nn.Linear})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lt.to_precision(checkpointed, "torchao-float8")  # checkpointing first is fine
        lt.checkpoint_activations(lt.to_precision(mlp(), "torchao-float8"), policy={torch.nn.GELU})  # and after
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # a torchao that does not import with this torch
    with pytest.raises(ImportError, match=r"to_precision: torchao \S+ does not import with torch \S+ \(.*\); "
                                          r"install a torchao that does: pip install 'ltransform\[torchao\]'"):
        lt.to_precision(mlp(), "torchao-float8")
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(ImportError, match=r"with_precision\('torchao-float8'\) needs torchao: pip install "
                                          r"'ltransform\[torchao\]'"):
        lt.with_precision("torchao-float8")


def test_recipe_and_skip_belong_to_the_fp8_precisions():
    with pytest.raises(ValueError, match="recipe applies to the fp8 precisions only, not 'bf16-mixed'"):
        lt.with_precision("bf16-mixed", recipe="tensorwise")
    with pytest.raises(ValueError, match="recipe and skip apply to the fp8 precisions only, not 'bf16-true'"):
        lt.to_precision(mlp(), "bf16-true", skip={"0"})


def test_fp8_needs_a_gpu_of_compute_capability_8_9(monkeypatch):
    record = lt.PRECISIONS["torchao-float8"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(RuntimeError, match=r"'torchao-float8' runs fp8 matmuls on an NVIDIA GPU of compute "
                                           r"capability 8.9 or newer \(Ada, Hopper, Blackwell\), but cuda:0 \(NVIDIA "
                                           r"A100-SXM4-80GB\) has compute capability 8.0; use 'bf16-mixed'"):
        fp8.check_one_device(torch.device("cuda", 0), record, "with_precision")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_one_device(torch.device("cuda", 0), record, "with_precision")  # Hopper
    fp8.check_one_device(torch.device("cpu"), record, "with_precision")  # torch emulates it on the CPU


# --- Transformer Engine --------------------------------------------------------------------

def test_transformer_engine_missing_names_the_pip_command():
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    for call in (lambda: lt.with_precision("transformer-engine"), lambda: lt.to_precision(mlp(), "transformer-engine")):
        message = (r"needs transformer_engine: pip install 'ltransform\[te\]' \(or pip "
                   r"install transformer-engine\[pytorch\]; it needs a CUDA build of torch\)")
        with pytest.raises(ImportError, match=message):
            call()


@pytest.fixture
def te(monkeypatch):
    """The Transformer Engine stand-in of tests/doubles, importable for one test."""
    monkeypatch.syspath_prepend(str(DOUBLES))
    for name in [n for n in sys.modules if n.startswith("transformer_engine")]:
        monkeypatch.delitem(sys.modules, name)
    import transformer_engine.pytorch as te

    te.ENTERED.clear()
    yield te
    for name in [n for n in sys.modules if n.startswith("transformer_engine")]:
        del sys.modules[name]


def block(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.GELU(),
                               torch.nn.Linear(128, 64), torch.nn.RMSNorm(64), torch.nn.Linear(64, 10))


def test_transformer_engine_on_the_cpu_is_a_clear_error(te):
    model = block()
    step = lt.with_precision(lt.train_step(loss_fn), "transformer-engine")
    with pytest.raises(RuntimeError, match=r"with_precision: 'transformer-engine' runs fp8 matmuls on an NVIDIA GPU of "
                                           r"compute capability 8.9 or newer .*, but the model is on cpu; move it to "
                                           r"the GPU first, or use 'bf16-mixed'"):
        step(lt.State(model=model, optimizer=torch.optim.SGD(model.parameters())), data(1)[0])
    assert type(model[0]) is torch.nn.Linear and model[0].weight.dtype == torch.float32  # left as it was


@pytest.mark.parametrize("name, dtype", [("transformer-engine", torch.bfloat16),
                                         ("transformer-engine-float16", torch.float16)])
def test_transformer_engine_swaps_layers_keeps_parameters_and_runs_under_its_autocast(te, monkeypatch, name, dtype):
    monkeypatch.setattr(fp8, "check_device", lambda *args: None)  # the stand-in runs on the CPU
    from transformer_engine.common.recipe import DelayedScaling

    recipe = DelayedScaling(margin=1)
    model = block()
    params = {n: p for n, p in model.named_parameters()}
    step = lt.pipe(lt.train_step(loss_fn), lt.with_precision(name, recipe=recipe))
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731 - AdamW's eps is 0 in fp16
    with pytest.warns(UserWarning, match=r"1 linear layer\(s\) keep their precision .*: 5"):
        losses = train(model, step, data(), sgd)
    assert [type(m).__module__ + "." + type(m).__name__ for m in model] == [
        "transformer_engine.pytorch.Linear", "transformer_engine.pytorch.LayerNorm", "torch.nn.modules.activation.GELU",
        "transformer_engine.pytorch.Linear", "transformer_engine.pytorch.RMSNorm", "torch.nn.modules.linear.Linear"]
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameter objects, so the optimizer's
    assert all(p.dtype == dtype for p in model.parameters())
    assert te.ENTERED == [(True, recipe)] * 3  # once per step call, with the recipe
    assert model[0].calls_in_autocast == [True] * 3
    # the stand-in computes as torch does, so the run is the -true run of the unswapped model
    plain = train(block(), lt.pipe(lt.train_step(loss_fn), lt.with_precision(name.replace(
        "transformer-engine-float16", "16-true").replace("transformer-engine", "bf16-true"))), data(), sgd)
    assert losses == plain and losses[-1] < losses[0]


def test_transformer_engine_by_to_precision_before_shard_and_its_errors(te, monkeypatch):
    monkeypatch.setattr(fp8, "check_device", lambda *args: None)
    with pytest.warns(UserWarning, match="keep their precision"):
        model = lt.to_precision(block(), "transformer-engine", skip=lambda name, m: name == "4")
    assert type(model[4]) is torch.nn.RMSNorm and type(model[1]).__name__ == "LayerNorm"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    te.ENTERED.clear()
    train(model, lt.with_precision(lt.train_step(loss_fn), "transformer-engine"), data(1))
    assert te.ENTERED == [(True, None)]  # TE's default recipe
    with pytest.raises(ValueError, match=r"a Transformer Engine recipe applies when the step runs; pass it to "
                                         r"with_precision\(step, 'transformer-engine', recipe=...\)"):
        lt.to_precision(block(), "transformer-engine", recipe=object())
    unusual = torch.nn.Sequential(torch.nn.LayerNorm((4, 16)), torch.nn.LayerNorm(16, bias=False))
    lt.to_precision(unusual, "transformer-engine")
    assert [type(m) for m in unusual] == [torch.nn.LayerNorm] * 2  # TE has no equal of these: left alone
