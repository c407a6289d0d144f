"""pipe, compose, partial forms, wrapping, and the errors for bad steps."""

import inspect

import pytest
import torch

import ltransform as lt
from helpers import make_data, make_model, mse, sgd


def test_pipe_and_compose_apply_left_to_right():
    assert lt.pipe(2, lambda x: x + 1, lambda x: x * 3) == 9
    assert lt.compose(lambda x: x + 1, lambda x: x * 3)(2) == 9
    assert lt.pipe(5) == 5


def test_partial_transforms_have_readable_reprs():
    assert repr(lt.accumulate(4)) == "lt.accumulate(n=4)"
    assert repr(lt.with_precision("bf16")) == "lt.with_precision('bf16-mixed')"
    assert repr(lt.clip_gradients(max_norm=1.0)) == "lt.clip_gradients(max_norm=1.0)"
    assert repr(lt.to_precision("16-true")) == "lt.to_precision('16-true')"


def test_transformed_steps_keep_name_doc_and_signature():
    def my_loss(model, batch):
        """My loss."""
        return mse(model, batch)

    step = lt.pipe(lt.train_step(my_loss), lt.accumulate(2), lt.with_precision("bf16-mixed"))
    assert step.__name__ == "my_loss" and step.__doc__ == "My loss."
    assert list(inspect.signature(step).parameters) == ["model", "batch"]


def test_pipe_rejects_a_non_callable_with_the_fix():
    with pytest.raises(TypeError, match=r"pipe: argument 3 is not callable \(got int 4\); pass transforms "
                                        r"in their partial form, e.g. lt.accumulate\(4\)"):
        lt.pipe(lt.train_step(mse), lt.accumulate(2), 4)


@pytest.mark.parametrize("transform", [
    lambda s: lt.accumulate(s, 2), lambda s: lt.with_precision(s, "bf16-mixed"),
    lambda s: lt.clip_gradients(s, max_norm=1.0), lambda s: lt.train_step(s),
])
def test_a_non_callable_step_is_a_type_error(transform):
    with pytest.raises(TypeError, match=r"expected a step function step\(state, batch\) -> \(state, metrics\), "
                                        r"got int 5|expected a step function.*got int 5"):
        transform(5)


def test_a_transform_passed_where_a_step_belongs_says_how_to_compose():
    with pytest.raises(TypeError, match=r"with_precision: got the transform lt.clip_gradients\(max_norm=1.0\) "
                                        r"where a step was expected; apply transforms to a step: lt.pipe"):
        lt.with_precision(lt.clip_gradients(max_norm=1.0), "16-mixed")


@pytest.mark.parametrize(("returned", "message"), [
    (lambda s: torch.tensor(1.0), r"with metrics a dict, got Tensor. "
                                  r"Did you return the loss\? Return \(state, \{'loss': loss\}\)"),
    (lambda s: (s, {}, 1), r"got a tuple of 3"),
    (lambda s: (s, [1.0]), r"got a tuple of 2"),
    (lambda s: None, r"got NoneType"),
])
def test_a_step_returning_the_wrong_shape_is_named(returned, message):
    def bad_step(state, batch):
        return returned(state)

    model = make_model()
    with pytest.raises(TypeError, match=rf"step '.*bad_step' must return .*{message}"):
        lt.run(bad_step, lt.State(model=model, optimizer=sgd(model)), make_data(1), progress=False)


def test_a_loss_function_returning_the_wrong_type_is_named():
    model = make_model()
    with pytest.raises(TypeError, match=r"loss function '.*<lambda>' must return a loss tensor or \(loss, metrics "
                                        r"dict\), got float"):
        lt.train_step(lambda m, b: 1.0)(lt.State(model=model, optimizer=sgd(model)), None)


def test_train_step_needs_exactly_one_model_and_optimizer():
    a, b = make_model(), make_model()
    state = {"a": a, "b": b, "opt": sgd(a)}
    with pytest.raises(TypeError, match=r"expected exactly one model in the state, found 2; .* write the step by hand"):
        lt.train_step(mse)(state, make_data(1)[0])
    with pytest.raises(TypeError, match="the state has no optimizer|exactly one optimizer in the state, found 0"):
        lt.train_step(mse)(lt.State(model=a), make_data(1)[0])


def test_eval_step_takes_metrics_dicts_or_losses_and_does_not_count():
    model = make_model()
    state = lt.State(model=model)
    batch = make_data(1)[0]
    new, metrics = lt.eval_step(mse)(state, batch)
    assert new is state and set(metrics) == {"loss"} and not metrics["loss"].requires_grad
    _, metrics = lt.eval_step(lambda m, b: (mse(m, b), {"n": 3}))(state, batch)
    assert set(metrics) == {"loss", "n"}


def _counted(inner, calls, wraps=True):
    import functools

    def counted(state, batch):
        calls.append(1)
        return inner(state, batch)
    return functools.wraps(inner)(counted) if wraps else counted


def test_a_user_wrapper_outermost_works_and_counts_once():
    calls = []
    step = _counted(lt.pipe(lt.train_step(mse), lt.accumulate(2), lt.clip_gradients(max_norm=1.0)), calls)
    model = make_model()
    state = lt.run(step, lt.State(model=model, optimizer=sgd(model)), make_data(4), progress=False)
    assert len(calls) == 4 and (state.step, state.micro_step) == (2, 4)


def test_our_transform_over_a_user_wrapper_of_our_step_is_rejected_when_composed():
    wrapped = _counted(lt.accumulate(lt.train_step(mse), 2), [])
    with pytest.raises(ValueError, match=r"clip_gradients\(max_norm=1.0\) cannot reach inside '.*mse': it is a "
                                        r"plain function wrapping the transformed step .*; apply clip_gradients"
                                        r"\(max_norm=1.0\) to that step before your wrapper"):
        lt.clip_gradients(wrapped, max_norm=1.0)


def test_the_same_without_functools_wraps_is_caught_at_the_first_call():
    step = lt.clip_gradients(_counted(lt.accumulate(lt.train_step(mse), 2), [], wraps=False), max_norm=1.0)
    model = make_model()
    with pytest.raises(RuntimeError, match=r"was called inside '.*counted', whose transforms "
                                           r"\(clip_gradients\(max_norm=1.0\)\) cannot reach it"):
        step(lt.State(model=model, optimizer=sgd(model)), make_data(1)[0])
