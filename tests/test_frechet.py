"""Frechet distance against closed forms and against the classic scipy.linalg.sqrtm formula.

Tolerances: everything is float64. Closed forms (diagonal / commuting covariances) need only eigh on well-conditioned
matrices, so rtol 1e-10 leaves ~10^5 ulps of headroom while still catching any formula error (those are O(1)).
The scipy comparison goes through sqrtm(S1 S2) of a non-symmetric product, whose accuracy scales with its
condition number (~1e2 here); rtol 1e-8 covers that and nothing more.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from soflow_fast.evaluation.frechet import frechet_distance, gaussian_stats

RTOL_CLOSED = 1e-10
RTOL_SCIPY = 1e-8


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _scipy_fd(mu1, s1, mu2, s2) -> float:
    """The pytorch-fid formula: sqrtm of the non-symmetric product, imaginary round-off dropped."""
    covmean = np.asarray(scipy.linalg.sqrtm(s1 @ s2))
    if np.iscomplexobj(covmean):
        assert np.abs(covmean.imag).max() < 1e-8
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("d", [1, 3, 17])
def test_diagonal_closed_form(d: int) -> None:
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=RTOL_CLOSED)


def test_commuting_closed_form() -> None:
    # S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T share eigenvectors, so the diagonal formula still holds.
    rng = np.random.default_rng(1)
    d = 9
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=RTOL_CLOSED)


def test_rank_deficient_closed_form() -> None:
    # Zero variances (a feature that never moves) must not break the square root.
    a = np.array([2.0, 0.0, 1.0, 0.0])
    b = np.array([0.5, 0.0, 0.0, 3.0])
    mu = np.zeros(4)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(expected, rel=RTOL_CLOSED)


@pytest.mark.parametrize("d", [2, 8, 64])
def test_general_matches_scipy_sqrtm(d: int) -> None:
    rng = np.random.default_rng(100 + d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=RTOL_SCIPY)


def test_from_samples_matches_scipy_and_is_symmetric() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(400, 32))
    y = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.5
    (m1, s1), (m2, s2) = gaussian_stats(x), gaussian_stats(y)
    fd = frechet_distance(m1, s1, m2, s2)
    assert fd == pytest.approx(_scipy_fd(m1, s1, m2, s2), rel=RTOL_SCIPY)
    assert frechet_distance(m2, s2, m1, s1) == pytest.approx(fd, rel=RTOL_CLOSED)


def test_identical_is_zero_and_mean_shift_is_squared_norm() -> None:
    rng = np.random.default_rng(3)
    mu, s = rng.normal(size=16), _random_spd(rng, 16)
    # Exact zero is not reachable through eigh round-off; 1e-10 * tr(S) is ~1e5 ulps of the terms that cancel.
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-10 * np.trace(s)
    shift = rng.normal(size=16)
    assert frechet_distance(mu, s, mu + shift, s) == pytest.approx(shift @ shift, rel=1e-8)


def test_gaussian_stats_matches_numpy_and_accepts_tensors() -> None:
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    xd = x.double().numpy()
    np.testing.assert_allclose(mu, xd.mean(0), rtol=0, atol=1e-15)
    np.testing.assert_allclose(sigma, np.cov(xd, rowvar=False), rtol=0, atol=1e-15)
    # Tensor statistics go straight in too.
    assert frechet_distance(torch.from_numpy(mu), torch.from_numpy(sigma), mu, sigma) < 1e-12
    # Fewer samples than dimensions gives a singular covariance; the distance stays finite and non-negative.
    m_small, s_small = gaussian_stats(np.random.default_rng(0).normal(size=(5, 20)))
    assert np.isfinite(frechet_distance(m_small, s_small, mu[:1].repeat(20), np.eye(20)))


@pytest.mark.parametrize(
    "args, name",
    [
        ((np.zeros((2, 2)), np.eye(2), np.zeros(2), np.eye(2)), "mu1"),
        ((np.zeros(2), np.eye(2), np.zeros(3), np.eye(2)), "mu2"),
        ((np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)), "sigma1"),
        ((np.zeros(2), np.eye(2), np.zeros(2), np.ones((2, 3))), "sigma2"),
        ((np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2)), "sigma1"),  # not symmetric
        ((np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0])), "sigma2"),  # not PSD
        ((np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2)), "mu2"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(args, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        frechet_distance(*args)


def test_gaussian_stats_bad_shapes() -> None:
    with pytest.raises(ValueError, match="features"):
        gaussian_stats(np.zeros(5))
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(np.zeros((1, 5)))
