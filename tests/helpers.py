"""Small models, data and reference loops shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def make_data(batches: int = 8, batch_size: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 4, generator=gen), torch.randn(batch_size, 1, generator=gen))
            for _ in range(batches)]


def mse(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def sgd(model: torch.nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module, *, exact: bool = True, atol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == q.dtype, name
        if exact:
            assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item()}"
        else:
            torch.testing.assert_close(p, q, atol=atol, rtol=1e-5, msg=name)


def params_changed(before: list[torch.Tensor], model: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
