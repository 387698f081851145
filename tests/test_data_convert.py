"""convert-latents: the reference implementation's imagenet_latent.hdf5 into shards."""
import numpy as np
import pytest

from soflow_fast.cli import main
from soflow_fast.data.latents import LatentShards
from soflow_fast.data.prepare import verify


def test_convert_reference_hdf5(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((11, 8, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 7, 11)
    with h5py.File(tmp_path / "imagenet_latent.hdf5", "w") as f:
        f["latents"], f["labels"], f["amount"], f["latent_size"] = lat, labels, 11, 4
    rc = main(["convert-latents", str(tmp_path), str(tmp_path / "out"), "--shard-size", "4", "--num-classes", "10"])
    assert rc == 0
    m = verify(tmp_path / "out")
    assert m["count"] == 11 and m["num_classes"] == 10 and m["image_size"] == 32
    assert np.array_equal(np.concatenate([np.load(tmp_path / "out" / s["file"]) for s in m["shards"]]), lat)
    assert np.array_equal(LatentShards.open(tmp_path / "out").labels, labels)
    with h5py.File(tmp_path / "bad.hdf5", "w") as f:
        f["labels"] = labels
    assert main(["convert-latents", str(tmp_path / "bad.hdf5"), str(tmp_path / "out2")]) == 2
