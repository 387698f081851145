"""Latent shards and the loader: both backends give identical batches, rank sharding, exact resume, bad shards."""
import json

import numpy as np
import pytest
import torch

from soflow_fast.data.latents import LatentDataError, LatentLoader, LatentShards
from soflow_fast.data.loader import epoch_indices
from soflow_fast.data.prepare import write_manifest, write_shard
from soflow_fast.vae import LATENT_SCALE


def make_latent_dir(path, n=30, shard_size=8, hw=4, dtype=np.float16, seed=0):
    """Latents whose sample i has mean i + noise-free structure; labels = sample index (so y identifies the row)."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((n, 8, hw, hw)).astype(dtype)
    lat[:, 4:] = np.abs(lat[:, 4:]) * 0.1
    for k in range(0, (n + shard_size - 1) // shard_size):
        a, b = k * shard_size, min(n, (k + 1) * shard_size)
        write_shard(path, k, lat[a:b], np.arange(a, b))
    write_manifest(path, (n + shard_size - 1) // shard_size, (8, hw, hw), np.dtype(dtype),
                   {"image_size": hw * 8, "latent_scale": LATENT_SCALE, "classes": None, "num_classes": n,
                    "shard_size": shard_size, "source": "test", "vae": None})
    return lat


BACKENDS = ["torch", "dali"]


def _need(backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_and_labels_match_the_shards(tmp_path, backend):
    _need(backend)
    lat = make_latent_dir(tmp_path)
    loader = LatentLoader(tmp_path, 4, seed=3, backend=backend)
    assert loader.backend == backend and loader.sample_shape == (4, 4, 4)
    for _ in range(loader.batches_per_epoch + 2):  # across an epoch boundary
        meanstd, y, _, _ = loader.next_raw()
        assert torch.equal(meanstd, torch.from_numpy(lat[y.numpy()]))


def test_sample_is_mean_plus_std_noise_scaled(tmp_path):
    make_latent_dir(tmp_path, dtype=np.float32)
    loader = LatentLoader(tmp_path, 6, seed=0, backend="torch")
    state = loader.state_dict()
    x0, y = loader.next()
    loader.load_state_dict(state)
    meanstd, *_ = loader.next_raw()
    mean, std = meanstd[:, :4], meanstd[:, 4:]
    eps = (x0 / LATENT_SCALE - mean) / std
    assert x0.dtype == torch.float32 and y.dtype == torch.int64 and x0.shape == (6, 4, 4, 4)
    assert eps.abs().max() < 6 and 0.5 < eps.std() < 1.5  # a standard normal draw, not zero


def test_dali_and_torch_loaders_give_identical_batches(tmp_path):
    pytest.importorskip("nvidia.dali")
    make_latent_dir(tmp_path, n=37, shard_size=5)
    a = LatentLoader(tmp_path, 4, seed=11, rank=1, world_size=2, backend="torch", flip=True)
    b = LatentLoader(tmp_path, 4, seed=11, rank=1, world_size=2, backend="dali", flip=True)
    assert a.batches_per_epoch == 4
    for _ in range(10):  # 2.5 epochs
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # the same after a resume in the middle of an epoch, for both
    state = a.state_dict()
    assert state == b.state_dict() == {"epoch": 2, "index": 2}
    ref = [a.next() for _ in range(3)]
    for backend in ("torch", "dali"):
        c = LatentLoader(tmp_path, 4, seed=11, rank=1, world_size=2, backend=backend, flip=True)
        c.load_state_dict(state)
        for x, y in ref:
            xc, yc = c.next()
            assert torch.equal(x, xc) and torch.equal(y, yc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_sharding_covers_every_sample_once_per_epoch(tmp_path, backend):
    _need(backend)
    make_latent_dir(tmp_path, n=36, shard_size=7)
    for epoch in range(2):
        seen = []
        for rank in range(3):
            loader = LatentLoader(tmp_path, 4, seed=5, rank=rank, world_size=3, backend=backend)
            loader.load_state_dict({"epoch": epoch, "index": 0})
            seen += [int(v) for _ in range(loader.batches_per_epoch) for v in loader.next()[1]]
        assert sorted(seen) == list(range(36))
    first = [epoch_indices(36, 5, e, 0, 3, 4).tolist() for e in range(2)]
    assert first[0] != first[1]  # reshuffled every epoch


def test_uneven_split_drops_at_most_one_batch_per_rank(tmp_path):
    for n in (37, 50, 64):
        parts = [epoch_indices(n, 1, 0, r, 3, 4) for r in range(3)]
        allx = np.concatenate(parts)
        assert len(set(allx.tolist())) == len(allx) and len({len(p) for p in parts}) == 1
        assert n - len(allx) < 3 * 4 + 3


def test_truncated_shard_is_a_clear_error(tmp_path):
    make_latent_dir(tmp_path)
    path = tmp_path / "shard-00001.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(LatentDataError, match=r"shard-00001\.npy is .* bytes, expected .* \(truncated\)"):
        LatentLoader(tmp_path, 4, seed=0, backend="torch")


def test_shape_and_checksum_mismatch_are_clear_errors(tmp_path):
    lat = make_latent_dir(tmp_path)
    np.save(tmp_path / "shard-00002.npy", lat[16:24, :, :2])  # another shape
    with pytest.raises(LatentDataError, match=r"shard-00002\.npy holds float16\[8, 8, 2, 4\], the manifest says"):
        LatentShards.open(tmp_path)
    make_latent_dir(tmp_path)
    path = tmp_path / "shard-00000.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))
    LatentShards.open(tmp_path)  # sizes are still right
    with pytest.raises(LatentDataError, match=r"shard-00000\.npy has sha256 .* the manifest says"):
        LatentShards.open(tmp_path, checksums=True)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["count"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LatentDataError, match="shard counts sum to 30, count says 31"):
        LatentShards.open(tmp_path)
    with pytest.raises(LatentDataError, match="no manifest.json"):
        LatentShards.open(tmp_path / "nowhere")


@pytest.mark.parametrize("flip", [False, True])
def test_one_rank_with_two_micro_batches_reads_what_two_ranks_read(tmp_path, flip):
    """A global batch (rows, posterior noise, flips) is the same on any world size: one rank reading b = 8 rows, cut
    into two micro-batches of 4 as the trainer cuts it, equals ranks 0 and 1 of two reading 4 rows each, over 2.5
    epochs and after a resume (data/loader.py)."""
    make_latent_dir(tmp_path, n=37, shard_size=5, dtype=np.float32)
    one = LatentLoader(tmp_path, 8, seed=11, backend="torch", flip=flip)
    two = [LatentLoader(tmp_path, 4, seed=11, rank=r, world_size=2, backend="torch", flip=flip) for r in range(2)]
    assert one.batches_per_epoch == two[0].batches_per_epoch == 4
    for step in range(10):
        if step == 6:  # resume all three mid-epoch from their own positions
            for loader in (one, *two):
                loader.load_state_dict(loader.state_dict())
        x, y = one.next()
        parts = [loader.next() for loader in two]
        for micro, (xr, yr) in enumerate(parts):
            rows = slice(4 * micro, 4 * (micro + 1))
            assert torch.equal(x[rows], xr) and torch.equal(y[rows], yr), (step, micro)
