"""Every GPU check at full size on CUDA, one test each (skipped without a GPU): the functions that
``python -m ltransform.gpucheck`` runs, here under pytest on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from ltransform.gpucheck.checks import CHECKS, cleanup
from ltransform.gpucheck.common import FULL, Skip, resolve_device

NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("check", [pytest.param(c, id=c.name) for c in CHECKS])
def test_check_on_cuda(check):
    device = resolve_device("cuda")
    cleanup(device)
    try:
        numbers = check.fn(device, FULL)
    except Skip as skip:
        pytest.skip(str(skip))
    finally:
        cleanup(device)
    assert isinstance(numbers, dict)
