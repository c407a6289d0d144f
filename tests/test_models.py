"""Model transforms: to_precision, init_module, materialize."""

import pytest
import torch

import ltransform as lt
from helpers import make_model


@pytest.mark.parametrize(("name", "dtype"), [("bf16-true", torch.bfloat16), ("16-true", torch.float16),
                                             ("64-true", torch.float64), ("bf16-mixed", torch.float32)])
def test_to_precision_casts_floating_weights(name, dtype):
    model = make_model().to(torch.float16) if name == "bf16-mixed" else make_model()
    assert lt.pipe(model, lt.to_precision(name)) is model
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_to_precision_rejects_non_modules_and_unknown_names():
    with pytest.raises(TypeError, match="to_precision: expected a torch.nn.Module, got int"):
        lt.to_precision(3, "bf16-true")
    with pytest.raises(ValueError, match=r"to_precision: unknown precision 'half'; expected one of"):
        lt.to_precision(make_model(), "half")


def test_init_module_builds_in_the_precision_dtype_without_an_fp32_copy():
    model = lt.init_module(torch.nn.Linear, 8, 8, precision="bf16-true")
    assert model.weight.dtype == torch.bfloat16 and model.weight.device.type == "cpu"
    assert torch.get_default_dtype() == torch.float32


def test_empty_init_allocates_nothing_and_materialize_matches_direct_construction():
    model = lt.init_module(lambda: make_model(seed=3), empty=True)
    assert all(p.is_meta for p in model.parameters())
    torch.manual_seed(3)
    lt.materialize(model)
    reference = make_model(seed=3)
    assert all(not p.is_meta for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_materialize_with_a_user_init_function():
    def init(module):
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.constant_(module.weight, 0.5)
            torch.nn.init.zeros_(module.bias)

    model = lt.pipe(lt.init_module(make_model, empty=True), lt.materialize(init=init))
    assert all(torch.all(m.weight == 0.5) for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_init_module_partial_form_and_errors():
    build = lt.init_module(precision="64-true")
    assert build(lambda: torch.nn.Linear(2, 2)).weight.dtype == torch.float64
    with pytest.raises(TypeError, match="init_module: expected a function that builds the model"):
        lt.init_module(3)
    with pytest.raises(TypeError, match="materialize: expected a torch.nn.Module"):
        lt.materialize("x")
