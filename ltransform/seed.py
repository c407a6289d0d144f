"""``seed_everything``: one seed for Python, NumPy (if installed) and torch."""

from __future__ import annotations

import os
import random
import sys


def seed_everything(seed: int = 0) -> int:
    """Seed ``random``, NumPy (when installed) and torch on every device; returns the seed.

    Also sets ``LT_SEED`` so processes started later (workers, ranks) can read it.

    Example:
        >>> import torch, ltransform as lt
        >>> _ = lt.seed_everything(7); a = torch.rand(1); _ = lt.seed_everything(7)
        >>> bool(torch.rand(1) == a)
        True
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed_everything: seed must be an int in [0, 2**32), got {seed!r}")
    import torch

    random.seed(seed)
    if "numpy" in sys.modules or _has_numpy():
        import numpy

        numpy.random.seed(seed)
    torch.manual_seed(seed)  # seeds every device, CUDA included
    os.environ["LT_SEED"] = str(seed)
    return seed


def _has_numpy() -> bool:
    import importlib.util

    return importlib.util.find_spec("numpy") is not None
