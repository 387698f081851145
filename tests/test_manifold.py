"""Precision and recall (k-NN manifolds) against a brute-force float64 implementation, and on sets with known answers.

Tolerance: radii are squared distances from |a|^2 - 2ab + |b|^2 (blocked matmuls) versus direct differences; both
float64, so they agree to ~1e-15 relative for these well-separated random points: we allow 1e-12. Precision and recall
are counts of decisions, which no difference that small flips here: compared exactly.
"""
import numpy as np
import pytest
import torch

from soflow_fast.evaluation.manifold import manifold_radii, precision_recall


def brute_force(real, fake, k):
    """Kynkaanniemi et al.'s definition, written the plain way: all distances at once, sorted."""
    real, fake = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)

    def radii(x):
        d = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
        return d.sort(dim=1).values[:, k]  # column 0 is the point itself (distance 0)

    def inside(points, centres, r):
        d = (points[:, None, :] - centres[None, :, :]).pow(2).sum(-1)
        return (d <= r[None, :]).any(dim=1).double().mean().item()

    r_real, r_fake = radii(real), radii(fake)
    return inside(fake, real, r_real), inside(real, fake, r_fake), r_real


@pytest.mark.parametrize("n_real,n_fake,dim,k,shift", [(37, 53, 16, 3, 0.5), (64, 20, 5, 3, 1.0), (30, 30, 8, 1, 0.0),
                                                       (41, 29, 3, 5, 2.0)])
def test_matches_brute_force(n_real, n_fake, dim, k, shift):
    g = np.random.default_rng(n_real * 1000 + n_fake)
    real = g.standard_normal((n_real, dim))
    fake = g.standard_normal((n_fake, dim)) * 1.3 + shift
    p_ref, r_ref, radii_ref = brute_force(real, fake, k)
    torch.testing.assert_close(manifold_radii(real, k), radii_ref, rtol=1e-12, atol=0)
    got = precision_recall(real.astype(np.float32), fake.astype(np.float32), k)
    p32, r32, _ = brute_force(real.astype(np.float32), fake.astype(np.float32), k)
    assert got == {"precision": p32, "recall": r32}
    assert 0 < p_ref < 1 or 0 < r_ref < 1 or shift == 0.0  # the cases are not all trivially 0 or 1


def test_blocking_changes_nothing():
    g = np.random.default_rng(0)
    real, fake = g.standard_normal((50, 7)), g.standard_normal((45, 7)) + 0.7
    whole = precision_recall(real, fake)
    for block in (1, 13, 50 * 7):  # one row per block, uneven blocks
        assert precision_recall(real, fake, block_elements=block) == whole
        torch.testing.assert_close(manifold_radii(real, block_elements=block), manifold_radii(real), rtol=1e-12,
                                   atol=0)
    assert precision_recall(real, fake) == whole  # deterministic


def test_identical_sets_are_all_inside():
    x = np.random.default_rng(1).standard_normal((40, 12)).astype(np.float32)
    assert precision_recall(x, x.copy()) == {"precision": 1.0, "recall": 1.0}


def test_far_apart_clusters_are_all_outside():
    g = np.random.default_rng(2)
    real = g.standard_normal((30, 6))
    fake = g.standard_normal((35, 6)) + 100.0
    assert precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0}


def test_hand_computed_case():
    """1-D, k = 1. Real 0,1,2,3: radius 1 each. Fake 0.5, -0.9, 10, 11: radii 1.4, 1.4, 1, 1.
    Precision: 0.5 (within 0.5 of 0) and -0.9 (0.9 of 0) are inside, 10 and 11 are not: 1/2.
    Recall: 0 (0.9 from -0.9) and 1 (0.5 from 0.5) are inside; 2 (1.5 from 0.5 > 1.4) and 3 are not: 1/2."""
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [-0.9], [10.0], [11.0]])
    assert precision_recall(real, fake, k=1) == {"precision": 0.5, "recall": 0.5}
    torch.testing.assert_close(manifold_radii(fake, k=1), torch.tensor([1.4, 1.4, 1.0, 1.0], dtype=torch.float64) ** 2)


def test_bad_input_is_named():
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match="fake features: 3 points; the 3-th nearest neighbour needs at least 4"):
        precision_recall(x, x[:3])
    with pytest.raises(ValueError, match="real are 4-d, fake 5-d"):
        precision_recall(x, np.zeros((10, 5)))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="real features: contain NaN"):
        precision_recall(bad, x)


def test_a_point_on_a_ball_boundary_is_inside():
    """Real 0..3 (k = 1: radius exactly 1); the fake point 4 lies exactly on the ball around 3."""
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[4.0], [20.0], [21.0], [22.0]])
    assert precision_recall(real, fake, k=1)["precision"] == 0.25
