"""``seed_everything``: one seed for Python, NumPy (if installed) and torch, and per-rank DataLoader workers."""

from __future__ import annotations

import hashlib
import os
import random
import sys


def seed_everything(seed: int = 0, *, workers: bool = True) -> int:
    """Seed ``random``, NumPy (when installed) and torch on every device; returns the seed.

    Also sets ``LT_SEED`` so processes started later (workers, ranks) can read it, and
    ``LT_SEED_WORKERS`` (``1`` or ``0``), which ``lt.run`` reads when it splits a ``DataLoader``
    across ranks.

    Args:
        seed: an int in ``[0, 2**32)``.
        workers: give each DataLoader worker of ``lt.run``'s per-rank loaders its own seed, mixed
            from the loader's seed, the rank and the worker id (:func:`seed_worker`), so random
            augmentations differ across ranks. Off, worker k of every rank draws the same numbers
            (plain torch). On also when ``seed_everything`` is never called.

    Returns:
        ``seed``.

    Raises:
        ValueError: ``seed`` is not an int in ``[0, 2**32)``.
        TypeError: ``workers`` is not a bool.

    Example:
        >>> import torch, ltransform as lt
        >>> _ = lt.seed_everything(7); a = torch.rand(1); _ = lt.seed_everything(7)
        >>> bool(torch.rand(1) == a)
        True
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed_everything: seed must be an int in [0, 2**32), got {seed!r}")
    if not isinstance(workers, bool):
        raise TypeError(f"seed_everything: workers must be True or False, got {workers!r}")
    import torch

    random.seed(seed)
    if "numpy" in sys.modules or _has_numpy():
        import numpy

        numpy.random.seed(seed)
    torch.manual_seed(seed)  # seeds every device, CUDA included, but not XLA's
    from ltransform.distributed.env import on_xla

    if "torch_xla.core.xla_model" in sys.modules or on_xla():
        from ltransform.distributed import xla

        xla.seed(seed)
    os.environ["LT_SEED"] = str(seed)
    os.environ["LT_SEED_WORKERS"] = "1" if workers else "0"
    return seed


def workers_seeded() -> bool:
    """Whether ``lt.run`` seeds DataLoader workers per rank: yes unless ``seed_everything(workers=False)``."""
    return os.environ.get("LT_SEED_WORKERS", "1") != "0"


def seed_worker(worker_id: int, *, rank: int) -> None:
    """A DataLoader ``worker_init_fn`` seeding torch, ``random`` and NumPy from (loader seed, rank, worker).

    torch seeds worker k with ``base + k``, where ``base`` is drawn from the main process's RNG: the
    same on every rank after ``seed_everything``, so worker k of every rank would repeat the same
    augmentations. A hash of (``base``, rank, worker) differs for every pair, and ``base`` keeps
    a seeded run reproducible. Module-level, so ``functools.partial(seed_worker, rank=r)`` pickles
    for spawn and forkserver workers. ``lt.run`` installs it on the loaders it splits.

    Args:
        worker_id: the worker's index, as the DataLoader passes it.
        rank: this process's global rank.

    Example:
        >>> import functools, torch
        >>> from ltransform.seed import seed_worker
        >>> loader = torch.utils.data.DataLoader(range(4), num_workers=2,
        ...                                      worker_init_fn=functools.partial(seed_worker, rank=1))
        >>> sorted(int(x) for x in loader)
        [0, 1, 2, 3]
    """
    import torch

    base = torch.initial_seed() - worker_id  # torch seeded this worker with base + worker_id
    digest = hashlib.blake2b(f"{base},{rank},{worker_id}".encode(), digest_size=16).digest()
    seed = int.from_bytes(digest[:8], "little")
    random.seed(seed)
    torch.manual_seed(seed)
    if "numpy" in sys.modules or _has_numpy():
        import numpy

        # other words than ``random``'s: the same words would make both Mersenne Twisters draw alike
        numpy.random.seed([int.from_bytes(digest[i:i + 4], "little") for i in (8, 12)])


def _has_numpy() -> bool:
    import importlib.util

    return importlib.util.find_spec("numpy") is not None
