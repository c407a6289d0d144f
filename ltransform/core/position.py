"""Where ``lt.run`` is in its data, for checkpoints: the epoch, the batches of it consumed, and
the torch RNG state its data iterator was created with (a shuffling ``DataLoader`` draws its
order from it), so a resumed run replays the same order and skips what was done.

It lives in ``core`` because checkpoints read what the runner writes here; the runner hands it
to them explicitly (``lt.save(..., run=run)``), there is no module-level state."""

from __future__ import annotations

from typing import Any

import torch


class Position:
    """The data position of the run in progress; the runner updates it where hooks can see it."""

    __slots__ = ("epoch", "batches", "epoch_rng", "precision")

    def __init__(self, precision: str | None = None) -> None:
        self.precision = precision  # the step's precision name, for checkpoint metadata
        self.epoch = 0
        self.batches = 0  # batches of this epoch consumed
        self.epoch_rng: torch.Tensor | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, "epoch_rng": self.epoch_rng}
