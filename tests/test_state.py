"""State: the frozen record, and the one inventory of torch objects in any state."""

import dataclasses

import attrs
import pytest
import torch

import ltransform as lt
from helpers import make_model, sgd
from ltransform.core.inventory import inventory
from ltransform.core.state import advance, read_counters


def test_state_is_frozen_and_validated():
    state = lt.State(model=make_model())
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        state.step = 3
    with pytest.raises(ValueError, match="'step' must be >= 0"):
        lt.State(model=None, step=-1)


def test_modules_and_optimizers_are_found_in_attrs_dataclass_and_dict_states():
    a, b = make_model(), make_model()
    opt = sgd(a)

    @attrs.frozen
    class A:
        nets: dict
        opt: torch.optim.Optimizer

    @dataclasses.dataclass
    class D:
        pair: tuple
        opt: torch.optim.Optimizer

    for state in (A({"g": a, "d": b}, opt), D((a, b), opt), {"x": [a, {"y": b}], "o": opt}):
        inv = inventory(state)
        assert list(inv.models.values()) == [a, b]
        assert list(inv.optimizers.values()) == [opt]


def test_counters_are_replaced_not_edited():
    state = lt.State(model=make_model(), optimizer=None, step=4, micro_step=8, extra={"k": 1})
    new = advance(state, True)
    assert read_counters(new) == (5, 9) and read_counters(state) == (4, 8)
    assert new.extra == {"k": 1} and new.model is state.model
    assert read_counters(advance(new, False)) == (5, 10)
    d = {"model": 1}
    assert advance(d, True) == {"model": 1, "step": 1, "micro_step": 1} and d == {"model": 1}


def test_state_takes_keyword_arguments_only_and_says_so():
    with pytest.raises(TypeError, match=r"keyword arguments only: lt.State\(model=\.\.\., optimizer=\.\.\.\)"):
        lt.State(torch.nn.Linear(1, 1))
