"""What every training loader shares: the `Loader` interface, the order of the rows, and each batch's randomness.

One rule for all of them (digits, latent shards, CIFAR-10, ImageFolder). `batch_size` is the PER-RANK batch b; with
W ranks the global batch is b W. Epoch e is a permutation of all samples drawn from (seed, e), cut into global
batches (drop_last, as the reference); rank r reads rows [r b, (r + 1) b) of each. A batch's randomness (the latent
posterior noise, the x-flip) is drawn for the whole global batch from a generator seeded by (seed, epoch, index), and
each rank keeps its rows. So a global batch, rows and randomness, is the same on any world size (one rank with two
micro-batches of b reads what two ranks of b read), and the position (epoch, index) is the whole state: a resumed run
reads exactly the batches it would have read.
"""
from __future__ import annotations

from typing import Iterator, Optional, Protocol

import numpy as np
import torch
from torch import Tensor

from ..flow import derived_seed


class Loader(Protocol):
    """A training loader: next() -> (x0 [b, C, H, W] float32, labels [b] int64 or None) on the device."""

    def next(self) -> tuple[Tensor, Optional[Tensor]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def epoch_indices(count: int, seed: int, epoch: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """This rank's sample indices for an epoch, [batches * batch_size], in reading order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(count, generator=g).numpy()
    batches = count // (batch_size * world_size)
    mine = perm[:batches * batch_size * world_size].reshape(batches, world_size, batch_size)[:, rank]
    return mine.reshape(-1)


class BatchDraws:
    """The randomness of one global batch, drawn whole from its own generator; this rank gets its rows."""

    def __init__(self, seed: int, epoch: int, index: int, rank: int, world_size: int, batch_size: int,
                 device: torch.device):
        self.generator = torch.Generator(device).manual_seed(derived_seed(seed, epoch, index))
        self.rows = slice(rank * batch_size, (rank + 1) * batch_size)
        self.total, self.device = batch_size * world_size, device

    def randn(self, *shape: int) -> Tensor:
        """Standard-normal draws [b, *shape] for this rank's rows."""
        return torch.randn((self.total, *shape), generator=self.generator, device=self.device)[self.rows]

    def flip(self, x: Tensor) -> Tensor:
        """Each row mirrored left-right with probability 1/2."""
        mask = torch.rand(self.total, generator=self.generator, device=self.device)[self.rows] < 0.5
        return torch.where(mask[:, None, None, None], x.flip(-1), x)


class EpochLoader:
    """The shared part of the loaders: order, position, labels, randomness (module docstring).

    A subclass sets `labels` (int64 [count], or None for unlabelled data) and implements `_read` (this rank's
    remaining batches of an epoch, as index arrays, -> their raw data on the device, in order: a backend may
    prefetch within an epoch) and `_finish` (raw data and the batch's draws -> x0)."""

    labels: Optional[Tensor]

    def __init__(self, count: int, batch_size: int, seed: int, rank: int, world_size: int,
                 device: torch.device | str, source: str):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.count, self.batch_size, self.seed, self.rank, self.world_size = count, batch_size, seed, rank, world_size
        self.device = torch.device(device)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{source}: {count} samples give no full global batch of {batch_size} x {world_size} "
                             "rank(s)")
        self.epoch, self.index = 0, 0
        self._it: Optional[Iterator[Tensor]] = None
        self._order = np.zeros(0, np.int64)

    @property
    def batches_per_epoch(self) -> int:
        return self.count // (self.batch_size * self.world_size)

    def _read(self, batches: list[np.ndarray]) -> Iterator[Tensor]:
        raise NotImplementedError

    def _finish(self, raw: Tensor, draws: BatchDraws) -> Tensor:
        raise NotImplementedError

    def next_raw(self) -> tuple[Tensor, Optional[Tensor], int, int]:
        """(raw data, labels, epoch, index) of the next batch, before its randomness."""
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self._order = epoch_indices(self.count, self.seed, self.epoch, self.rank, self.world_size,
                                        self.batch_size)
            self._it = self._read(list(self._order.reshape(-1, self.batch_size)[self.index:]))
        raw = next(self._it)
        idx = torch.from_numpy(self._order[self.index * self.batch_size:(self.index + 1) * self.batch_size])
        y = None if self.labels is None else self.labels[idx].to(self.device, non_blocking=True)
        epoch, index = self.epoch, self.index
        self.index += 1
        return raw, y, epoch, index

    def next(self) -> tuple[Tensor, Optional[Tensor]]:
        raw, y, epoch, index = self.next_raw()
        draws = BatchDraws(self.seed, epoch, index, self.rank, self.world_size, self.batch_size, self.device)
        return self._finish(raw, draws), y

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._it = int(state["epoch"]), int(state["index"]), None


class TensorLoader(EpochLoader):
    """In-memory tensors (the digits): x [N, C, H, W] float32, y [N] int64 or None."""

    def __init__(self, x: Tensor, y: Optional[Tensor], batch_size: int, seed: int, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1):
        self.x, self.labels = x, y
        super().__init__(x.shape[0], batch_size, seed, rank, world_size, device, "tensor data")

    def _read(self, batches: list[np.ndarray]) -> Iterator[Tensor]:
        for idx in batches:
            yield self.x[torch.from_numpy(idx)].to(self.device, non_blocking=True)

    def _finish(self, raw: Tensor, draws: BatchDraws) -> Tensor:
        return raw
