"""The local CIFAR-10 reader (torchvision's python-pickle layout)."""
import numpy as np
import pytest
import torch

from soflow_fast.data.cifar import load_cifar10, write_cifar10_like


def test_round_trip_both_layouts(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 20)
    write_cifar10_like(tmp_path, x, y, train=True)
    write_cifar10_like(tmp_path, x[:4], y[:4], train=False)
    xs, ys = load_cifar10(tmp_path)
    assert xs.dtype == np.uint8 and np.array_equal(xs, x) and np.array_equal(ys, y)
    xt, yt = load_cifar10(tmp_path / "cifar-10-batches-py", train=False, layout="nchw")
    assert xt.shape == (4, 3, 32, 32) and xt.dtype == torch.float32 and yt.dtype == torch.int64
    assert torch.allclose(xt, torch.from_numpy(x[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert xt.min() >= -1 and xt.max() <= 1


def test_missing_file_is_named(tmp_path):
    write_cifar10_like(tmp_path, np.zeros((10, 32, 32, 3), np.uint8), np.zeros(10, np.int64))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3 is missing"):
        load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"test_batch is missing"):
        load_cifar10(tmp_path, train=False)
