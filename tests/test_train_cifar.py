"""CIFAR-10 training (the reference's second system) on a tiny fake CIFAR-10 folder: the reference's cifar.yaml keys
with a tiny U-Net, a falling loss, exact resume, RAdam, the every-N float64 EMA, augmentation labels to the net."""
import json

import numpy as np
import pytest
import torch
import yaml

from soflow_fast.config import TrainConfig, load_config
from soflow_fast.data.cifar import write_cifar10_like
from soflow_fast.train import Trainer


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    imgs = np.stack([np.stack([128 + 90 * np.sin(xx / (3 + i % 5) + c + i) * np.cos(yy / 4) for c in range(3)], -1)
                     for i in range(48)]).clip(0, 255).astype(np.uint8)
    write_cifar10_like(root, imgs, rng.integers(0, 10, 48))
    return root


def config(cifar, **kw):
    from pathlib import Path

    raw = yaml.safe_load((Path(__file__).parent.parent / "configs" / "cifar10.yaml").read_text())
    raw.update({**dict(model_type="UNet-T", dataset_path=str(cifar), batch_size=8, total_steps=4, logging_steps=1,
                       ckpt_saving_steps=2, eval_demo_steps=0, device="cpu", learning_rate=1e-3, ema_every=2), **kw})
    return TrainConfig.from_dict(raw)


def test_reference_keys_select_radam_unet_augmentation(cifar):
    tr = Trainer(config(cifar), None)
    assert type(tr.optimizer).__name__ == "RAdam" and type(tr.net).__name__ == "SongUNet"
    assert tr.augment is not None and tr.net.null_label is None and tr.ema.every == 2
    assert load_config(__import__("pathlib").Path(__file__).parent.parent / "configs" / "cifar10.yaml"
                       ).resolved_ema_every == 16


def test_every_n_ema_in_float64(cifar, tmp_path):
    tr = Trainer(config(cifar), tmp_path / "r")
    init = [e.clone() for e in tr.ema.tensors]
    x, _ = tr.loader.next()
    tr.train_step(x, None)  # finished step 0: an EMA step (0 % 2 == 0)
    after1 = [e.clone() for e in tr.ema.tensors]
    assert any(not torch.equal(a, b) for a, b in zip(init, after1))
    d = 0.9999 ** 2
    for e0, e1, p in zip(init, after1, tr.params):
        torch.testing.assert_close(e1, (d * e0.double() + (1 - d) * p.detach().double()).float(), rtol=0, atol=0)
    tr.train_step(tr.loader.next()[0], None)  # finished step 1: no EMA step
    assert all(torch.equal(a, b) for a, b in zip(after1, tr.ema.tensors))


def test_augment_labels_reach_the_network(cifar, tmp_path):
    tr = Trainer(config(cifar), tmp_path / "r")
    seen = []
    real = tr.net.forward
    tr.net.forward = lambda x, t, s, y=None, a=None: seen.append(a) or real(x, t, s, y, a)
    tr.train_step(tr.loader.next()[0], None)
    assert len(seen) == 2 and all(a is not None and a.shape == (8, 6) for a in seen)  # x_l call + gradient call


def test_loss_falls_and_resume_is_exact(cifar, tmp_path):
    straight = Trainer(config(cifar, total_steps=40, ckpt_saving_steps=20, learning_rate=3e-3), tmp_path / "a")
    straight.fit(progress=False)
    recs = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([r["mse_c"] for r in recs[:4]]), np.mean([r["mse_c"] for r in recs[-4:]])
    assert last < 0.8 * first, (first, last)
    part = Trainer(config(cifar, total_steps=40, ckpt_saving_steps=20, learning_rate=3e-3), tmp_path / "b")
    part.fit(max_steps=20, progress=False)
    rest = Trainer(config(cifar, total_steps=40, ckpt_saving_steps=20, learning_rate=3e-3), tmp_path / "b")
    assert rest.step == 20
    rest.fit(progress=False)
    for a, b in zip(straight.params + straight.ema.tensors, rest.params + rest.ema.tensors):
        assert torch.equal(a.detach(), b.detach())


def test_missing_folder_is_a_clear_error(tmp_path):
    """A folder without the CIFAR-10 files names them; a folder that does not exist is caught at start-up, naming the
    key (TrainConfig.check_files)."""
    from soflow_fast.config import ConfigError

    (tmp_path / "empty").mkdir()
    with pytest.raises((ConfigError, FileNotFoundError), match="data_batch_1|cifar-10-batches-py"):
        Trainer(config(tmp_path / "empty"), tmp_path / "r")
    with pytest.raises(ConfigError, match="dataset_path = .*nothing': no such folder"):
        Trainer(config(tmp_path / "nothing"), tmp_path / "r")


def test_imagefolder_pixel_training(tmp_path):
    """dataset_type ImageFolder: pixel-space DiT training at data_size, one class per sub-folder."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in range(2):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / f"class{c}" / f"{i}.png")
    cfg = TrainConfig.from_dict(dict(
        model_type="DiT-S/2", hidden_size=32, depth=1, num_heads=2, dataset_type="ImageFolder",
        dataset_path=str(tmp_path / "imgs"), data_size=8, batch_size=4, total_steps=2, cfg_scale=2.0,
        cfg_drop_rate=0.2, logging_steps=1, ckpt_saving_steps=2, eval_demo_steps=0, device="cpu"))
    tr = Trainer(cfg, tmp_path / "run")
    assert tr.net.cfg.in_channels == 3 and tr.net.cfg.num_classes == 2
    x, y = tr.loader.next()
    assert x.shape == (4, 3, 8, 8) and x.min() >= -1 and x.max() <= 1 and y.max() < 2
    tr.fit(progress=False)
    assert tr.step == 2


def test_import_reference_unet_checkpoint(tmp_path):
    """A reference CIFAR checkpoint ('network.<U-Net key>', resample_filter buffers included) imports and samples."""
    import subprocess
    import sys

    from soflow_fast.checkpoint import load_consolidated
    from soflow_fast.models import build_unet

    net = build_unet("UNet")
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.01)
    state = {f"network.{k}": v for k, v in net.state_dict().items()}
    assert any("resample_filter" in k for k in state)
    torch.save({"model": state, "ema_model": state, "optimizer": {}, "finished_steps": 7, "finished_epochs": 0},
               tmp_path / "ref.pt")
    r = subprocess.run([sys.executable, "-m", "soflow_fast", "import-checkpoint", str(tmp_path / "ref.pt"),
                        str(tmp_path / "ours.pt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ck = load_consolidated(tmp_path / "ours.pt")
    assert ck["model_config"]["kind"] == "unet" and ck["step"] == 7
    for k, v in net.state_dict().items():
        assert torch.equal(ck["ema"][k], v), k
