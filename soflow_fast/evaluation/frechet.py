"""Frechet distance between two Gaussians fitted to feature sets (the quantity behind FID).

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)

The trace term uses the symmetric form S1^1/2 S2 S1^1/2 rather than the usual sqrtm(S1 S2): both have the same
eigenvalues, but the symmetric one is positive semi-definite, so `eigh` gives real eigenvalues and no complex
round-off has to be discarded. Everything runs in float64.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

# Eigenvalues below -_NEG_TOL * (largest eigenvalue) mean the matrix is not a covariance (not round-off).
_NEG_TOL = 1e-6


def _as_float64(a: ArrayLike, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    out = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name}: contains NaN or inf")
    return out


def gaussian_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) in float64 from features [N, D]; unbiased covariance (ddof=1), as pytorch-fid."""
    f = _as_float64(features, "features")
    if f.ndim != 2:
        raise ValueError(f"features: expected a 2-D array [N, D], got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"features: need at least 2 rows for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_eigvals(w: np.ndarray, name: str) -> np.ndarray:
    """Eigenvalues of a symmetric matrix, clipped at 0; raises if one is negative beyond round-off."""
    scale = max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    if w.min(initial=0.0) < -_NEG_TOL * scale:
        raise ValueError(f"{name}: not positive semi-definite (smallest eigenvalue {w.min():.3e}, largest {scale:.3e})")
    return np.clip(w, 0.0, None)  # small negatives are round-off of a rank-deficient covariance


def _check_cov(sigma: np.ndarray, name: str, d: int) -> np.ndarray:
    if sigma.shape != (d, d):
        raise ValueError(f"{name}: expected shape ({d}, {d}) to match the mean, got {sigma.shape}")
    scale = max(float(np.abs(sigma).max(initial=0.0)), 1.0)
    if not np.allclose(sigma, sigma.T, rtol=0.0, atol=1e-8 * scale):
        raise ValueError(f"{name}: not symmetric")
    return (sigma + sigma.T) / 2  # remove asymmetric round-off so eigh sees an exactly symmetric matrix


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    if mu1.ndim != 1:
        raise ValueError(f"mu1: expected a 1-D mean [D], got shape {mu1.shape}")
    d = mu1.shape[0]
    if mu2.shape != (d,):
        raise ValueError(f"mu2: expected shape ({d},) to match mu1, got {mu2.shape}")
    s1 = _check_cov(_as_float64(sigma1, "sigma1"), "sigma1", d)
    s2 = _check_cov(_as_float64(sigma2, "sigma2"), "sigma2", d)

    w1, v1 = np.linalg.eigh(s1)
    root1 = (v1 * np.sqrt(_psd_eigvals(w1, "sigma1"))) @ v1.T
    _psd_eigvals(np.linalg.eigvalsh(s2), "sigma2")
    middle = root1 @ s2 @ root1
    wm = _psd_eigvals(np.linalg.eigvalsh((middle + middle.T) / 2), "sigma1^1/2 sigma2 sigma1^1/2")
    tr_covmean = float(np.sqrt(wm).sum())

    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    # Identical inputs can land a hair below zero through round-off; a distance is never negative.
    return max(fd, 0.0)
