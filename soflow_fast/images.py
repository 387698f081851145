"""Image output: uint8 conversion (docs/algorithm.md section 7), PNG grids, and ADM-evaluator .npz files."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from .fileio import atomic_open


def to_uint8_nhwc(x: Tensor) -> np.ndarray:
    """Images in [-1, 1], NCHW -> uint8 NHWC via clamp(x * 127.5 + 128, 0, 255)."""
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, rows: int, cols: int, path: str | os.PathLike, upscale: int = 1) -> None:
    """Tile uint8 NHWC images into a rows x cols PNG (missing cells stay black); written atomically."""
    from PIL import Image

    n, h, w, c = images.shape
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(min(n, rows * cols)):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    with atomic_open(path) as fh:
        img.save(fh, format="PNG")


def save_npz(images: np.ndarray, path: str | os.PathLike, labels: np.ndarray | None = None) -> None:
    """The ADM evaluator's layout: arr_0 = uint8 NHWC (arr_1 = labels when given); written atomically."""
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    with atomic_open(path) as fh:
        np.savez(fh, **arrays)
