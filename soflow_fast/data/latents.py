"""Sharded SD-VAE latents (ImageNet) and the resumable loader the trainer reads them with.

A latent directory holds
    manifest.json                 count, sample shape, dtype, classes, per-shard files, counts and sha256 checksums
    shard-00000.npy               [n, 8, h, w] float16/float32: channels 0-3 the posterior mean, 4-7 its std
    shard-00000.labels.npy        [n] int64
written by `soflow-fast prepare-latents` / `convert-latents` (prepare.py).

The loader's order is a pure function of (seed, epoch): one permutation of all samples per epoch, dealt to the
ranks (rank r takes every world_size-th entry), cut into batches (drop_last). The latent noise of batch i of an
epoch comes from a generator seeded by (seed, rank, epoch, i), so the position (epoch, index) is the whole state and
a resumed run reads exactly the batches it would have read. Two backends produce the same (mean, std, label) rows:
a DALI pipeline (readers.numpy, on the GPU with GPUDirect Storage where cuFile supports it) and a plain PyTorch
DataLoader over memory-mapped shards; one shared function turns them into samples (docs/algorithm.md section 6):
x0 = (mean + std * eps) * 0.18215.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from ..flow import derived_seed

log = logging.getLogger("soflow_fast")

FORMAT = "soflow_fast.latents/1"
MANIFEST = "manifest.json"
LATENT_SCALE = 0.18215  # SD-VAE scaling factor


class LatentDataError(ValueError):
    """A latent directory that does not match its manifest (missing, truncated, wrong shape or checksum)."""


def shard_names(k: int) -> tuple[str, str]:
    return f"shard-{k:05d}.npy", f"shard-{k:05d}.labels.npy"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file, reading only its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise LatentDataError(f"{path}: Fortran-ordered array; shards are C-ordered")
        return tuple(shape), np.dtype(dtype), f.tell()


def check_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    """Header shape/dtype as the manifest says, and the file long enough to hold them (a truncated shard fails)."""
    if not path.is_file():
        raise LatentDataError(f"{what}: {path} is missing")
    try:
        got_shape, got_dtype, offset = npy_header(path)
    except (ValueError, OSError) as e:
        raise LatentDataError(f"{what}: {path} is not a readable .npy file ({e})") from e
    if got_shape != tuple(shape) or got_dtype != dtype:
        raise LatentDataError(f"{what}: {path} holds {got_dtype}{list(got_shape)}, the manifest says "
                              f"{dtype}{list(shape)}")
    want = offset + int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size
    if size != want:
        state = "truncated" if size < want else "too long"
        raise LatentDataError(f"{what}: {path} is {size} bytes, expected {want} ({state})")


@dataclass
class LatentShards:
    """A verified view of a latent directory: the manifest, shard offsets, all labels in memory."""
    root: Path
    manifest: dict
    offsets: np.ndarray  # [num_shards + 1] cumulative sample counts
    labels: np.ndarray   # [count] int64

    @classmethod
    def open(cls, root: str | os.PathLike, checksums: bool = False) -> "LatentShards":
        root = Path(root)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise LatentDataError(f"{root}: no {MANIFEST}; not a latent directory (run `soflow-fast prepare-latents`)")
        m = json.loads(mpath.read_text())
        if m.get("format") != FORMAT:
            raise LatentDataError(f"{mpath}: format {m.get('format')!r}, expected {FORMAT!r}")
        dtype, sample = np.dtype(m["dtype"]), tuple(m["sample_shape"])
        counts = [int(s["count"]) for s in m["shards"]]
        if sum(counts) != m["count"]:
            raise LatentDataError(f"{mpath}: shard counts sum to {sum(counts)}, count says {m['count']}")
        labels = []
        for k, s in enumerate(m["shards"]):
            what = f"{mpath} shard {k}"
            check_npy(root / s["file"], (s["count"], *sample), dtype, what)
            check_npy(root / s["labels"], (s["count"],), np.dtype(np.int64), what)
            if checksums:
                for key, file in (("sha256", s["file"]), ("labels_sha256", s["labels"])):
                    got = sha256_file(root / file)
                    if got != s[key]:
                        raise LatentDataError(f"{what}: {root / file} has sha256 {got[:16]}..., the manifest says "
                                              f"{s[key][:16]}... (corrupt or changed since it was written)")
            labels.append(np.load(root / s["labels"]))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        return cls(root, m, offsets, all_labels)

    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["sample_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (shard, row)."""
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        return shard, idx - self.offsets[shard]

    def shard_file(self, k: int) -> str:
        return self.manifest["shards"][k]["file"]


# -- the order, the noise and the sample: shared by both backends -------------------------------------------------
def epoch_indices(count: int, seed: int, epoch: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """This rank's global sample indices for an epoch, [batches * batch_size], in reading order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(count, generator=g).numpy()
    per_rank = count // world_size
    mine = perm[rank::world_size][:per_rank]
    return mine[:(per_rank // batch_size) * batch_size]


def batch_seed(seed: int, rank: int, epoch: int, index: int) -> int:
    return derived_seed(seed, rank, epoch, index)


def latents_to_sample(meanstd: Tensor, generator: torch.Generator, flip: bool) -> Tensor:
    """[B, 8, h, w] posterior (mean, std) -> a fresh SD-VAE sample times 0.18215; optional random x-flip."""
    meanstd = meanstd.float()
    mean, std = meanstd.chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device)
    x0 = (mean + std * eps) * LATENT_SCALE
    if flip:
        mask = torch.rand(x0.shape[0], generator=generator, device=x0.device) < 0.5
        x0 = torch.where(mask[:, None, None, None], x0.flip(-1), x0)
    return x0


# -- backends: each yields (meanstd [B, 8, h, w] on device, any float dtype) for a list of index batches ----------
class _ShardBatches(torch.utils.data.Dataset):
    """Indexed by a whole batch of global indices; reads rows from memory-mapped shards, in the given order."""

    def __init__(self, shards: LatentShards):
        self.shards = shards
        self._maps: dict[int, np.ndarray] = {}  # per worker process (opened lazily after fork)

    def _map(self, k: int) -> np.ndarray:
        if k not in self._maps:
            self._maps[k] = np.load(self.shards.root / self.shards.shard_file(k), mmap_mode="r")
        return self._maps[k]

    def __len__(self) -> int:  # not used: the sampler gives the batches
        return self.shards.count

    def __getitem__(self, idx: np.ndarray) -> Tensor:
        shard, row = self.shards.locate(np.asarray(idx))
        out = np.empty((len(idx), *self.shards.sample_shape), dtype=np.dtype(self.shards.manifest["dtype"]))
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self._map(int(k))[row[sel]]
        return torch.from_numpy(out)


class _TorchBackend:
    name = "torch"

    def __init__(self, shards: LatentShards, device: torch.device, num_workers: int):
        self.shards, self.device, self.num_workers = shards, device, num_workers
        self.dataset = _ShardBatches(shards)

    def iterate(self, batches: list[np.ndarray]) -> Iterator[Tensor]:
        dl = torch.utils.data.DataLoader(self.dataset, sampler=batches, batch_size=None, num_workers=self.num_workers,
                                         pin_memory=self.device.type == "cuda",
                                         persistent_workers=False, prefetch_factor=4 if self.num_workers else None)
        for x in dl:
            yield x.to(self.device, non_blocking=True)


class _DaliBackend:
    name = "dali"

    def __init__(self, shards: LatentShards, device: torch.device, num_threads: int):
        from . import dali

        self.dali = dali
        self.shards, self.device, self.num_threads = shards, device, num_threads

    def iterate(self, batches: list[np.ndarray]) -> Iterator[Tensor]:
        if not batches:
            return
        order = np.concatenate(batches)
        shard, row = self.shards.locate(order)
        files = [self.shards.shard_file(int(k)) for k in shard]
        pipe = self.dali.numpy_rows_pipeline(str(self.shards.root), files, row, len(batches[0]),
                                             self.shards.sample_shape, self.device, self.num_threads)
        for _ in batches:
            yield self.dali.run_to_torch(pipe, self.device)[0].flatten(0, 1)
        del pipe


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class LatentLoader:
    """next() -> (x0 [B, 4, h, w] float32, y [B] int64) on the device; state_dict() = {'epoch', 'index'}."""

    def __init__(self, path: str | os.PathLike, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", backend: str = "auto", flip: bool = False,
                 num_workers: int = 0, checksums: bool = False):
        self.shards = LatentShards.open(path, checksums=checksums)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.device, self.flip = torch.device(device), flip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if self.batches_per_epoch == 0:
            raise ValueError(f"{path}: {self.shards.count} samples over {world_size} rank(s) give no full batch of "
                             f"{batch_size}")
        if backend == "auto":
            backend = "dali" if dali_available() else "torch"
        if backend == "dali":
            if not dali_available():
                raise ValueError("latent loader backend 'dali' requested but nvidia-dali is not installed "
                                 "(pip install nvidia-dali-cuda130)")
            self._backend = _DaliBackend(self.shards, self.device, max(1, num_workers))
        elif backend == "torch":
            self._backend = _TorchBackend(self.shards, self.device, num_workers)
        else:
            raise ValueError(f"latent loader backend {backend!r}: expected 'auto', 'dali' or 'torch'")
        self.backend = backend
        self.labels = torch.from_numpy(self.shards.labels)
        self.epoch, self.index = 0, 0
        self._it: Optional[Iterator[Tensor]] = None
        self._order = np.zeros(0, np.int64)
        log.info("latent loader: %s backend on %s, %d samples %s, %d batches of %d per epoch on rank %d/%d%s",
                 self.description, self.device, self.shards.count, list(self.shards.sample_shape),
                 self.batches_per_epoch, batch_size, rank, world_size, ", x-flip" if flip else "")

    @property
    def description(self) -> str:
        if self.backend == "dali":
            return "DALI readers.numpy (" + ("GPU, GPUDirect Storage where available)" if self.device.type == "cuda"
                                             else "CPU)")
        return "PyTorch DataLoader (memory-mapped shards)"

    @property
    def num_classes(self) -> int:
        return self.shards.num_classes

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c, h, w = self.shards.sample_shape
        return c // 2, h, w

    @property
    def batches_per_epoch(self) -> int:
        return (self.shards.count // self.world_size) // self.batch_size

    def _start(self) -> None:
        self._order = epoch_indices(self.shards.count, self.seed, self.epoch, self.rank, self.world_size,
                                    self.batch_size)
        self._it = self._backend.iterate(list(self._order.reshape(-1, self.batch_size)[self.index:]))

    def next_raw(self) -> tuple[Tensor, Tensor, int, int]:
        """(meanstd, y, epoch, index) of the next batch, before noise: what both backends must agree on."""
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self._start()
        meanstd = next(self._it)
        idx = self._order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        y = self.labels[torch.from_numpy(idx)].to(self.device, non_blocking=True)
        epoch, index = self.epoch, self.index
        self.index += 1
        return meanstd, y, epoch, index

    def next(self) -> tuple[Tensor, Tensor]:
        meanstd, y, epoch, index = self.next_raw()
        g = torch.Generator(self.device).manual_seed(batch_seed(self.seed, self.rank, epoch, index))
        return latents_to_sample(meanstd, g, self.flip), y

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._it = int(state["epoch"]), int(state["index"]), None


def make_latent_loader(path: str | os.PathLike, batch_size_per_rank: int, seed: int, rank: int = 0,
                       world_size: int = 1, device: torch.device | str = "cpu", backend: str = "auto",
                       flip: bool = False, **kw) -> LatentLoader:
    return LatentLoader(path, batch_size_per_rank, seed, rank, world_size, device, backend, flip, **kw)
