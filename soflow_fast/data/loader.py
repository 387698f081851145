"""An in-memory, seeded, resumable batch loader (the digits data; other loaders share its interface).

The order of an epoch is a permutation drawn from (seed, epoch), so the position (epoch, index) of the GLOBAL batch
stored in a checkpoint is enough to continue exactly where a run stopped, on any world size: rank r of W takes rows
[r B/W, (r+1) B/W) of each global batch of B rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class TensorLoader:
    def __init__(self, x: Tensor, y: Optional[Tensor], batch_size: int, seed: int, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1):
        if batch_size > x.shape[0]:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({x.shape[0]} samples)")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the world size {world_size}")
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.local = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.device = torch.device(device)
        self.epoch, self.index = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.x.shape[0], generator=g)

    @property
    def batches_per_epoch(self) -> int:
        return self.x.shape[0] // self.batch_size  # drop_last, as the reference

    def next(self) -> tuple[Tensor, Optional[Tensor]]:
        """This rank's rows of the next global batch."""
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        idx = self._perm[self.index * self.batch_size:(self.index + 1) * self.batch_size][self.local]
        self.index += 1
        x = self.x[idx].to(self.device, non_blocking=True)
        y = None if self.y is None else self.y[idx].to(self.device, non_blocking=True)
        return x, y

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._perm = self._permutation(self.epoch)
