"""accumulate against one k-times-larger batch and against a hand-written loop."""

import pytest
import torch

import ltransform as lt
from helpers import assert_same_params, make_data, make_model, mse, sgd


def test_k_micro_batches_equal_one_batch_k_times_larger():
    micro = make_data(8, batch_size=4)
    big = [(torch.cat([x for x, _ in micro[i:i + 4]]), torch.cat([y for _, y in micro[i:i + 4]]))
           for i in (0, 4)]
    ref = make_model()
    lt.run(lt.train_step(mse), lt.State(model=ref, optimizer=sgd(ref)), big, progress=False)
    model = make_model()
    state = lt.run(lt.accumulate(lt.train_step(mse), 4), lt.State(model=model, optimizer=sgd(model)), micro,
                   progress=False)
    assert (state.step, state.micro_step) == (2, 8)
    assert_same_params(model, ref, exact=False, atol=1e-6)


def test_accumulate_is_bitwise_equal_to_a_hand_written_loop():
    data = make_data(9)
    ref = make_model()
    opt = sgd(ref)
    for i, batch in enumerate(data):
        (mse(ref, batch) / 3).backward()
        if (i + 1) % 3 == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
    model = make_model()
    lt.run(lt.accumulate(lt.train_step(mse), 3), lt.State(model=model, optimizer=sgd(model)), data,
           progress=False)
    assert_same_params(model, ref, exact=True)


def test_non_boundary_micro_steps_keep_gradients_and_return_false():
    results = []

    def my_step(state, batch):
        lt.backward(mse(state.model, batch))
        results.append(lt.optimizer_step(state.optimizer))
        return state, {}

    model = make_model()
    step = lt.accumulate(my_step, 2)
    state = lt.State(model=model, optimizer=sgd(model))
    state, _ = step(state, make_data(1)[0])
    assert results == [False] and all(p.grad is not None for p in model.parameters())
    state, _ = step(state, make_data(1)[0])
    assert results == [False, True] and all(p.grad is None for p in model.parameters())
    assert (state.step, state.micro_step) == (1, 2)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_n_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=rf"accumulate: n must be a positive int .*got {bad!r}"):
        lt.accumulate(lt.train_step(mse), bad)


def test_accumulate_twice_is_rejected_when_composed():
    with pytest.raises(ValueError, match=r"accumulate\(n=2\) cannot be combined with accumulate\(n=4\)"):
        lt.pipe(lt.train_step(mse), lt.accumulate(4), lt.accumulate(2))
