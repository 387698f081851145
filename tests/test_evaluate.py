"""`soflow-fast evaluate` end to end on a tiny random FID Inception, against independent numpy/scipy computations.

The network is the real architecture with every channel count divided by 16 (128-d pool features) at a 75 x 75
input (the smallest the architecture runs at; spatial features 7 x 3 x 3 = 63-d), with batch-norm statistics
calibrated on images so that activations neither vanish nor explode. Full width at 299 runs in the optional
torch-fidelity cross-check at the end.

Tolerances (everything after the float32 features is float64):
- FID of a set against its own statistics: the eigh-based trace term cancels tr(S1) + tr(S2) to ~1e-13 relative;
  atol 1e-9 * tr(sigma).
- FID / sFID against scipy.linalg.sqrtm(S1 S2) (the ADM/pytorch-fid formula) on the same features: sqrtm of the
  non-symmetric product loses ~cond digits; rtol 1e-6 (any formula error is O(1)).
- Features recomputed by calling the network directly, same batches: bit-identical on CPU, rtol 0.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from PIL import Image

from soflow_fast.cli import main
from soflow_fast.evaluation import fid, inception
from soflow_fast.evaluation.inception import InceptionV3FID, load_inception, tf1_resize_bilinear

WIDTH_DIVISOR, SIZE, BATCH = 16, 75, 50
N_A, N_B = 160, 150  # > 128 each: full-rank pool covariances


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # Tiny convs are overhead-bound; on shared cores a second OpenMP thread is ~10x slower, not faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(inception, "INPUT_SIZE", SIZE)  # what the CLI's load_inception builds
    yield
    torch.set_num_threads(threads)


def _images(seed: int, n: int, brighten: int = 0) -> np.ndarray:
    """Smooth random colour fields (4x4 blocks upsampled to 32x32) plus pixel noise: uint8 NHWC."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float64)
    x = np.repeat(np.repeat(low, 8, axis=1), 8, axis=2) + rng.normal(0, 8, (n, 32, 32, 3)) + brighten
    return np.clip(x, 0, 255).astype(np.uint8)


def _random_inception(k: int, size: int, seed: int = 0, calib: int = 32) -> InceptionV3FID:
    """Random weights; batch-norm running stats set to the batch statistics of `calib` images at `size`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = InceptionV3FID(k, size)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one calibration pass sets the statistics exactly
            m.reset_running_stats()
    with torch.no_grad():
        net.train()(torch.from_numpy(_images(99, calib)).permute(0, 3, 1, 2))
    return net.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("eval")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    net = _random_inception(WIDTH_DIVISOR, SIZE)
    weights = d / "inception.pth"
    torch.save(net.state_dict(), weights)
    a, b = _images(0, N_A), _images(1, N_B, brighten=40)
    np.savez(d / "a.npz", arr_0=a)
    np.savez(d / "b.npz", arr_0=b)

    # Independent features: the network called directly, plus a hook on Mixed_6d's 1x1 branch (TF mixed_6/conv).
    def direct(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pools, logits, spatial, grabbed = [], [], [], []
        hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: grabbed.append(o))
        with torch.no_grad():
            for s in range(0, len(x), BATCH):
                out = net(torch.from_numpy(x[s:s + BATCH]).permute(0, 3, 1, 2))
                pools.append(out.pool.numpy())
                logits.append((out.pool.double() @ net.fc.weight.double().T).numpy())
                o = grabbed.pop()[:, :7]
                spatial.append(o.permute(0, 2, 3, 1).reshape(len(o), -1).numpy())  # ADM: NHWC [..., :7] flattened
        hook.remove()
        return np.concatenate(pools), np.concatenate(logits), np.concatenate(spatial)

    out = {"dir": d, "weights": weights, "net": net, "a": a, "b": b, "fa": direct(a), "fb": direct(b)}
    # The independent FIDs of b against a, once (scipy's sqrtm takes seconds on loaded cores).
    out["fd_pool"], out["fd_spatial"] = _scipy_fd(out["fb"][0], out["fa"][0]), _scipy_fd(out["fb"][2], out["fa"][2])
    torch.set_num_threads(threads)
    return out


def _scipy_fd(f1: np.ndarray, f2: np.ndarray) -> float:
    """The ADM evaluator's formula on its own statistics: np.cov, sqrtm(S1 S2), real part."""
    mu1, mu2 = f1.astype(np.float64).mean(0), f2.astype(np.float64).mean(0)
    s1, s2 = np.cov(f1.astype(np.float64), rowvar=False), np.cov(f2.astype(np.float64), rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _adm_is(logits: np.ndarray, split_size: int) -> float:
    """compute_inception_score of the ADM evaluator, verbatim in numpy."""
    preds = scipy.special.softmax(logits.astype(np.float64), axis=1)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["evaluate", *map(str, args), "--no-progress", "--batch-size", str(BATCH)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_extraction_matches_direct_network_calls(setup) -> None:
    feats = fid.extract_features(fid.NpzImages(setup["dir"] / "a.npz").batches(BATCH), setup["net"], N_A)
    pool, logits, spatial = setup["fa"]
    np.testing.assert_array_equal(feats.pool, pool)
    np.testing.assert_array_equal(feats.spatial, spatial)
    # float32 dot products of 128 terms vs float64: error <~ 128 * 6e-8 * sum|w x| ~ 1e-5 at these magnitudes.
    np.testing.assert_allclose(feats.logits, logits, rtol=0, atol=2e-5)
    assert feats.pool.shape == (N_A, 128) and feats.logits.shape == (N_A, 1008) and feats.spatial.shape == (N_A, 63)
    assert feats.pool.std(0).min() > 0  # the calibrated random net gives informative features


def test_evaluate_cli_fid_sfid_is_match_scipy(setup, capsys) -> None:
    d = setup["dir"]
    rc, out, _ = _cli(capsys, d / "b.npz", "--ref", d / "a.npz", "--inception", setup["weights"],
                      "--out", d / "res.json")
    assert rc == 0
    res = json.loads(out)
    assert res == json.loads((d / "res.json").read_text())
    lb = setup["fb"][1]
    assert res["num_samples"] == N_B
    assert res["fid"] > 1e-2
    assert res["fid"] == pytest.approx(setup["fd_pool"], rel=1e-6)
    assert res["sfid"] == pytest.approx(setup["fd_spatial"], rel=1e-6)
    assert res["inception_score"] == pytest.approx(_adm_is(lb, 5000), rel=1e-6)  # logits: float32 vs float64


def test_fid_of_a_set_against_itself_is_zero(setup) -> None:
    res = fid.evaluate_npz(setup["dir"] / "a.npz", fid.Features(*setup["fa"]).stats(), setup["net"], BATCH)
    pa, _, sa = (f.astype(np.float64) for f in setup["fa"])
    assert 0.0 <= res["fid"] <= 1e-9 * np.trace(np.cov(pa, rowvar=False))
    assert 0.0 <= res["sfid"] <= 1e-9 * np.trace(np.cov(sa, rowvar=False))


def test_adm_reference_npz_statistics_win_over_its_images(setup, capsys) -> None:
    """An ADM reference batch carries arr_0 AND mu/sigma/mu_s/sigma_s; the evaluator uses the statistics."""
    d = setup["dir"]
    pa, _, sa = (f.astype(np.float64) for f in setup["fa"])
    np.savez(d / "ref_adm.npz", arr_0=_images(7, 10), mu=pa.mean(0), sigma=np.cov(pa, rowvar=False),
             mu_s=sa.mean(0), sigma_s=np.cov(sa, rowvar=False))
    np.savez(d / "ref_pool_only.npz", mu=pa.mean(0), sigma=np.cov(pa, rowvar=False))
    _, out, _ = _cli(capsys, d / "b.npz", "--ref", d / "ref_adm.npz", "--inception", setup["weights"])
    res = json.loads(out)
    assert res["fid"] == pytest.approx(setup["fd_pool"], rel=1e-6)
    assert res["sfid"] == pytest.approx(setup["fd_spatial"], rel=1e-6)
    pool_only = fid.evaluate_npz(d / "b.npz", fid.reference_stats(d / "ref_pool_only.npz", setup["net"]),
                                 setup["net"], BATCH)
    assert "sfid" not in pool_only and pool_only["fid"] == pytest.approx(res["fid"], rel=1e-12)


def test_folder_reference_and_saved_stats(setup, capsys) -> None:
    d = setup["dir"]
    folder = d / "real"
    folder.mkdir(exist_ok=True)
    for i, img in enumerate(setup["a"]):
        Image.fromarray(img).save(folder / f"{i:05d}.png")  # lossless: the same pixels as a.npz
    rc, out, _ = _cli(capsys, d / "b.npz", "--ref", folder, "--inception", setup["weights"],
                      "--save-ref-stats", d / "stats.npz")
    assert rc == 0
    assert json.loads(out)["fid"] == pytest.approx(setup["fd_pool"], rel=1e-6)
    pa, _, sa = (f.astype(np.float64) for f in setup["fa"])
    ref = fid.load_reference_stats(d / "stats.npz")
    np.testing.assert_allclose(ref.mu, pa.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.sigma, np.cov(pa, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref.mu_s, sa.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.sigma_s, np.cov(sa, rowvar=False), rtol=1e-10, atol=1e-12)


def test_evaluate_model_fid_trainer_hook(setup) -> None:
    ref = fid.Features(*setup["fa"]).stats()
    b = torch.from_numpy(setup["b"])
    calls = []

    def sample_fn(c: int, k: int) -> torch.Tensor:  # stands in for to_uint8_nhwc(sample(...)) of chunk c
        calls.append(k)
        return b[c * BATCH:c * BATCH + k]

    res = fid.evaluate_model_fid(sample_fn, N_B, ref, setup["net"], batch_size=BATCH)
    assert calls == [BATCH] * (N_B // BATCH)
    assert res["fid_num_samples"] == N_B
    assert res["fid"] == pytest.approx(setup["fd_pool"], rel=1e-6)
    assert res["inception_score"] == pytest.approx(_adm_is(setup["fb"][1], 5000), rel=1e-6)


@pytest.mark.parametrize("n,split", [(250, 100), (37, 5000), (64, 1)])
def test_inception_score_matches_adm_formula(n: int, split: int) -> None:
    logits = np.random.default_rng(n).normal(0, 3, (n, 1008))
    mean, std = fid.inception_score(logits, split_size=split)
    assert mean == pytest.approx(_adm_is(logits, split), rel=1e-10)
    if split >= n:
        assert std == 0.0


def test_inception_score_closed_forms() -> None:
    # Identical predictions: p(y|x) = p(y), KL = 0, IS = 1. Confident, balanced over C classes: IS = C.
    assert fid.inception_score(np.tile(np.arange(10.0), (20, 1)))[0] == pytest.approx(1.0, abs=1e-12)
    confident = np.full((40, 1008), -1e3)
    confident[np.arange(40), np.arange(40) % 8] = 0.0
    assert fid.inception_score(confident)[0] == pytest.approx(8.0, rel=1e-12)


def test_npz_streaming_matches_np_load(tmp_path) -> None:
    x = _images(3, 23)
    np.savez_compressed(tmp_path / "c.npz", arr_0=x)  # compressed members stream too
    parts = list(fid.NpzImages(tmp_path / "c.npz").batches(10))
    assert [len(p) for p in parts] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate(parts), x)


def test_tf1_resize_matches_its_definition() -> None:
    """TF 1.x ResizeBilinear (align_corners=False, half_pixel_centers=False), written out with loops."""
    x = np.random.default_rng(0).uniform(0, 255, (1, 2, 5, 7)).astype(np.float32)
    size = 11
    want = np.zeros((1, 2, size, size))
    for i in range(size):
        sy = i * np.float32(5 / size)
        y0, fy = int(np.floor(sy)), sy - np.floor(sy)
        for j in range(size):
            sx = j * np.float32(7 / size)
            x0, fx = int(np.floor(sx)), sx - np.floor(sx)
            p = x[0, :, [y0, min(y0 + 1, 4)], :][:, :, [x0, min(x0 + 1, 6)]].astype(np.float64)  # [2(y), C, 2(x)]
            top, bottom = p[0, :, 0] * (1 - fx) + p[0, :, 1] * fx, p[1, :, 0] * (1 - fx) + p[1, :, 1] * fx
            want[0, :, i, j] = top * (1 - fy) + bottom * fy
    np.testing.assert_allclose(tf1_resize_bilinear(torch.from_numpy(x), size).numpy(), want, rtol=0, atol=1e-4)
    # An integer upscale keeps every source pixel at dest = 2 * source (no half-pixel shift).
    sq = x[..., :5, :5]
    np.testing.assert_array_equal(tf1_resize_bilinear(torch.from_numpy(sq), 10).numpy()[..., ::2, ::2], sq)


# ---------------------------------------------------------------- errors name the file and the array

def test_error_missing_weights(setup, capsys, tmp_path) -> None:
    rc, _, err = _cli(capsys, setup["dir"] / "b.npz", "--ref", setup["dir"] / "a.npz",
                      "--inception", tmp_path / "nope.pth")
    assert rc == 2 and "nope.pth" in err and "no such file" in err


def test_error_weights_of_another_network(capsys, tmp_path) -> None:
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth.*Conv2d_1a_3x3"):
        load_inception(tmp_path / "other.pth")
    state = _random_inception(16, SIZE).state_dict()
    del state["Mixed_6d.branch1x1.conv.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth.*missing \['Mixed_6d\.branch1x1\.conv\.weight'\]"):
        load_inception(tmp_path / "partial.pth")


@pytest.mark.parametrize("arrays,match", [
    ({"images": np.zeros((4, 8, 8, 3), np.uint8)}, r"bad\.npz: no array 'arr_0' \(it holds \['images'\]\)"),
    ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, r"bad\.npz: array 'arr_0' has dtype float32"),
    ({"arr_0": np.zeros((4, 3, 8, 8), np.uint8)}, r"bad\.npz: array 'arr_0' has shape \(4, 3, 8, 8\)"),
    ({"arr_0": np.zeros((8, 8, 3), np.uint8)}, r"bad\.npz: array 'arr_0' has shape \(8, 8, 3\)"),
])
def test_error_bad_samples_npz(setup, capsys, tmp_path, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    rc, _, err = _cli(capsys, tmp_path / "bad.npz", "--ref", setup["dir"] / "a.npz", "--inception", setup["weights"])
    assert rc == 2
    assert re.search(match, err), err


def test_error_reference_of_another_width(setup, capsys, tmp_path) -> None:
    np.savez(tmp_path / "ref2048.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    rc, _, err = _cli(capsys, setup["dir"] / "b.npz", "--ref", tmp_path / "ref2048.npz",
                      "--inception", setup["weights"])
    assert rc == 2 and "ref2048.npz" in err and "128-d" in err


# ---------------------------------------------------------------- optional: the real architecture vs torch-fidelity

def test_full_width_matches_torch_fidelity(monkeypatch) -> None:
    """Same random full-width weights, same uint8 input: our module vs torch-fidelity's FeatureExtractorInceptionV3
    (an independent port of the same TF graph). torch-fidelity needs torchvision only for its other extractors; it is
    stubbed when absent. Skipped unless torch-fidelity is installed (`pip install --no-deps torch-fidelity`)."""
    if importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip("torch-fidelity not installed")
    if importlib.util.find_spec("torchvision") is None:
        stubs = {}
        for name in ("torchvision", "torchvision.datasets", "torchvision.transforms",
                     "torchvision.transforms.functional", "torchvision.models"):
            stubs[name] = types.ModuleType(name)
            stubs[name].__getattr__ = lambda attr: type(attr, (), {})  # any class torch-fidelity names at import
            monkeypatch.setitem(sys.modules, name, stubs[name])
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(stubs[parent], child, stubs[name])
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(inception, "INPUT_SIZE", 299)
    net = _random_inception(1, 299, seed=1, calib=2)
    path = Path(tempfile.mkdtemp()) / "full.pth"
    torch.save(net.state_dict(), path)
    ours = load_inception(path)
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                             feature_extractor_weights_path=str(path))
    x = torch.from_numpy(_images(5, 2)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        mine = ours(x)
        pool, logits = theirs(x)
    assert 0.01 < pool.abs().mean() < 100  # calibrated: a meaningful comparison, not one of overflowing values
    # The same float32 ops in the same order: bit-identical on CPU here; 1e-5 leaves room for other conv algorithms.
    np.testing.assert_allclose(mine.pool.numpy(), pool.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mine.logits.numpy(), logits.numpy(), rtol=1e-5, atol=1e-5)


def test_periodic_fid_during_training(setup, tmp_path, monkeypatch) -> None:
    """The trainer's eval_steps hook: a finite FID record in metrics.jsonl at every evaluation step."""
    import json

    from soflow_fast.config import TrainConfig
    from soflow_fast.train import Trainer

    ref = tmp_path / "ref.npz"
    pool = setup["fa"][0].astype(np.float64)
    np.savez(ref, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False))
    cfg = TrainConfig.from_dict(dict(
        model_type="DiT-S/2", hidden_size=32, depth=1, num_heads=2, dataset_type="digits", data_size=8,
        batch_size=16, total_steps=2, logging_steps=1, ckpt_saving_steps=2, eval_demo_steps=0, quality_report=False,
        device="cpu", kernels="eager", cfg_scale=2.0, cfg_drop_rate=0.1, eval_steps=1, eval_num_samples=20,
        eval_batch_size=10, eval_fid_reference=str(ref), eval_inception=str(setup["weights"])))
    tr = Trainer(cfg, tmp_path / "run")
    tr.fit(progress=False)
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fids = [r for r in recs if "fid" in r]
    assert [r["step"] for r in fids] == [1, 2] and all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in fids)
    assert fids[-1]["fid_num_samples"] == 20


def test_precision_recall_reported_with_fid(setup, capsys) -> None:
    """evaluate reports precision and recall (manifold.py) beside FID/sFID/IS when the reference's pool features are
    at hand: computed from reference images, stored by --save-ref-stats and read back, or computed from the arr_0
    images of an ADM reference batch; a statistics file without them gives FID only."""
    from soflow_fast.evaluation.manifold import precision_recall

    d = setup["dir"]
    want = precision_recall(setup["fa"][0], setup["fb"][0])  # the same float32 features: equal numbers
    assert 0 < want["precision"] < 1 or 0 < want["recall"] < 1
    rc, out, _ = _cli(capsys, d / "b.npz", "--ref", d / "a.npz", "--inception", setup["weights"],
                      "--save-ref-stats", d / "stats_pool.npz")
    assert rc == 0
    res = json.loads(out)
    assert {k: res[k] for k in want} == want
    np.testing.assert_array_equal(fid.load_reference_stats(d / "stats_pool.npz").pool, setup["fa"][0])
    _, out, _ = _cli(capsys, d / "b.npz", "--ref", d / "stats_pool.npz", "--inception", setup["weights"])
    again = json.loads(out)
    assert {k: again[k] for k in want} == want and again["fid"] == pytest.approx(res["fid"], rel=1e-12)
    pa = setup["fa"][0].astype(np.float64)
    np.savez(d / "adm_batch.npz", arr_0=setup["a"], mu=pa.mean(0), sigma=np.cov(pa, rowvar=False))
    _, out, _ = _cli(capsys, d / "b.npz", "--ref", d / "adm_batch.npz", "--inception", setup["weights"])
    assert {k: json.loads(out)[k] for k in want} == want
    np.savez(d / "stats_only.npz", mu=pa.mean(0), sigma=np.cov(pa, rowvar=False))
    _, out, _ = _cli(capsys, d / "b.npz", "--ref", d / "stats_only.npz", "--inception", setup["weights"])
    assert "precision" not in json.loads(out) and "recall" not in json.loads(out)
