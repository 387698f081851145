"""scikit-learn's bundled 8x8 digits (1797 images, 10 classes): the embedded default dataset. Nothing is downloaded.

Images are float32 [N, 1, 8, 8] in [-1, 1] (pixel values 0..16 mapped linearly); labels int64 [N].
A fixed, seeded, class-stratified split keeps a held-out part for the quality report.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """0..16 -> [-1, 1]."""
    return pixels.astype(np.float32) / 8.0 - 1.0


def load_digits_split(held_out: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train_x, train_y, test_x, test_y): a stratified split, the same for the same seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = to_unit(data.images).reshape(-1, *IMAGE_SHAPE)
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)
        test_idx.extend(rng.choice(idx, size=int(round(held_out * len(idx))), replace=False))
    test = np.zeros(len(y), dtype=bool)
    test[np.asarray(test_idx)] = True
    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a))
    return t(x[~test]), t(y[~test]), t(x[test]), t(y[test])
