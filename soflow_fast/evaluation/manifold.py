"""Precision and recall of generated samples (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models"), the two numbers the ADM evaluator reports beside FID, sFID and IS.

Each set of Inception pool features is taken as a manifold: the union of balls around its points, each ball's radius
the distance from its point to the k-th nearest other point of the set (k = 3, as ADM). Precision is the fraction of
generated samples inside the reference manifold (are the samples realistic?); recall, the fraction of reference
samples inside the generated manifold (is the data covered?). A point on a ball's boundary is inside (<=, as ADM).

Distances are squared Euclidean (the same order as Euclidean), |a|^2 - 2 a.b + |b|^2 in float64, clamped at 0
against round-off, computed in blocks of rows holding at most `block_elements` distances (default 2^25 float64 =
256 MB; with kthvalue's working copy the peak is a few blocks, 0.8 GB above the features measured at 10k x 10k, the
same at any N), so 10k x 10k or 50k x 50k features never sit in memory as a whole matrix: of each block only the
k-th smallest distance per row (radii) or one boolean per row (membership) is kept. float64 makes the result
deterministic and independent of the blocking (a decision flips only for distances within ~1e-15 relative of a
radius). The ADM evaluator computes its distances in float16 (float32 where float16 overflows), so its numbers can
differ from these in the third decimal.

Called by evaluation/fid.py's `scores_against` when the reference's own pool features are at hand (a reference
given as images, arr_0 of an ADM reference batch, or statistics saved with them by `evaluate --save-ref-stats`).
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch import Tensor

K = 3
BLOCK_ELEMENTS = 1 << 25

Features = Union[np.ndarray, Tensor]


def _as_features(x: Features, name: str, k: int) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().double()
    if t.ndim != 2:
        raise ValueError(f"{name} features: expected [N, D], got shape {tuple(t.shape)}")
    if t.shape[0] <= k:
        raise ValueError(f"{name} features: {t.shape[0]} points; the {k}-th nearest neighbour needs at least {k + 1}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} features: contain NaN or inf")
    return t


def _squared_distances(a: Tensor, b: Tensor, a_sq: Tensor, b_sq: Tensor) -> Tensor:
    # in place: one block-sized allocation (the product), no temporaries
    return (a @ b.T).mul_(-2.0).add_(a_sq[:, None]).add_(b_sq[None, :]).clamp_min_(0.0)


def _row_blocks(n_rows: int, n_cols: int, block_elements: int) -> range:
    return range(0, n_rows, max(1, block_elements // n_cols))


def manifold_radii(features: Features, k: int = K, block_elements: int = BLOCK_ELEMENTS) -> Tensor:
    """[N] float64: each point's squared distance to its k-th nearest other point of the set."""
    f = _as_features(features, "manifold", k)
    sq = (f * f).sum(dim=1)
    radii = torch.empty(len(f), dtype=torch.float64, device=f.device)
    blocks = _row_blocks(len(f), len(f), block_elements)
    for start in blocks:
        rows = torch.arange(start, min(start + blocks.step, len(f)), device=f.device)
        d = _squared_distances(f[rows], f, sq[rows], sq)
        d[rows - start, rows] = float("inf")  # a point is not its own neighbour
        radii[rows] = d.kthvalue(k, dim=1).values
    return radii


def _inside(points: Tensor, centres: Tensor, radii: Tensor, block_elements: int) -> Tensor:
    """[len(points)] bool: whether each point lies in some ball (centre, radius)."""
    p_sq, c_sq = (points * points).sum(dim=1), (centres * centres).sum(dim=1)
    inside = torch.empty(len(points), dtype=torch.bool, device=points.device)
    blocks = _row_blocks(len(points), len(centres), block_elements)
    for start in blocks:
        end = min(start + blocks.step, len(points))
        d = _squared_distances(points[start:end], centres, p_sq[start:end], c_sq)
        inside[start:end] = (d <= radii[None, :]).any(dim=1)
    return inside


def precision_recall(real: Features, fake: Features, k: int = K,
                     block_elements: int = BLOCK_ELEMENTS) -> dict[str, float]:
    """{'precision', 'recall'} of fake (generated) against real (reference) features [N, D], on real's device."""
    real, fake = _as_features(real, "real", k), _as_features(fake, "fake", k)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"features: real are {real.shape[1]}-d, fake {fake.shape[1]}-d")
    fake = fake.to(real.device)
    precision = _inside(fake, real, manifold_radii(real, k, block_elements), block_elements)
    recall = _inside(real, fake, manifold_radii(fake, k, block_elements), block_elements)
    return {"precision": float(precision.double().mean()), "recall": float(recall.double().mean())}
