"""lt.quantize with bitsandbytes on the CPU: every mode against the fp32 layer it replaces."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import ltransform as lt

bnb = pytest.importorskip("bitsandbytes")  # the `dev` extra installs it; only a bare install lacks it


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 8))


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the linear weights, with a 4-bit layer's quantization state (absmax, ...)."""
    total = 0
    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        if weight is None:
            continue
        total += weight.numel() * weight.element_size()
        state = getattr(weight, "quant_state", None)
        if state is not None:
            total += sum(t.numel() * t.element_size() for t in _tensors(state.as_dict(packed=True)))
        scb = getattr(weight, "SCB", None)
        total += 0 if scb is None else scb.numel() * scb.element_size()
    return total


def _tensors(values):
    return [v for v in values.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("mode, layer, tolerance", [
    ("int8", "Linear8bitLt", 0.02), ("int8-training", "Linear8bitLt", 0.02),
    ("nf4", "Linear4bit", 0.2), ("nf4-dq", "Linear4bit", 0.2),
    ("fp4", "Linear4bit", 0.2), ("fp4-dq", "Linear4bit", 0.2),
])
def test_every_mode_replaces_the_linears_and_stays_close_to_fp32(mode, layer, tolerance):
    reference = model()
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    expected = reference(x)
    quantized = lt.quantize(copy.deepcopy(reference), mode)
    assert [type(m).__name__ for m in quantized if not isinstance(m, torch.nn.ReLU)] == [layer] * 3
    error = ((quantized(x) - expected).norm() / expected.norm()).item()
    assert error < tolerance, error
    trainable = [p.requires_grad for name, p in quantized.named_parameters() if name.endswith("weight")]
    assert trainable == [mode == "int8-training"] * 3  # quantized weights are frozen
    if mode.endswith("-dq"):
        assert quantized[0].weight.quant_state.nested  # the constants are quantized too


@pytest.mark.parametrize("mode, at_least", [("nf4", 3.4), ("fp4", 3.4), ("nf4-dq", 3.7), ("fp4-dq", 3.7),
                                             ("int8", 1.95)])
def test_weight_memory_against_fp16(mode, at_least):
    # 4 bits a weight plus an fp32 absmax per 64 (4.5 bits: 3.56x) or, double-quantized, an
    # int8 one plus a little (~4.1 bits: ~3.9x); int8 plus one fp32 scale per row (~2x)
    big = lambda: torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))  # noqa: E731
    fp16 = weight_bytes(big()) / 2
    ratio = fp16 / weight_bytes(lt.quantize(big(), mode))
    assert ratio >= at_least, ratio


def test_skip_by_name_pattern_or_predicate():
    by_name = lt.quantize(model(), "nf4", skip={"4"})
    assert type(by_name[4]) is torch.nn.Linear and type(by_name[0]).__name__ == "Linear4bit"
    by_glob = lt.quantize(model(), "nf4", skip="[02]")
    assert [type(by_glob[i]) is torch.nn.Linear for i in (0, 2, 4)] == [True, True, False]
    by_predicate = lt.quantize(model(), "int8", skip=lambda name, m: m.out_features < 100)
    assert [type(by_predicate[i]).__name__ for i in (0, 2, 4)] == ["Linear8bitLt", "Linear", "Linear"]


def test_partial_form_in_a_pipe_and_the_stale_optimizer_check():
    m = model()
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    m = lt.pipe(m, lt.quantize("nf4", skip={"4"}))
    with pytest.raises(RuntimeError, match="built before lt.quantize"):
        lt.train_step(lambda mod, b: mod(b).sum())(lt.State(model=m, optimizer=optimizer), torch.ones(2, 256))


def test_errors():
    with pytest.raises(ValueError, match="unknown mode 'int4'; expected one of: 'int8', 'int8-training', 'nf4', "
                                         "'nf4-dq', 'fp4', 'fp4-dq'"):
        lt.quantize(model(), "int4")
    with pytest.raises(TypeError, match="skip must be names/patterns or a predicate"):
        lt.quantize(model(), "nf4", skip=[3])
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        lt.quantize("model", "nf4")


def test_missing_bitsandbytes_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"pip install 'ltransform\[quant\]'"):
        lt.quantize(model(), "nf4")


@pytest.mark.parametrize("mode", ["nf4", "fp4-dq", "int8"])
@pytest.mark.parametrize("sharded", [False, True])
def test_a_quantized_model_saves_and_loads_with_its_quantization_state(tmp_path, mode, sharded):
    quantized = lt.quantize(model(), mode)
    path = lt.save(tmp_path / ("q" if sharded else "q.pt"), lt.State(model=quantized), sharded=sharded)
    torch.manual_seed(42)  # another base model: only the checkpoint can make them agree
    other = lt.quantize(torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                            torch.nn.ReLU(), torch.nn.Linear(64, 8)), mode)
    x = torch.randn(4, 256)
    assert not torch.equal(other(x), quantized(x))
    lt.load(path, lt.State(model=other))
    assert torch.equal(other(x), quantized(x))


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "int8"])
def test_load_state_dict_of_a_quantized_models_state_dict_is_exact(mode):
    # the layers lt.quantize makes load their packed weights and quantization state themselves, so
    # plain torch (strict) loading round-trips; lt.load relies on it
    # (train mode: in eval mode on a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks 4-bit weights in
    # the forward, and a state_dict() after that changes the layer's outputs by itself)
    source = lt.quantize(model(), mode)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(5))
    source(x)  # a forward first: int8 layers move their scales from the weight into their state
    saved = source.state_dict()
    keys = set(saved)
    torch.manual_seed(42)  # another base model
    target = lt.quantize(torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                             torch.nn.ReLU(), torch.nn.Linear(64, 8)), mode)
    copied = copy.deepcopy(target)  # the load hooks follow a copy
    assert not torch.equal(target(x), source(x))
    for loaded in (target, copied):
        result = loaded.load_state_dict(saved, strict=True)
        assert result.missing_keys == [] and result.unexpected_keys == []
        assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
        assert torch.equal(loaded(x), source(x))
        assert loaded[0].weight.data_ptr() != source[0].weight.data_ptr()  # copied, not shared
    assert set(saved) == keys  # the caller's dict is left as it was


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_loading_another_layers_size_fails_and_leaves_the_layer_as_it_was(mode):
    layer = lt.quantize(torch.nn.Sequential(torch.nn.Linear(256, 128)), mode)
    x = torch.randn(4, 256)
    expected = layer(x)
    smaller = lt.quantize(torch.nn.Sequential(torch.nn.Linear(128, 64)), mode).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for 0.weight"):
        layer.load_state_dict(smaller)
    assert torch.equal(layer(x), expected)


def test_bitsandbytes_8bit_optimizer_steps_through_lt_and_round_trips_a_checkpoint(tmp_path):
    def setup():
        m = model()
        return lt.State(model=m, optimizer=bnb.optim.AdamW8bit(m.parameters(), lr=1e-2, min_8bit_size=16))

    x, y = torch.randn(32, 256, generator=torch.Generator().manual_seed(3)), torch.randn(32, 8)
    step = lt.pipe(lt.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])), lt.accumulate(2))
    state = lt.run(step, setup(), [(x, y)] * 8, progress=False, log_every=None)
    assert state.step == 4
    assert state.optimizer.state[state.model[0].weight]["state1"].dtype == torch.uint8  # 8-bit state
    lt.save(tmp_path / "ckpt.pt", state)
    loaded = lt.load(tmp_path / "ckpt.pt", setup())
    a, b = state.optimizer.state[state.model[0].weight], loaded.optimizer.state[loaded.model[0].weight]
    assert torch.equal(a["state1"], b["state1"]) and torch.equal(a["absmax1"], b["absmax1"])
    more = [lt.run(step, s, [(x, y)] * 2, progress=False, log_every=None, max_steps=5) for s in (state, loaded)]
    assert all(torch.equal(p, q) for p, q in zip(more[0].model.parameters(), more[1].model.parameters()))


class Tied(torch.nn.Module):
    """An embedding, a norm, a buffer and two linears, one sharing the embedding's weight (stored
    once, as checkpoints of tied models are)."""

    def __init__(self):
        super().__init__()
        self.emb, self.norm = torch.nn.Embedding(50, 64), torch.nn.LayerNorm(64)
        self.fc, self.out = torch.nn.Linear(64, 128), torch.nn.Linear(64, 50, bias=False)
        self.out.weight = self.emb.weight
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, x):
        h = self.norm(self.emb(x)) * self.scale
        return self.out(h) + self.fc(h).sum(-1, keepdim=True)


def stored_weights():
    torch.manual_seed(0)
    reference = Tied()
    reference.scale.fill_(2.0)  # a persistent buffer that differs from its initial value
    weights = {k: v for k, v in reference.state_dict().items() if k != "out.weight"}
    return reference, weights


@pytest.mark.parametrize("source", ["safetensors", "torch", "dict"])
@pytest.mark.parametrize("mode", ["nf4-dq", "int8", "int8-training"])
def test_a_meta_model_quantized_from_weights_equals_the_built_model_quantized(tmp_path, source, mode):
    reference, weights = stored_weights()
    if source == "safetensors":
        from safetensors.torch import save_file

        save_file(weights, tmp_path / "w.safetensors")
        weights = tmp_path / "w.safetensors"
    elif source == "torch":
        torch.save(weights, tmp_path / "w.pt")
        weights = str(tmp_path / "w.pt")
    x = torch.randint(0, 50, (4, 8))
    expected = lt.quantize(copy.deepcopy(reference), mode)(x)
    empty = lt.init_module(Tied, empty=True)
    assert all(p.is_meta for p in empty.parameters())
    quantized = lt.quantize(empty, mode, weights=weights)
    layer = bnb.nn.Linear8bitLt if "int8" in mode else bnb.nn.Linear4bit
    assert type(quantized.fc) is layer and type(quantized.out) is layer
    assert not any(t.is_meta for t in [*quantized.parameters(), *quantized.buffers()])
    assert quantized.scale.item() == 2.0 and torch.equal(quantized.norm.weight, reference.norm.weight)
    assert torch.equal(quantized(x), expected)


def test_weights_load_in_the_models_dtype_and_into_a_partial_form():
    _, weights = stored_weights()
    empty = lt.init_module(Tied, precision="bf16-true", empty=True)
    quantized = lt.pipe(empty, lt.quantize("nf4", skip={"out"}, weights=weights))
    assert quantized.norm.weight.dtype == quantized.emb.weight.dtype == torch.bfloat16
    assert quantized.fc.compute_dtype == torch.bfloat16
    assert quantized.out.weight is quantized.emb.weight  # the unquantized tie is kept
    assert torch.equal(quantized.emb.weight, weights["emb.weight"].to(torch.bfloat16))


def test_quantizing_from_weights_errors(tmp_path):
    _, weights = stored_weights()
    with pytest.raises(ValueError, match=r"the model is on the meta device \(e.g. 'emb.weight'\); pass weights="):
        lt.quantize(lt.init_module(Tied, empty=True), "nf4")
    with pytest.raises(KeyError, match="no tensor for 'fc.bias'"):
        lt.quantize(lt.init_module(Tied, empty=True), "nf4",
                    weights={k: v for k, v in weights.items() if k != "fc.bias"})
    with pytest.raises(KeyError, match="no tensor for 'norm.weight', 'norm.bias'"):
        lt.quantize(lt.init_module(Tied, empty=True), "nf4", weights={k: v for k, v in weights.items()
                                                                      if not k.startswith("norm")})
    with pytest.raises(ValueError,
                       match=r"'fc.weight' is stored with shape \(128, 32\), but the model's is \(128, 64\)"):
        lt.quantize(lt.init_module(Tied, empty=True), "nf4", weights={**weights, "fc.weight": torch.zeros(128, 32)})
    with pytest.raises(FileNotFoundError, match="weights file .*nothing.safetensors' does not exist"):
        lt.quantize(Tied(), "nf4", weights=tmp_path / "nothing.safetensors")
    with pytest.raises(TypeError, match="weights must be a path"):
        lt.quantize(Tied(), "nf4", weights=[1, 2])
    torch.save({"model": weights, "step": 3}, tmp_path / "not_a_state_dict.pt")
    with pytest.raises(ValueError, match="is not a state dict"):
        lt.quantize(Tied(), "nf4", weights=tmp_path / "not_a_state_dict.pt")


_MEMORY_CHILD = """
import sys, threading, time, torch, bitsandbytes, ltransform as lt
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024
build = lambda: torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(32)])
peak, done = [0.0], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon()); time.sleep(0.0005)
base = anon(); sampler = threading.Thread(target=sample); sampler.start()
model = lt.quantize(lt.init_module(build, empty=True), "nf4", weights=sys.argv[1])
done.append(1); sampler.join()
print(peak[0] - base, anon() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_quantizing_from_weights_never_holds_the_full_precision_model(tmp_path):
    import subprocess
    from safetensors.torch import save_file

    full = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(32)])  # 128 MB in fp32
    save_file(full.state_dict(), tmp_path / "w.safetensors")
    size_mb = sum(t.numel() * 4 for t in full.state_dict().values()) / 2**20
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / "w.safetensors")],
                         capture_output=True, text=True, check=True).stdout.split()
    peak, final = map(float, out)
    # measured 41 MB peak (the 4-bit model, 18 MB, plus one layer's quantization temporaries)
    # against 180 MB for building the model, loading it and then quantizing it
    assert peak < 0.5 * size_mb, (peak, size_mb)
    assert final < 0.25 * size_mb, (final, size_mb)


def test_sharding_a_quantized_model_is_refused_with_what_works(one_rank_group):
    """FSDP2 drops bitsandbytes' quantization state (the forward would fail inside bitsandbytes)."""
    model = lt.quantize(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)), "nf4")
    with pytest.raises(NotImplementedError, match=r"shard: '0.weight' is a bitsandbytes-quantized parameter "
                                                  r"\(Params4bit, from lt.quantize\); FSDP2 cannot shard it"):
        lt.shard(model)
