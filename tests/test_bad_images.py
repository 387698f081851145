"""An undecodable image in an ImageFolder mid-run (issue 16, "Bad data mid-run"): with bad_images: error the run stops
with one line naming the file; with skip the file is recorded in RUN_DIR/bad_images.jsonl and read as its substitute
(the next image that decodes, with its label), so batches keep their size and a resumed run matches an uninterrupted
one without reading the file again."""
import io
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from soflow_fast.cli import main
from soflow_fast.config import TrainConfig
from soflow_fast.data.imagefolder import BadImageError, BadImages, PixelLoader
from soflow_fast.train import Trainer

BAD = {"c0/4_garbage.jpg", "c1/2_truncated.jpg"}  # the first is its class's last


def image_folder(root):
    """2 classes x 5 files: 8 good JPEGs, one of random bytes, one cut in half (its header still reads)."""
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(5):
            yy, xx = np.mgrid[0:12 + 2 * i, 0:12]
            img = np.stack([127 + 100 * np.sin(yy / 3 + c + k + i) * np.cos(xx / 4) for k in range(3)], -1)
            buf = io.BytesIO()
            Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=95)
            (root / f"c{c}" / f"{i}.jpg").write_bytes(buf.getvalue())
    (root / "c0" / "4.jpg").unlink()
    (root / "c0" / "4_garbage.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    good = (root / "c1" / "2.jpg").read_bytes()
    (root / "c1" / "2.jpg").unlink()
    (root / "c1" / "2_truncated.jpg").write_bytes(good[:len(good) // 2])
    return root


def read_epoch(loader):
    return [loader.next() for _ in range(loader.batches_per_epoch)]


def test_error_names_the_file(tmp_path):
    loader = PixelLoader(image_folder(tmp_path / "data"), 8, 5, seed=0, backend="torch")
    with pytest.raises(BadImageError, match=r"image .*/c[01]/\d_(garbage|truncated)\.jpg: cannot be decoded \("):
        read_epoch(loader)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_skip_reads_the_next_good_image_with_its_label(tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    root = image_folder(tmp_path / "data")
    record = tmp_path / "bad_images.jsonl"
    loader = PixelLoader(root, 8, 10, seed=0, backend=backend, bad_images=BadImages("skip", record))
    (x, y), = read_epoch(loader)  # one batch of all 10 rows: each bad row holds its substitute
    assert x.shape == (10, 3, 8, 8)
    assert {json.loads(line)["file"] for line in record.read_text().splitlines()} == BAD
    order = loader._order
    for bad in BAD:
        i = loader.files.index(bad)
        j = i + 1  # the next file of the sorted list decodes in this folder
        row, sub = list(order).index(i), list(order).index(j)
        assert torch.equal(x[row], x[sub]) and y[row] == y[sub] == int(loader.files[j][1])
    assert loader.files[loader.files.index("c0/4_garbage.jpg") + 1] == "c1/0.jpg"  # substituted across classes
    # a loader that knows the record substitutes without reading the files again, and gives the same batch
    again = PixelLoader(root, 8, 10, seed=0, backend=backend, bad_images=BadImages("skip", record))
    (x2, y2), = read_epoch(again)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert len(record.read_text().splitlines()) == 2


SMALL = dict(model_type="DiT-S/2", hidden_size=32, depth=1, num_heads=2, dataset_type="ImageFolder", data_size=8,
             batch_size=5, total_steps=4, logging_steps=2, ckpt_saving_steps=2, eval_demo_steps=0,
             quality_report=False, device="cpu", kernels="eager", seed=3)


def test_trainer_skip_records_and_resumes_exactly(tmp_path, caplog):
    root = image_folder(tmp_path / "data")
    cfg = TrainConfig.from_dict({**SMALL, "dataset_path": str(root), "bad_images": "skip"})
    straight = Trainer(cfg, tmp_path / "a")
    straight.fit(progress=False)
    first = Trainer(cfg, tmp_path / "b")
    first.fit(max_steps=2, progress=False)  # one epoch: both bad files found and recorded
    caplog.clear()
    with caplog.at_level("INFO", logger="soflow_fast"):
        resumed = Trainer(cfg, tmp_path / "b")
        resumed.fit(progress=False)
    assert "2 undecodable image(s) recorded in" in caplog.text
    assert "cannot be decoded" not in caplog.text  # known files are not read again
    for a, b in zip(straight.params, resumed.params):
        assert torch.equal(a, b)
    lines = (tmp_path / "b" / "bad_images.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["file"] for line in lines) == sorted(BAD)


def test_cli_error_is_one_line_naming_the_file(tmp_path, capsys):
    root = image_folder(tmp_path / "data")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**SMALL, "dataset_path": str(root)}))
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be decoded" in err[0] and "set bad_images: skip" in err[0]
    assert any(name in err[0] for name in BAD)
