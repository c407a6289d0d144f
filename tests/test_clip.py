"""clip_gradients against torch's clip_grad_norm_ / clip_grad_value_ in a plain loop."""

import math

import pytest
import torch
from torch.nn.utils import clip_grad_norm_, clip_grad_value_

import ltransform as lt
from helpers import assert_same_params, make_data, make_model, mse, sgd


def _reference(clip):
    ref = make_model()
    opt = sgd(ref)
    for batch in make_data():
        mse(ref, batch).backward()
        clip(list(ref.parameters()))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return ref


@pytest.mark.parametrize(("options", "clip"), [
    ({"max_norm": 0.3}, lambda p: clip_grad_norm_(p, 0.3)),
    ({"max_norm": 0.3, "norm_type": math.inf}, lambda p: clip_grad_norm_(p, 0.3, norm_type=math.inf)),
    ({"max_value": 0.05}, lambda p: clip_grad_value_(p, 0.05)),
    ({"max_value": 0.05, "max_norm": 0.1}, lambda p: (clip_grad_value_(p, 0.05), clip_grad_norm_(p, 0.1))),
])
def test_clipping_is_bitwise_equal_to_torch_in_a_plain_loop(options, clip):
    ref = _reference(clip)
    model = make_model()
    lt.run(lt.clip_gradients(lt.train_step(mse), **options), lt.State(model=model, optimizer=sgd(model)),
           make_data(), progress=False)
    assert_same_params(model, ref, exact=True)


@pytest.mark.parametrize(("options", "message"), [
    ({}, "give max_norm=..., max_value=... or both"),
    ({"max_norm": 0}, "max_norm must be a positive finite number, got 0"),
    ({"max_value": -1.0}, "max_value must be a positive finite number, got -1.0"),
    ({"max_norm": math.inf}, "max_norm must be a positive finite number, got inf"),
    ({"max_norm": True}, "max_norm must be a positive finite number, got True"),
])
def test_bad_limits_are_rejected_when_applied(options, message):
    with pytest.raises(ValueError, match=message):
        lt.clip_gradients(**options)


def test_grad_norm_is_reported_as_a_tensor_metric():
    model = make_model()
    _, metrics = lt.clip_gradients(lt.train_step(mse), max_norm=1.0)(
        lt.State(model=model, optimizer=sgd(model)), make_data(1)[0])
    assert isinstance(metrics["grad_norm"], torch.Tensor) and metrics["grad_norm"] > 0
