"""Pixel-space loaders: CIFAR-10 folder and ImageFolder, resume, flip, DALI vs PIL decode."""
import numpy as np
import pytest
import torch
from PIL import Image

from soflow_fast.data.cifar import write_cifar10_like
from soflow_fast.data.imagefolder import PixelLoader


def test_cifar_loader_resume_and_flip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    write_cifar10_like(tmp_path, x, np.arange(40) % 10)
    a = PixelLoader(tmp_path, None, 8, seed=2, flip=True)
    assert a.kind == "cifar10" and a.num_classes == 10 and a.batches_per_epoch == 5
    ref = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    flips = 0
    batches = []
    for _ in range(7):
        xb, yb = a.next()
        batches.append((xb, yb))
        assert xb.shape == (8, 3, 32, 32) and xb.min() >= -1 and xb.max() <= 1
    b = PixelLoader(tmp_path, None, 8, seed=2, flip=True)
    b.load_state_dict({"epoch": 1, "index": 0})
    for xb, yb in batches[5:]:
        xc, yc = b.next()
        assert torch.equal(xb, xc) and torch.equal(yb, yc)
    # every row is its image, flipped or not
    c = PixelLoader(tmp_path, None, 40, seed=2, flip=True)
    xb, _ = c.next()
    for row in xb:
        hit = [(row == ref[i]).all() or (row == ref[i].flip(-1)).all() for i in range(40)]
        assert sum(bool(h) for h in hit) == 1
        flips += int(not any((row == ref[i]).all() for i in range(40)))
    assert 0 < flips < 40


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_imagefolder_loader(tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(4):
            yy, xx = np.mgrid[0:40 + 9 * i, 0:30]
            img = np.stack([127 + 100 * np.sin(yy / 6 + c + k) * np.cos(xx / 5) for k in range(3)], -1)
            Image.fromarray(img.astype(np.uint8)).save(tmp_path / f"c{c}" / f"{i}.jpg", quality=95)
    ref, other = (PixelLoader(tmp_path, 16, 4, seed=0, backend=b) for b in ("torch", backend))
    assert other.backend == backend
    for _ in range(3):
        (xt, yt), (xo, yo) = ref.next(), other.next()
        assert xo.shape == (4, 3, 16, 16) and torch.equal(yt, yo)
        assert (xt - xo).abs().mean() < 2 / 127.5  # PIL vs DALI: within a couple of grey levels
