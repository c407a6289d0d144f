"""Order independence: every composition order of the step transforms trains identically."""

import itertools

import pytest
import torch

import ltransform as lt
from helpers import make_data, make_model, mse, sgd


def _train(transforms):
    model = make_model()
    step = lt.pipe(lt.train_step(mse), *transforms)
    state = lt.run(step, lt.State(model=model, optimizer=sgd(model)), make_data(8), progress=False)
    return [p.detach().clone() for p in model.parameters()], state


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true"])
def test_every_permutation_of_precision_accumulate_clip_gives_identical_parameters(precision):
    transforms = [lt.with_precision(precision), lt.accumulate(2), lt.clip_gradients(max_norm=0.2)]
    results = [_train(order) for order in itertools.permutations(transforms)]
    reference, ref_state = results[0]
    assert ref_state.step == 4
    for params, state in results[1:]:
        assert (state.step, state.micro_step) == (ref_state.step, ref_state.micro_step)
        assert all(torch.equal(a, b) for a, b in zip(params, reference))


def test_decorator_and_pipe_forms_build_the_same_pipeline(capsys):
    piped = lt.pipe(lt.train_step(mse), lt.clip_gradients(max_norm=1.0), lt.accumulate(2))

    @lt.accumulate(2)
    @lt.clip_gradients(max_norm=1.0)
    @lt.train_step
    def decorated(model, batch):
        return mse(model, batch)

    lt.explain(piped)
    first = capsys.readouterr().out
    lt.explain(decorated)
    second = capsys.readouterr().out
    def stages(text):
        return [line for line in text.splitlines()[1:] if "call the step" not in line]
    assert stages(first) == stages(second)
    assert len(stages(first)) > 10
