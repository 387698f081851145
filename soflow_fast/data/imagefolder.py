"""Pixel-space data for pixel-space training: CIFAR-10 (local pickle folder) or any ImageFolder at a chosen
resolution (ADM center crop): next() -> (x [b, 3, S, S] float32 in [-1, 1], y [b] int64, or None when unlabelled)
on the device, with the order, resume and x-flip randomness every loader shares (data/loader.py).

ImageFolder decoding runs in DALI (nvJPEG 'mixed' on a GPU, 'cpu' otherwise) or, as the fallback, in PIL inside a
PyTorch DataLoader; the two decoders and resamplers differ by about a grey level, so only CIFAR batches are
bit-identical across backends.

An ImageFolder image that cannot be decoded (config bad_images, `BadImages`) stops the run with one line naming the
file, or is recorded in RUN_DIR/bad_images.jsonl and read as its substitute: the next image of the sorted file list
that decodes, with that image's label. The substitute depends only on which files decode, not on when a bad one was
found, so a batch keeps its size, a resumed run reads the same batches as an uninterrupted one, and files recorded
by an earlier run are substituted without being read again (start-up says how many).
"""
from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
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


class BadImageError(UserError):
    """An ImageFolder image cannot be decoded (and bad_images is 'error')."""


class BadImages:
    """The bad_images policy of one run: 'error' raises BadImageError naming the file; 'skip' records each bad file
    as one JSON line appended to `record` (one write per line, so ranks appending at once do not mix lines) and
    remembers it, so that the loader substitutes it (module doc). Files already in `record` are known at start."""

    def __init__(self, policy: str = "error", record: Optional[Path] = None):
        self.policy, self.record = policy, record
        self.known: dict[str, str] = {}  # file (relative to the root) -> why it cannot be decoded
        if record is not None and record.is_file():
            for line in record.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.known[entry["file"]] = entry["error"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash mid-write: that file is found again when read

    def failed(self, root: Path, rel: str, error: BaseException) -> None:
        why = f"{type(error).__name__}: {error}"
        if self.policy == "error":
            raise BadImageError(f"image {root / rel}: cannot be decoded ({why}); remove it, or set bad_images: skip "
                                "to record it and read a substitute")
        log.warning("image %s: cannot be decoded (%s); recorded in %s, a substitute is read in its place",
                    root / rel, why, self.record)
        self.known[rel] = why
        if self.record is not None:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            with open(self.record, "a") as fh:
                fh.write(json.dumps({"file": rel, "error": why}) + "\n")


class _FolderBatches(torch.utils.data.Dataset):
    """PIL decode of a batch of ImageFolder entries (the fallback backend); `decode(i)` -> uint8 [S, S, 3]."""

    def __init__(self, decode, count: int):
        self.decode, self.count = decode, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, idx: np.ndarray) -> Tensor:
        return torch.from_numpy(np.stack([self.decode(i) for i in idx]))


class PixelLoader(EpochLoader):
    """labelled=False: y is None (unconditional training on a labelled dataset)."""

    def __init__(self, source: str | os.PathLike, image_size: Optional[int], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu", backend: str = "auto",
                 flip: bool = False, num_workers: int = 0, kind: str = "auto", train: bool = True,
                 labelled: bool = True, bad_images: Optional[BadImages] = None):
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
            self.bad = bad_images or BadImages()
            if self.bad.known:
                log.info("%d undecodable image(s) recorded in %s are read as substitutes", len(self.bad.known),
                         self.bad.record)
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
            # in this process (num_workers 0, as the trainer runs): a substitute's label must reach self.labels
            dl = torch.utils.data.DataLoader(_FolderBatches(self._decode_pil, self.count), sampler=batches,
                                             batch_size=None, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
            for x in dl:
                yield x.to(self.device, non_blocking=True)
        else:
            yield from self._read_dali(batches)

    def _substitute(self, i: int, read) -> tuple[int, object]:
        """(j, read(file j)) for the first j = i, i + 1, ... (cyclically) whose file is not known bad and reads; each
        failure goes to the bad_images policy. Sample i takes j's label."""
        for step in range(self.count):
            j = (i + step) % self.count
            rel = self.files[j]
            if rel in self.bad.known:
                continue
            try:
                out = read(self.root / rel)
            except Exception as e:  # noqa: BLE001 -- OSError, PIL's UnidentifiedImageError, SyntaxError, ...
                self.bad.failed(self.root, rel, e)
                continue
            if j != i and self.labels is not None:
                self.labels[i] = self.labels[j]
            return j, out
        raise BadImageError(f"{self.root}: no image of the folder can be decoded (see {self.bad.record})")

    def _decode_pil(self, i: int) -> np.ndarray:
        return self._substitute(i, lambda path: adm_center_crop_pil(path.read_bytes(), self.size))[1]

    def _read_dali(self, batches: list[np.ndarray]) -> Iterator[Tensor]:
        """DALI decode; the header is read by PIL for the crop sizes, and a batch DALI fails on is scanned with a
        full PIL decode to find the culprits, then run again with their substitutes."""
        from PIL import Image

        from . import dali

        def header(path: Path) -> tuple[bytes, tuple]:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                return data, dali.adm_crop_sizes(im.size[1], im.size[0], self.size)

        def run(idx: np.ndarray) -> Tensor:
            data, sizes = zip(*(self._substitute(int(i), header)[1] for i in idx))
            dali.feed_images(pipe, list(data), list(sizes))
            return dali.run_to_torch(pipe, self.device)[0]

        def make_pipe():
            return dali.decode_crop_pipeline(self.batch_size, self.size, self.device, max(1, self.num_workers))

        pipe = make_pipe()
        for idx in batches:
            try:
                yield run(idx)
                continue
            except RuntimeError:
                pipe = make_pipe()  # a failed DALI pipeline is not reusable
            for i in idx:
                self._substitute(int(i), lambda path: adm_center_crop_pil(path.read_bytes(), self.size))
            try:
                images = run(idx)
            except RuntimeError as e:  # every file decodes in PIL, yet DALI fails: name the batch
                names = ", ".join(self.files[int(i)] for i in idx)
                raise BadImageError(f"{self.root}: DALI cannot decode a batch that PIL decodes ({names}): "
                                    f"{str(e).splitlines()[0][:200]}; set backend torch") from None
            yield images

    def _finish(self, images: Tensor, draws: BatchDraws) -> Tensor:
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return draws.flip(x) if self.flip else x
