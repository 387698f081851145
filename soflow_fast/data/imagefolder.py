"""Pixel-space data for pixel-space training: CIFAR-10 (local pickle folder) or any ImageFolder at a chosen
resolution (ADM center crop): next() -> (x [b, 3, S, S] float32 in [-1, 1], y [b] int64, or None when unlabelled)
on the device, with the order, resume and x-flip randomness every loader shares (data/loader.py).

ImageFolder decoding runs in DALI (nvJPEG 'mixed' on a GPU, 'cpu' otherwise) or, as the fallback, in PIL inside a
PyTorch DataLoader; the two decoders and resamplers differ by about a grey level, so only CIFAR batches are
bit-identical across backends.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from .latents import dali_available
from .loader import BatchDraws, EpochLoader

log = logging.getLogger("soflow_fast")


def adm_center_crop_pil(data: bytes, size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr on encoded bytes -> uint8 [size, size, 3]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        while min(*im.size) >= 2 * size:
            im = im.resize(tuple(x // 2 for x in im.size), resample=Image.BOX)
        scale = size / min(*im.size)
        im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.BICUBIC)
        arr = np.asarray(im)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


class _FolderBatches(torch.utils.data.Dataset):
    """PIL decode of a batch of ImageFolder entries (the fallback backend)."""

    def __init__(self, root: Path, files: list[str], size: int):
        self.root, self.files, self.size = root, files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: np.ndarray) -> Tensor:
        return torch.from_numpy(np.stack([adm_center_crop_pil((self.root / self.files[i]).read_bytes(), self.size)
                                          for i in idx]))


class PixelLoader(EpochLoader):
    """labelled=False: y is None (unconditional training on a labelled dataset)."""

    def __init__(self, source: str | os.PathLike, image_size: Optional[int], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu", backend: str = "auto",
                 flip: bool = False, num_workers: int = 0, kind: str = "auto", train: bool = True,
                 labelled: bool = True):
        from .cifar import FOLDER

        root = Path(source)
        if kind == "auto":
            kind = "cifar10" if (root / FOLDER).is_dir() or (root / "data_batch_1").is_file() else "imagefolder"
        self.kind, self.flip = kind, flip
        if kind == "cifar10":
            from .cifar import load_cifar10

            images, labels = load_cifar10(root, train=train)
            self.images, self.size, self.backend = torch.from_numpy(images), 32, "memory"
            self.labels = torch.from_numpy(labels)
        elif kind == "imagefolder":
            from .prepare import scan_image_folder

            if not image_size:
                raise ValueError("an ImageFolder pixel loader needs image_size")
            self.classes, items = scan_image_folder(root)
            self.root, self.files, self.size = root, [f for f, _ in items], image_size
            self.labels = torch.tensor([y for _, y in items], dtype=torch.int64)
            self.backend = ("dali" if dali_available() else "torch") if backend == "auto" else backend
            if self.backend not in ("dali", "torch"):
                raise ValueError(f"pixel loader backend {backend!r}: expected 'auto', 'dali' or 'torch'")
            self.num_workers = num_workers
        else:
            raise ValueError(f"pixel data kind {kind!r}: expected 'auto', 'cifar10' or 'imagefolder'")
        super().__init__(len(self.labels), batch_size, seed, rank, world_size, device, str(source))
        if not labelled:
            self.labels = None
        log.info("pixel loader: %s %s via %s on %s, %d images at %dx%d, %d batches of %d per epoch%s", kind, source,
                 self.backend, self.device, self.count, self.size, self.size, self.batches_per_epoch,
                 batch_size, ", x-flip" if flip else "")

    @property
    def num_classes(self) -> int:
        return 10 if self.kind == "cifar10" else len(self.classes)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return 3, self.size, self.size

    def _read(self, batches: list[np.ndarray]) -> Iterator[Tensor]:
        """uint8 [b, S, S, 3] per batch."""
        if self.kind == "cifar10":
            for idx in batches:
                yield self.images[torch.from_numpy(idx)].to(self.device, non_blocking=True)
        elif self.backend == "torch":
            dl = torch.utils.data.DataLoader(_FolderBatches(self.root, self.files, self.size), sampler=batches,
                                             batch_size=None, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
            for x in dl:
                yield x.to(self.device, non_blocking=True)
        else:
            from PIL import Image

            from . import dali

            pipe = dali.decode_crop_pipeline(self.batch_size, self.size, self.device, max(1, self.num_workers))
            for idx in batches:
                data = [(self.root / self.files[i]).read_bytes() for i in idx]
                sizes = []
                for d in data:
                    with Image.open(io.BytesIO(d)) as im:
                        sizes.append(dali.adm_crop_sizes(im.size[1], im.size[0], self.size))
                dali.feed_images(pipe, data, sizes)
                yield dali.run_to_torch(pipe, self.device)[0]

    def _finish(self, images: Tensor, draws: BatchDraws) -> Tensor:
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return draws.flip(x) if self.flip else x
