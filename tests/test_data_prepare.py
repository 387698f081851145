"""prepare-latents end to end (DALI on the CPU, a tiny random AutoencoderKL), resume, bad inputs."""
import io
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from soflow_fast.cli import main  # noqa: E402
from soflow_fast.data.latents import LatentDataError, LatentLoader, LatentShards  # noqa: E402
from soflow_fast.data.prepare import PrepareError, prepare_latents, verify  # noqa: E402

SIZE = 16  # pixels; latents are 8 x 2 x 2


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def smooth_image(h, w, phase):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([127 + 100 * np.sin(yy / 5 + phase + c) * np.cos(xx / 4) for c in range(3)], -1).astype(np.uint8)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    sizes = [(20, 30), (70, 40), (32, 32), (17, 50)]
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(smooth_image(h, w, c + i)).save(root / f"class{c}" / f"img{i}.jpg", quality=95)
    Image.fromarray(smooth_image(24, 24, 9)).save(root / "class2" / "img9.png")
    return root  # 13 images


def adm_center_crop(im, size):
    """guided-diffusion's center_crop_arr, the reference for the DALI crop."""
    while min(*im.size) >= 2 * size:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.BOX)
    scale = size / min(*im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.BICUBIC)
    arr = np.array(im)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def test_dali_crop_matches_adm(images):
    from soflow_fast.data import dali

    files = sorted(images.rglob("*.*"))
    data = [f.read_bytes() for f in files]
    sizes = [dali.adm_crop_sizes(*Image.open(io.BytesIO(d)).size[::-1], SIZE) for d in data]
    pipe = dali.decode_crop_pipeline(len(files), SIZE, torch.device("cpu"))
    dali.feed_images(pipe, data, sizes)
    out = dali.run_to_torch(pipe, torch.device("cpu"))[0].numpy().astype(float)
    for f, got in zip(files, out):
        ref = adm_center_crop(Image.open(f).convert("RGB"), SIZE).astype(float)
        assert np.abs(got - ref).mean() < 2.0, f  # decoder and resampling filters differ by a grey level or so


def test_prepare_end_to_end_and_loader(images, vae_dir, tmp_path):
    out = tmp_path / "latents"
    rc = main(["prepare-latents", str(images), str(out), "--vae", str(vae_dir), "--image-size", str(SIZE),
               "--shard-size", "5", "--batch-size", "3", "--dtype", "float32", "--device", "cpu"])
    assert rc == 0
    m = verify(out)  # every checksum and shape
    assert m["count"] == 13 and m["sample_shape"] == [8, 2, 2] and m["dtype"] == "float32"
    assert m["classes"] == ["class0", "class1", "class2"] and [s["count"] for s in m["shards"]] == [5, 5, 3]
    assert m["skipped"] == []
    shards = LatentShards.open(out)
    assert shards.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 5
    # the stored mean/std are the VAE posterior of the [-1, 1] crop
    from soflow_fast.vae import encode, load_vae

    lat0 = np.load(out / "shard-00000.npy")
    first = Image.open(images / "class0" / "img0.jpg").convert("RGB")
    ref = encode(load_vae(vae_dir, torch.device("cpu")), torch.from_numpy(adm_center_crop(first, SIZE))[None])
    assert np.abs(lat0[0] - ref[0].numpy()).max() < 0.05 and (lat0[:, 4:] > 0).all()
    loader = LatentLoader(out, 4, seed=0, backend="dali")
    x, y = loader.next()
    assert x.shape == (4, 4, 2, 2) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_resume_after_interruption_gives_identical_shards(images, vae_dir, tmp_path):
    kw = dict(image_size=SIZE, shard_size=4, batch_size=4, dtype="float16")
    full, part = tmp_path / "full", tmp_path / "part"
    prepare_latents(images, full, vae_dir, **kw)
    assert prepare_latents(images, part, vae_dir, max_new_shards=2, **kw) is None  # "interrupted" after 2 shards
    assert not (part / "manifest.json").exists() and (part / "shard-00001.json").exists()
    (part / "shard-00002.npy.tmp").write_bytes(b"half-written")  # what a kill during a write leaves
    m = prepare_latents(images, part, vae_dir, **kw)
    assert m["count"] == 13 and len(m["shards"]) == 4
    for k in range(4):
        for suffix in (".npy", ".labels.npy"):
            name = f"shard-{k:05d}{suffix}"
            assert (full / name).read_bytes() == (part / name).read_bytes(), name
    with pytest.raises(PrepareError, match="other options .*dtype"):
        prepare_latents(images, part, vae_dir, **{**kw, "dtype": "float32"})


def test_corrupt_images_are_named_stop_or_skip(images, vae_dir, tmp_path):
    good = (images / "class1" / "img0.jpg").read_bytes()
    (images / "class1" / "truncated.jpg").write_bytes(good[:len(good) // 2])  # header fine, data cut: DALI fails
    (images / "class0" / "garbage.jpg").write_bytes(b"this is not an image")  # no header
    with pytest.raises(PrepareError, match=r"class0/garbage\.jpg: cannot be decoded"):
        prepare_latents(images, tmp_path / "a", vae_dir, image_size=SIZE, shard_size=8)
    (images / "class0" / "garbage.jpg").unlink()
    with pytest.raises(PrepareError, match=r"class1/truncated\.jpg: cannot be decoded"):
        prepare_latents(images, tmp_path / "b", vae_dir, image_size=SIZE, shard_size=8)
    m = prepare_latents(images, tmp_path / "c", vae_dir, image_size=SIZE, shard_size=8, batch_size=4,
                        on_error="skip")
    assert m["count"] == 13 and [s["file"] for s in m["skipped"]] == ["class1/truncated.jpg"]
    assert [s["count"] for s in m["shards"]] == [8, 5]  # the shard with the bad file holds one fewer
    assert LatentShards.open(tmp_path / "c").labels.tolist() == [0] * 4 + [1] * 4 + [2] * 5


def test_bad_folders_and_vae_are_clear_errors(images, vae_dir, tmp_path):
    with pytest.raises(PrepareError, match="VAE directory .* no config.json"):
        prepare_latents(images, tmp_path / "o", tmp_path, image_size=SIZE)
    broken = tmp_path / "broken_vae"
    shutil.copytree(vae_dir, broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"not weights")
    with pytest.raises(PrepareError, match="VAE directory .*broken_vae does not load"):
        prepare_latents(images, tmp_path / "o", broken, image_size=SIZE)
    (images / "empty_class").mkdir()
    with pytest.raises(PrepareError, match="class folder .*empty_class has no images"):
        prepare_latents(images, tmp_path / "o", vae_dir, image_size=SIZE)
    rc = main(["prepare-latents", str(images), str(tmp_path / "o"), "--vae", str(vae_dir)])
    assert rc == 2  # the CLI prints the error instead of a traceback


def test_truncated_prepared_shard_fails_resume_and_loader(images, vae_dir, tmp_path):
    out = tmp_path / "l"
    prepare_latents(images, out, vae_dir, image_size=SIZE, shard_size=8)
    path = out / "shard-00001.npy"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(LatentDataError, match=r"shard-00001\.npy is .* \(truncated\)"):
        LatentLoader(out, 2, seed=0, backend="torch")
    with pytest.raises(LatentDataError, match="truncated"):
        prepare_latents(images, out, vae_dir, image_size=SIZE, shard_size=8)


def test_train_on_prepared_latents(images, vae_dir, tmp_path):
    """prepare-latents on a tiny ImageFolder, then a few training steps (and a resume) on the shards it wrote."""
    import json as _json

    from soflow_fast.config import TrainConfig
    from soflow_fast.train import Trainer

    out = tmp_path / "latents"
    assert main(["prepare-latents", str(images), str(out), "--vae", str(vae_dir), "--image-size", str(SIZE),
                 "--shard-size", "5", "--dtype", "float16", "--device", "cpu"]) == 0
    cfg = TrainConfig.from_dict(dict(
        model_type="DiT-S/2", hidden_size=32, depth=1, num_heads=2, dataset_type="Imagenet", dataset_path=str(out),
        data_size=SIZE // 8, batch_size=4, total_steps=4, cfg_scale=3.0, cfg_drop_rate=0.1, mix_ratio=0.25,
        cfg_decay_time=0.8, logging_steps=1, ckpt_saving_steps=2, eval_demo_steps=0, quality_report=False,
        device="cpu", kernels="eager", seed=0))
    tr = Trainer(cfg, tmp_path / "run")
    assert tr.net.cfg.in_channels == 4 and tr.net.cfg.num_classes == 3 and tr.net.null_label == 3
    tr.fit(max_steps=2, progress=False)
    resumed = Trainer(cfg, tmp_path / "run")
    assert resumed.step == 2 and resumed.loader.state_dict() == tr.loader.state_dict()
    resumed.fit(progress=False)
    recs = [_json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in recs)
    # sample from the run, decoding the latents with the same local VAE: 16x16 RGB images in the ADM layout
    assert main(["sample", str(tmp_path / "run"), "--out", str(tmp_path / "s"), "--num-samples", "5",
                 "--batch-size", "2", "--vae", str(vae_dir), "--device", "cpu"]) == 0
    npz = np.load(tmp_path / "s" / "samples_1nfe.npz")
    assert npz["arr_0"].shape == (5, SIZE, SIZE, 3) and npz["arr_0"].dtype == np.uint8 and npz["arr_1"].max() < 3
