"""The effect mechanism: defaults, user transforms as peers, explain, frame lifetime."""

import pytest
import torch

import ltransform as lt
from helpers import make_data, make_model, mse, sgd
from ltransform.core.effects import active_frame


def test_effects_without_transforms_are_plain_pytorch():
    model = make_model()
    optimizer = sgd(model)
    ref = make_model()
    ref_opt = sgd(ref)
    batch = make_data(1)[0]
    lt.backward(mse(model, batch))
    assert lt.optimizer_step(optimizer) is True
    mse(ref, batch).backward()
    ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_a_user_transform_is_a_peer_of_the_built_in_ones():
    """A user adds a handler at a fixed stage; it composes with ours in any order."""
    seen = []

    def record_loss(ctx, frame, loss, *, proceed):
        seen.append((ctx, round(loss.item(), 6)))  # the loss after accumulate divided it
        return proceed(frame, loss)

    from ltransform.core.compose import MISSING

    def log_loss(step=MISSING):
        transform = lt.StepTransform(
            name="log_loss()", kind="log_loss", prepare=lambda state: (state, "ctx"),
            handlers=(lt.Handler(effect=lt.Effect.BACKWARD, stage=lt.Stage.LOSS_SCALE, fn=record_loss,
                                 label="log the loss"),))
        return lt.apply_step_transform(step, transform, "log_loss")

    batch = make_data(1)[0]
    for order in ([log_loss(), lt.accumulate(2)], [lt.accumulate(2), log_loss()]):
        model = make_model()
        lt.pipe(lt.train_step(mse), *order)(lt.State(model=model, optimizer=sgd(model)), batch)
    expected = round(mse(make_model(), batch).item() / 2, 6)
    assert seen == [("ctx", expected), ("ctx", expected)]


def test_explain_prints_the_stages_in_the_order_they_run(capsys):
    step = lt.pipe(lt.train_step(mse), lt.clip_gradients(max_norm=1.0), lt.accumulate(4),
                   lt.with_precision("16-mixed"))
    lt.explain(step)
    out = capsys.readouterr().out
    boundary, non_boundary = out.split("non-boundary micro-step")
    opt = boundary.split("optimizer_step:")[1]
    assert opt.index("UNSCALE") < opt.index("CLIP") < opt.index("APPLY") < opt.index("ZERO_GRAD")
    backward = boundary.split("backward:")[1]
    assert backward.index("divide loss by 4") < backward.index("scale loss") < backward.index("loss.backward()")
    assert "micro_step % 4 == 3" in boundary
    assert non_boundary.split("optimizer_step:")[1].strip().splitlines() == [
        "1. [GATE] accumulate: return False, keep gradients"]


def test_the_frame_is_reset_after_a_step_even_when_it_raises():
    def failing(state, batch):
        assert active_frame() is not None
        raise RuntimeError("boom")

    model = make_model()
    with pytest.raises(RuntimeError, match="boom"):
        lt.accumulate(failing, 2)(lt.State(model=model, optimizer=sgd(model)), None)
    assert active_frame() is None


def test_a_step_called_directly_prepares_itself_once():
    prepared = []

    def prepare(state):
        prepared.append(1)
        return state, None

    step = lt.apply_step_transform(lt.train_step(mse), lt.StepTransform(name="p()", kind="p", prepare=prepare), "p")
    model = make_model()
    state = lt.State(model=model, optimizer=sgd(model))
    for batch in make_data(3):
        state, _ = step(state, batch)
    assert prepared == [1] and state.step == 3


def test_same_stage_handlers_nest_by_kind_whatever_the_order_and_explain_agrees(capsys):
    order = []

    def recorder(name):
        def fn(ctx, frame, loss, *, proceed):
            order.append(name)
            return proceed(frame, loss)
        return lt.StepTransform(name=f"{name}()", kind=name, handlers=(
            lt.Handler(effect=lt.Effect.BACKWARD, stage=lt.Stage.LOSS_NORMALIZE, fn=fn, label=f"{name} ran"),))

    def apply(t):
        return lambda step: lt.apply_step_transform(step, t, t.name)

    model = make_model()
    batch = make_data(1)[0]
    for names in (["b_second", "a_first"], ["a_first", "b_second"]):
        step = lt.pipe(lt.train_step(mse), *(apply(recorder(n)) for n in names))
        step(lt.State(model=model, optimizer=sgd(model)), batch)
        lt.explain(step)
        out = capsys.readouterr().out
        assert out.index("a_first ran") < out.index("b_second ran")
    assert order == ["a_first", "b_second"] * 2
