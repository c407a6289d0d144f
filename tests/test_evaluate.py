"""lt.evaluate and lt.predict against hand-written loops, on 1 and 2 ranks (odd dataset lengths
included): batch-size weighted means, the DistributedSampler's padding left out, limit, dataset
order without duplicates, the writer, inference mode, and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import ltransform as lt
from ltransform.distributed import env
from ltransform.runner.evaluate import evaluate
from ltransform.runner.predict import predict


def mse(model, batch):
    x, y = batch
    return {"loss": F.mse_loss(model(x), y), "abs": (model(x) - y).abs().mean()}


def dataset(n: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(n)
    return TensorDataset(torch.randn(n, 8, generator=gen), torch.randn(n, 1, generator=gen))


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))


def by_hand(net, loader, limit=None) -> dict[str, float]:
    """The evaluation written out: each batch's means times its size, over the sample count."""
    sums, count = {"loss": 0.0, "abs": 0.0}, 0
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if limit is not None and i == limit:
                break
            out = net(x)
            sums["loss"] += F.mse_loss(out, y).item() * len(x)
            sums["abs"] += (out - y).abs().mean().item() * len(x)
            count += len(x)
    return {k: v / count for k, v in sums.items()}


def predicted_by_hand(net, data, batch_size=4):
    with torch.no_grad():
        return [row for x, _ in DataLoader(data, batch_size=batch_size) for row in net(x)]


def _on_each_rank() -> dict:
    """Run on each of 2 ranks; rank 0's results are what the tests see."""
    results: dict = {}
    for n in (13, 16):
        net = model()
        loader = DataLoader(dataset(n), batch_size=4)
        results[f"eval_{n}"] = evaluate(lt.eval_step(mse), lt.State(model=net), loader)
        results[f"predict_{n}"] = predict(lambda m, b: m(b[0]), lt.State(model=net), loader)
    net = model()
    results["limited"] = evaluate(lt.eval_step(mse), lt.State(model=net), DataLoader(dataset(13), batch_size=2),
                                  limit=2)
    written: list = []
    got = predict(lambda m, b: m(b[0]), lt.State(model=net), DataLoader(dataset(13), batch_size=4),
                  write=lambda outs, idx: written.append((lt.rank(), idx, [o.clone() for o in outs])))
    results["write_returns"] = got
    results["written"] = env.all_gather_objects(written)
    shuffled = DataLoader(dataset(13), batch_size=4, shuffle=True)
    results["shuffled"] = predict(lambda m, b: m(b[0]), lt.State(model=net), shuffled)
    return results


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return lt.launch(_on_each_rank, devices=2)  # rank 0's results


@pytest.mark.parametrize("n", [13, 16])
def test_evaluate_in_one_process_equals_a_hand_loop(n):
    loader = DataLoader(dataset(n), batch_size=4)
    got = lt.evaluate(lt.eval_step(mse), lt.State(model=model()), loader)
    assert got == pytest.approx(by_hand(model(), loader), rel=1e-6)
    assert all(type(v) is float for v in got.values())


@pytest.mark.parametrize("n", [13, 16])
def test_evaluate_on_2_ranks_equals_one_process_over_the_whole_dataset(two_ranks, n):
    # 13 over 2 ranks: the sampler repeats sample 0 on rank 1, which must not count
    assert two_ranks[f"eval_{n}"] == pytest.approx(by_hand(model(), DataLoader(dataset(n), batch_size=4)), rel=1e-6)


def test_limit_caps_the_batches_per_rank(two_ranks):
    loader = DataLoader(dataset(13), batch_size=2)
    assert lt.evaluate(lt.eval_step(mse), lt.State(model=model()), loader, limit=3) == pytest.approx(
        by_hand(model(), loader, limit=3), rel=1e-6)
    # 2 ranks, 2 batches of 2 each: samples 0, 2, 4, 6 and 1, 3, 5, 7
    subset = torch.utils.data.Subset(dataset(13), list(range(8)))
    assert two_ranks["limited"] == pytest.approx(by_hand(model(), DataLoader(subset, batch_size=8)), rel=1e-6)


def test_evaluate_restores_modes_and_runs_the_steps_precision():
    net = model().train()
    step = lt.pipe(lt.eval_step(lambda m, b: {"dtype": float(m(b[0]).dtype == torch.float64)}),
                   lt.with_precision("64-true"))
    assert lt.evaluate(step, lt.State(model=net), DataLoader(dataset(5), batch_size=2)) == {"dtype": 1.0}
    assert net.training


def test_lt_run_evaluates_with_lt_evaluate():
    net = model()
    state = lt.State(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.0))
    logged = []
    eval_data = DataLoader(dataset(13), batch_size=4)
    lt.run(lt.train_step(lambda m, b: mse(m, b)["loss"]), state, DataLoader(dataset(8), batch_size=4),
           progress=False, log_every=None, eval_step=lt.eval_step(mse), eval_data=eval_data,
           loggers=[lambda m, s: logged.append(dict(m))])
    expected = lt.evaluate(lt.eval_step(mse), lt.State(model=model()), eval_data)
    assert logged[-1]["val_loss"] == pytest.approx(expected["loss"], rel=1e-6)


@pytest.mark.parametrize(("step", "data", "options", "error", "match"), [
    (lt.train_step(lambda m, b: m(b).sum()), [torch.ones(2, 8)], {}, TypeError,
     r"lt.evaluate: got a training step .* pass lt.eval_step\(fn\)"),
    (lt.eval_step(mse), 3, {}, TypeError, r"lt.evaluate: data must be an iterable of batches .* got int"),
    (lt.eval_step(mse), [], {}, ValueError, r"lt.evaluate: data yielded no batches"),
    (lt.eval_step(mse), [torch.ones(1, 8)], {"limit": 0}, ValueError,
     r"lt.evaluate: limit must be a positive int \(batches\), a float in \(0, 1\] .* or None, got 0"),
    ("not a step", [torch.ones(1, 8)], {}, TypeError, r"lt.evaluate: expected a step function"),
])
def test_evaluate_errors_are_clear(step, data, options, error, match):
    with pytest.raises(error, match=match):
        lt.evaluate(step, lt.State(model=model()), data, **options)


def test_predict_in_one_process_returns_one_output_per_sample_in_order():
    data = dataset(13)
    got = lt.predict(lambda m, b: m(b[0]), lt.State(model=model()), DataLoader(data, batch_size=4))
    assert len(got) == 13
    assert torch.equal(torch.stack(got), torch.stack(predicted_by_hand(model(), data)))


def test_predict_on_2_ranks_returns_exactly_the_dataset_in_order(two_ranks):
    for n in (13, 16):
        got = two_ranks[f"predict_{n}"]
        assert len(got) == n  # no repeat of the sampler's padding
        assert torch.allclose(torch.stack(got), torch.stack(predicted_by_hand(model(), dataset(n))), atol=1e-6)
    shuffled = two_ranks["shuffled"]  # the sampler's shuffle is undone too
    assert torch.allclose(torch.stack(shuffled), torch.stack(predicted_by_hand(model(), dataset(13))), atol=1e-6)


def test_predict_hands_each_ranks_outputs_to_the_writer_with_their_indices(two_ranks):
    assert two_ranks["write_returns"] is None
    written = [entry for rank in two_ranks["written"] for entry in rank]
    indices = [i for _, idx, _ in written for i in idx]
    assert sorted(indices) == list(range(13))  # each sample once, the padding left out
    assert {rank for rank, _, _ in written} == {0, 1}
    expected = predicted_by_hand(model(), dataset(13))
    for _, idx, outs in written:
        assert len(idx) == len(outs)
        for i, out in zip(idx, outs):
            assert torch.allclose(out, expected[i], atol=1e-6)


def test_predict_runs_in_inference_mode_in_the_steps_precision_with_models_in_eval_mode():
    seen = []

    def fn(m, b):
        seen.append((torch.is_inference_mode_enabled(), m.training, m(b).dtype))
        return m(b)

    net = torch.nn.Linear(8, 1).train()
    step = lt.pipe(lt.eval_step(fn), lt.with_precision("bf16-mixed"))
    got = lt.predict(step, lt.State(model=net), [torch.ones(3, 8)])
    assert seen == [(True, False, torch.bfloat16)] and len(got) == 3 and net.training


def test_predict_splits_dicts_and_lists_per_sample():
    data = [torch.arange(6.0).reshape(3, 2)]
    got = lt.predict(lambda m, b: {"x": b, "name": "same"}, lt.State(model=model()), data)
    assert [g["x"].tolist() for g in got] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]] and got[0]["name"] == "same"
    names = lt.predict(lambda m, b: [f"s{i}" for i in range(len(b))], lt.State(model=model()), data)
    assert names == ["s0", "s1", "s2"]


@pytest.mark.parametrize(("fn", "options", "error", "match"), [
    (lt.train_step(lambda m, b: m(b).sum()), {}, TypeError, r"lt.predict: got the step .* lt.eval_step\(fn\)"),
    (3, {}, TypeError, r"lt.predict: fn must be a callable fn\(model, batch\) -> output, got int"),
    (lambda m, b: 1.0, {}, TypeError, r"lt.predict: cannot split fn's output \(float\) into its batch's 2 samples"),
    (lambda m, b: b, {"write": "file"}, TypeError, r"lt.predict: write must be a callable"),
])
def test_predict_errors_are_clear(fn, options, error, match):
    with pytest.raises(error, match=match):
        lt.predict(fn, lt.State(model=model()), [torch.ones(2, 8)], **options)


def test_predict_keeps_no_binding_per_call():
    """Each call makes its own step; its binding goes with it instead of staying with the model."""
    import gc

    from ltransform.core.binding import BoundStep

    model = torch.nn.Linear(2, 1)
    state = lt.State(model=model)

    def live() -> int:
        gc.collect()
        return sum(isinstance(o, BoundStep) for o in gc.get_objects())

    predict(lambda m, b: m(b), state, [torch.ones(2, 2)])
    before = live()
    for _ in range(10):
        predict(lambda m, b: m(b), state, [torch.ones(2, 2)])
    assert live() == before
    step = lt.pipe(lt.eval_step(lambda m, b: m(b)), lt.with_precision("bf16-mixed"))
    for _ in range(3):
        predict(step, state, [torch.ones(2, 2)])
    assert live() == before


def test_evaluate_and_lt_run_keep_no_binding_of_a_step_made_per_call():
    """lt.evaluate(lt.eval_step(fn), ...) in a loop, and lt.run's eval step in the training
    precision (a step of its own per run), leave no binding behind on the model."""
    import gc

    from ltransform.core.binding import BoundStep

    def live() -> int:
        gc.collect()
        return sum(isinstance(o, BoundStep) for o in gc.get_objects())

    net = model()
    state = lt.State(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    data = [(torch.randn(4, 8), torch.randn(4, 1))] * 2
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    train = lt.pipe(lt.train_step(loss), lt.with_precision("bf16-mixed"))
    state = lt.run(train, state, data, eval_step=lt.eval_step(loss), eval_data=data, progress=False)
    lt.evaluate(lt.eval_step(loss), state, data)
    before = live()
    for _ in range(3):
        state = lt.run(train, state, data, eval_step=lt.eval_step(loss), eval_data=data, progress=False)
        lt.evaluate(lt.eval_step(loss), state, data)
    assert live() == before
    kept = lt.eval_step(loss)
    assert lt.evaluate(kept, state, data) == lt.evaluate(kept, state, data)


def test_evaluate_takes_a_fraction_of_the_batches():
    data = [torch.full((2, 3), float(i)) for i in range(4)]
    step = lt.eval_step(lambda m, b: {"x": b.mean()})
    assert lt.evaluate(step, lt.State(model=model()), data, limit=0.5) == {"x": 0.5}
    with pytest.raises(ValueError, match=r"lt.evaluate: limit as a float is a fraction of the batches, in \(0, 1\]"):
        lt.evaluate(step, lt.State(model=model()), data, limit=1.5)
