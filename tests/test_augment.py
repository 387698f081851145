"""EDM augmentation as the reference's CIFAR-10 run uses it (docs/algorithm.md section 6)."""
import pytest
import torch
import torch.nn.functional as F

from soflow_fast.data.augment import AugmentConfig, AugmentPipe, scale_matrix, translation_matrix, warp

GEOMETRIC_OFF = dict(scale=0.0, aniso=0.0, translate_frac=0.0)


def images(n=64, seed=0, dtype=torch.float32):
    return (torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(dtype)


def test_defaults_are_the_reference_pipeline():
    cfg = AugmentConfig()
    assert (cfg.p, cfg.xflip, cfg.yflip, cfg.scale, cfg.rotate_frac, cfg.aniso, cfg.translate_frac) == \
        (0.12, 1e8, 0.0, 1.0, 0.0, 1.0, 1.0)
    assert cfg.label_dim == AugmentPipe().label_dim == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes(dtype):
    x = images(16, dtype=dtype)
    out, labels = AugmentPipe(AugmentConfig(p=0.5))(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype
    assert labels.shape == (16, 6) and labels.dtype == torch.float32
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="float images"):
        AugmentPipe()(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.Generator())


def test_deterministic_for_a_seed_and_resumable():
    pipe, x = AugmentPipe(AugmentConfig(p=0.5)), images(16)
    a = pipe(x, torch.Generator().manual_seed(3))
    b = pipe(x, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = pipe(x, torch.Generator().manual_seed(4))
    assert not torch.equal(a[1], c[1])
    # Resuming from a saved generator state replays the next batch exactly; the global RNG plays no part.
    g = torch.Generator().manual_seed(5)
    pipe(x, g)
    state = g.get_state()
    torch.manual_seed(0)
    first = pipe(x, g)
    torch.manual_seed(1)
    again = pipe(x, torch.Generator().set_state(state))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_p_zero_is_the_identity():
    x = images()
    out, labels = AugmentPipe(AugmentConfig(p=0.0))(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, x)
    assert labels.shape == (64, 6) and not labels.any()


def test_xflip_only():
    x = images()
    out, labels = AugmentPipe(AugmentConfig(p=1.0, xflip=1.0, **GEOMETRIC_OFF))(x, torch.Generator().manual_seed(1))
    assert labels.shape == (64, 1)
    flipped = labels[:, 0] == 1
    assert set(labels[:, 0].tolist()) == {0.0, 1.0}
    assert torch.equal(out[flipped], x[flipped].flip(3)) and torch.equal(out[~flipped], x[~flipped])


def test_xflip_1e8_flips_half_the_images_whatever_p():
    """The reference's xflip=1e8 makes 1e8 * p >= 1: every image is eligible, and flipped with probability 1/2."""
    _, labels = AugmentPipe(AugmentConfig(p=0.12, **GEOMETRIC_OFF))(images(512), torch.Generator().manual_seed(2))
    assert 0.4 < labels[:, 0].mean() < 0.6


def test_labels_follow_the_draws():
    """Label layout [xflip, scale, aniso w cos r, aniso w sin r, tx, ty]; at p = 1 every transform is on."""
    x = images()
    out, labels = AugmentPipe(AugmentConfig(p=1.0, xflip=0.0))(x, torch.Generator().manual_seed(4))
    assert labels.shape == (64, 5) and (labels[:, 0] != 0).all() and (labels[:, 3:] != 0).all()
    assert not torch.allclose(out, x)
    _, low = AugmentPipe()(images(512), torch.Generator().manual_seed(5))
    on = (low[:, [1, 2, 4]] != 0).float().mean(0)  # scale, aniso (w cos r), translate: each on with p = 0.12
    assert ((on > 0.07) & (on < 0.17)).all()


def test_warp_integer_translation_is_a_reflected_shift():
    """Output pixel p samples input p + (tx, ty): an integer shift with EDM's reflect padding, up to filter rounding."""
    x = images(4, seed=6)
    out = warp(x, translation_matrix(torch.full((4,), 2.0), torch.full((4,), -3.0)))
    want = F.pad(x, [0, 2, 3, 0], mode="reflect")[:, :, :32, 2:]
    torch.testing.assert_close(out, want, atol=1e-4, rtol=0)


def test_warp_identity_and_constants():
    """The identity matrix gives the image back up to filter rounding (what EDM does to untransformed images);
    a zoom keeps a constant image constant (the sym6 up/down pair has unit gain)."""
    x = images(4, seed=7)
    torch.testing.assert_close(warp(x, torch.eye(3).expand(4, 3, 3)), x, atol=5e-5, rtol=0)
    flat = torch.full((2, 3, 32, 32), 0.7)
    torch.testing.assert_close(warp(flat, scale_matrix(torch.full((2,), 0.8), torch.full((2,), 1.3))), flat,
                               atol=1e-4, rtol=0)
