"""lt.add_adapters (LoRA) against a hand-written low-rank update, and a QLoRA finetune end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ltransform as lt


def base():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


DATA = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(i)),
         torch.randn(8, 4, generator=torch.Generator().manual_seed(100 + i))) for i in range(6)]


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def test_a_fresh_adapter_changes_nothing_and_only_adapters_train():
    x = torch.randn(3, 16)
    expected = base()(x)
    model = lt.add_adapters(base(), rank=4)
    assert torch.equal(model(x), expected)  # B starts at zero
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "0.adapter.a", "0.adapter.b", "2.adapter.a", "2.adapter.b"]
    assert set(base().state_dict()) <= set(model.state_dict())  # the base's names are unchanged


def test_training_equals_a_hand_written_lora_loop():
    rank, alpha = 4, 8.0
    model = lt.add_adapters(base(), rank, alpha=alpha)
    # the same adapters, written by hand: W x + b + (alpha / rank) * B A x
    ref = base()
    a = [model[i].adapter.a.detach().clone().requires_grad_() for i in (0, 2)]
    b = [torch.zeros(32, rank, requires_grad=True), torch.zeros(4, rank, requires_grad=True)]

    def ref_forward(x):
        h = torch.tanh(ref[0](x) + (x @ a[0].t() @ b[0].t()) * (alpha / rank))
        return ref[2](h) + (h @ a[1].t() @ b[1].t()) * (alpha / rank)

    ref_opt = torch.optim.SGD([*a, *b], lr=0.5)
    for batch in DATA:
        F.mse_loss(ref_forward(batch[0]), batch[1]).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    state = lt.State(model=model, optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5))
    lt.run(lt.train_step(mse), state, DATA, progress=False, log_every=None)
    for i in (0, 1):
        layer = model[2 * i].adapter
        torch.testing.assert_close(layer.a, a[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.b, b[i], atol=1e-6, rtol=0)
    assert all(torch.equal(p, q) for p, q in zip([model[0].weight, model[2].weight], [ref[0].weight, ref[2].weight]))


def test_qlora_finetune_loss_falls_and_adapters_reload(tmp_path):
    pytest.importorskip("bitsandbytes")
    target = torch.nn.Linear(16, 4)

    def build():
        return lt.pipe(base(), lt.quantize("nf4"), lt.add_adapters(8, alpha=16))

    model = build()
    data = [(x, target(x).detach()) for x, _ in DATA]
    trained = [p for p in model.parameters() if p.requires_grad]
    state = lt.State(model=model, optimizer=torch.optim.AdamW(trained, lr=1e-2))
    losses = []
    state = lt.run(lt.train_step(mse), state, data, max_epochs=15, progress=False, log_every=6,
                   loggers=[lambda m, s: losses.append(m["loss"])])
    assert losses[-1] < 0.5 * losses[0], losses
    assert type(model[0]).__name__ == "Linear4bit" and not model[0].weight.requires_grad
    path = lt.save(tmp_path / "adapters.pt", state, filter=lambda name, t: ".adapter." in name)
    saved = torch.load(path, weights_only=True)["models"]["model"]
    assert sorted(saved) == ["0.adapter.a", "0.adapter.b", "2.adapter.a", "2.adapter.b"]  # small: adapters only
    fresh = build()
    lt.load(path, lt.State(model=fresh), strict=False)
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), model(x))


def test_errors():
    with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
        lt.add_adapters(base(), 0)
    with pytest.raises(ValueError, match="match no linear layer"):
        lt.add_adapters(base(), 2, targets={"head"})
    with pytest.raises(RuntimeError, match="already has adapters"):
        lt.add_adapters(lt.add_adapters(base(), 2), 2)
    pytest.importorskip("bitsandbytes")
    with pytest.raises(RuntimeError, match="quantize must be applied before add_adapters"):
        lt.quantize(lt.add_adapters(base(), 2), "nf4")


def test_targets_by_pattern_or_predicate():
    only_first = lt.add_adapters(base(), 2, targets="0")
    assert hasattr(only_first[0], "adapter") and not hasattr(only_first[2], "adapter")
    wide = lt.add_adapters(base(), 2, targets=lambda name, m: m.out_features > 8)
    assert hasattr(wide[0], "adapter") and not hasattr(wide[2], "adapter")
    assert math.isclose(lt.add_adapters(base(), 4, alpha=2.0)[0].adapter.scale, 0.5)
