import torch


def pytest_configure(config):
    torch.set_num_threads(1)  # deterministic and fair on a 2-core machine
