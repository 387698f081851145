"""Sharded SD-VAE latents (ImageNet) and the resumable loader the trainer reads them with.

A latent directory holds
    manifest.json                 count, sample shape, dtype, classes, per-shard files, counts and sha256 checksums
    shard-00000.npy               [n, 8, h, w] float16/float32: channels 0-3 the posterior mean, 4-7 its std
    shard-00000.labels.npy        [n] int64
written by `soflow-fast prepare-latents` / `convert-latents` (prepare.py).

The loader reads in the order every loader shares (data/loader.py: per-rank batches of each global batch, the
randomness drawn per global batch), so a run gives the same batches on any world size and resumes exactly. Two
backends produce the same (mean, std, label) rows: a DALI pipeline (readers.numpy, on the GPU with GPUDirect Storage
where cuFile supports it) and a plain PyTorch DataLoader over memory-mapped shards; vae.posterior_sample turns them
into samples (docs/algorithm.md section 6): x0 = (mean + std * eps) * LATENT_SCALE.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from ..fileio import sha256_file
from ..vae import posterior_sample
from .loader import BatchDraws, EpochLoader

log = logging.getLogger("soflow_fast")

FORMAT = "soflow_fast.latents/1"
MANIFEST = "manifest.json"


class LatentDataError(ValueError):
    """A latent directory that does not match its manifest (missing, truncated, wrong shape or checksum)."""


def shard_names(k: int) -> tuple[str, str]:
    return f"shard-{k:05d}.npy", f"shard-{k:05d}.labels.npy"


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


class LatentLoader(EpochLoader):
    """next() -> (x0 [b, 4, h, w] float32, y [b] int64) on the device; state_dict() = {'epoch', 'index'}."""

    def __init__(self, path: str | os.PathLike, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", backend: str = "auto", flip: bool = False,
                 num_workers: int = 0, checksums: bool = False):
        self.shards = LatentShards.open(path, checksums=checksums)
        self.labels, self.flip = torch.from_numpy(self.shards.labels), flip
        super().__init__(self.shards.count, batch_size, seed, rank, world_size, device, str(path))
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

    def _read(self, batches: list[np.ndarray]) -> Iterator[Tensor]:
        return self._backend.iterate(batches)

    def _finish(self, meanstd: Tensor, draws: BatchDraws) -> Tensor:
        x0 = posterior_sample(meanstd, draws.randn(*self.sample_shape))
        return draws.flip(x0) if self.flip else x0
