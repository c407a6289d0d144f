import os

import pytest
import torch

# tests/xla runs in its own venv (torch 2.9 + torch_xla 2.9): scripts/test-xla.sh sets this
collect_ignore = [] if os.environ.get("LTRANSFORM_TEST_XLA") else ["xla"]


def pytest_configure(config):
    torch.set_num_threads(1)  # deterministic and fair on a 2-core machine


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank, in this process: lt.shard really shards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
