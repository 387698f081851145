"""CIFAR-10 from a local folder in torchvision's python-pickle layout (cifar-10-batches-py/); nothing is downloaded."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
FOLDER = "cifar-10-batches-py"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _folder(root: str | os.PathLike) -> Path:
    root = Path(root)
    return root / FOLDER if (root / FOLDER).is_dir() else root


def load_cifar10(root: str | os.PathLike, train: bool = True, layout: str = "nhwc"):
    """(images, labels): layout 'nhwc' gives uint8 [N, 32, 32, 3] (numpy); 'nchw' gives float32 [N, 3, 32, 32] in
    [-1, 1] (torch). labels: int64 [N]. `root` is the folder holding cifar-10-batches-py/, or that folder itself."""
    if layout not in ("nhwc", "nchw"):
        raise ValueError(f"layout {layout!r}: expected 'nhwc' or 'nchw'")
    folder = _folder(root)
    data, labels = [], []
    for name in TRAIN_FILES if train else TEST_FILES:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10: {path} is missing (expected torchvision's python version: "
                                    f"{FOLDER}/{', '.join(TRAIN_FILES + TEST_FILES)})")
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            data.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(d[b"labels"], np.int64))
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
            raise ValueError(f"CIFAR-10: {path} is not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    x, y = np.concatenate(data), np.concatenate(labels)
    if layout == "nhwc":
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y
    return torch.from_numpy(x).float() / 127.5 - 1.0, torch.from_numpy(y)


def write_cifar10_like(root: str | os.PathLike, images: np.ndarray, labels: np.ndarray, train: bool = True) -> Path:
    """Write uint8 NHWC images in the same pickle layout (tests and small local data sets)."""
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    names = TRAIN_FILES if train else TEST_FILES
    chunks = np.array_split(np.arange(len(images)), len(names))
    for name, idx in zip(names, chunks):
        flat = images[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": flat, b"labels": [int(v) for v in labels[idx]]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES]}, f)
    return folder
