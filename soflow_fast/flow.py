"""SoFlow's time, path and coefficient math (docs/algorithm.md sections 1, 2, 6, 7), as pure functions.

Time conventions: data at t = 0, noise at t = 1. Per-sample times are 1-D tensors [B]; helpers broadcast them
against [B, ...] data with `bcast`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

HALF_PI = math.pi / 2

# The reference accepts 'Linear'/'Trig' and 'Euler'/'Trig'; its YAML comments say 'Triangular'.
_NOISING = {"linear": "linear", "trig": "trig", "triangular": "trig"}
_COEFFICIENT = {"euler": "euler", "trig": "trig", "triangular": "trig"}
L_SCHEDULES = ("const", "linear", "cosine", "exponent")


def _canonical(name: str, table: dict, what: str) -> str:
    key = str(name).lower()
    if key not in table:
        raise ValueError(f"{what}: unknown value {name!r}; expected one of {sorted(set(table))}")
    return table[key]


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] matching like's rank."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class Flow:
    """Noising path (x_t = alpha x0 + beta x1) and solution-function coefficients (f = a x + b F)."""

    noising: str = "linear"
    coefficient: str = "euler"

    def __post_init__(self) -> None:
        object.__setattr__(self, "noising", _canonical(self.noising, _NOISING, "noising_type"))
        object.__setattr__(self, "coefficient", _canonical(self.coefficient, _COEFFICIENT, "coefficient_type"))

    # -- path -------------------------------------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t if self.noising == "linear" else torch.cos(HALF_PI * t)

    def beta(self, t: Tensor) -> Tensor:
        return t if self.noising == "linear" else torch.sin(HALF_PI * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t) if self.noising == "linear" else -HALF_PI * torch.sin(HALF_PI * t)

    def d_beta(self, t: Tensor) -> Tensor:
        return torch.ones_like(t) if self.noising == "linear" else HALF_PI * torch.cos(HALF_PI * t)

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, v_t) for per-sample times t [B]."""
        tb = bcast(t, x0)
        x_t = self.alpha(tb) * x0 + self.beta(tb) * x1
        v_t = self.d_alpha(tb) * x0 + self.d_beta(tb) * x1
        return x_t, v_t

    # -- solution-function coefficients -----------------------------------------------------------
    def a(self, t: Tensor, s: Tensor) -> Tensor:
        return torch.ones_like(t) if self.coefficient == "euler" else torch.cos(HALF_PI * (s - t))

    def b(self, t: Tensor, s: Tensor) -> Tensor:
        return s - t if self.coefficient == "euler" else torch.sin(HALF_PI * (s - t))

    def coefficient_slopes(self, t: Tensor, l: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """((a(t,s) - a(l,s)) / (t - l), (b(t,s) - b(l,s)) / (t - l)), by sum-to-product identities for Trig, so
        that nothing cancels as l -> t (the secant quotient, docs/precision.md section 5)."""
        if self.coefficient == "euler":
            return torch.zeros_like(t), -torch.ones_like(t)  # b(t,s) - b(l,s) = l - t
        gap = t - l
        mid = HALF_PI * (2 * s - t - l) / 2  # the mean of the two angles pi (s - t) / 2 and pi (s - l) / 2
        half = torch.sin(HALF_PI * -gap / 2) / gap  # sin(half the angle difference) / (t - l)
        return -2 * torch.sin(mid) * half, 2 * torch.cos(mid) * half

    def da_ds_diag(self, t: Tensor) -> Tensor:
        """da/ds at s = t: zero for both coefficient types."""
        return torch.zeros_like(t)

    def db_ds_diag(self, t: Tensor) -> Tensor:
        """db/ds at s = t: 1 (Euler) or pi/2 (Trig)."""
        return torch.full_like(t, 1.0 if self.coefficient == "euler" else HALF_PI)

    def solution_from_output(self, F: Tensor, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """f(x, t, s) = a(t, s) x + b(t, s) F."""
        return bcast(self.a(t, s), x) * x + bcast(self.b(t, s), x) * F

    def velocity_from_output(self, F: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """v(x, t) = da/ds(t,t) x + db/ds(t,t) F(x, t, t)."""
        return bcast(self.da_ds_diag(t), x) * x + bcast(self.db_ds_diag(t), x) * F

    # -- the model through the parameterization -------------------------------------------------
    def solution(self, net: Callable, x: Tensor, t: Tensor, s: Tensor, y: Optional[Tensor] = None) -> Tensor:
        return self.solution_from_output(net(x, t, s, y), x, t, s)

    def velocity(self, net: Callable, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        return self.velocity_from_output(net(x, t, t, y), x, t)


CFG_DECAY_K = 0.025  # the rate of cfg_decay; the fused FM loss (kernels/soflow_loss.py) reads it from here


def cfg_decay(t: Tensor, tau: float, k: float = CFG_DECAY_K) -> Tensor:
    """CFG strength k(t): 1 up to tau, then smoothly to 0 at t = 1 (1 everywhere when tau >= 1)."""
    if tau >= 1.0:
        return torch.ones_like(t)
    d = ((1 - t) / (1 - tau)).clamp(0.0, 1 - 1e-6)
    decayed = 1 - torch.exp(-k * d / (1 - d))
    return torch.where(t <= tau, torch.ones_like(t), decayed)


def logit_normal(n: int, mean: float, std: float, *, generator: Optional[torch.Generator] = None,
                 device: torch.device | str = "cpu") -> Tensor:
    """sigmoid(N(mean, std)) of shape [n], fp32."""
    return torch.sigmoid(torch.randn(n, generator=generator, device=device, dtype=torch.float32) * std + mean)


def derived_seed(*keys: int) -> int:
    """A generator seed from integer keys (run seed, step, batch index, ...): independent, reproducible streams that
    need no state in a checkpoint."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


def l_ratio(schedule: str, step: int, total_steps: int, r_init: float, r_end: float) -> float:
    """r(k, K): the fraction of the way from t towards s at which l sits (docs/algorithm.md section 6)."""
    name = str(schedule).lower()
    frac = step / total_steps
    if name == "const":
        return r_end
    if name == "linear":
        return r_init + (r_end - r_init) * frac
    if name == "cosine":
        return r_end + (r_init - r_end) * 0.5 * (1 + math.cos(math.pi * frac))
    if name == "exponent":
        return r_init * (r_end / r_init) ** frac
    raise ValueError(f"l_schedule: unknown value {schedule!r}; expected one of {list(L_SCHEDULES)}")


def consistency_times(s_draw: Tensor, t_draw: Tensor, ratio: float | Tensor,
                      gap: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """(t, s, l) from raw draws: t = max(t_draw, gap), s = min(s_draw, t - gap), l = min(t + (s - t) r, t - gap)."""
    t = t_draw.clamp(min=gap)
    s = torch.minimum(s_draw, t - gap)
    l = torch.minimum(t + (s - t) * ratio, t - gap)
    return t, s, l


def sampling_times(nfe: int) -> list[float]:
    """T_i = 1 - i / N for i = 0..N."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    return [1.0 - i / nfe for i in range(nfe + 1)]


@torch.no_grad()
def sample(net: Callable, flow: Flow, x1: Tensor, nfe: int = 1, y: Optional[Tensor] = None,
           renoise: Optional[list[Tensor]] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """N-NFE sampling (docs/algorithm.md section 7): jump to t = 0, re-noise to the next time, repeat.

    renoise: optional list of N - 1 noise tensors (one per re-noising); drawn from generator otherwise.
    """
    times = sampling_times(nfe)
    if renoise is not None and len(renoise) != nfe - 1:
        raise ValueError(f"renoise: expected {nfe - 1} noise tensors for nfe={nfe}, got {len(renoise)}")
    ones = torch.ones(x1.shape[0], device=x1.device, dtype=torch.promote_types(x1.dtype, torch.float32))
    zeros = torch.zeros_like(ones)
    x = x1
    for i in range(nfe - 1):
        x0_hat = flow.solution(net, x, times[i] * ones, zeros, y)
        eps = renoise[i] if renoise is not None else torch.randn(x.shape, generator=generator, device=x.device,
                                                                 dtype=x.dtype)
        tn = bcast(times[i + 1] * ones, x)  # in the sample's dtype: fp64 sampling keeps fp64 coefficients
        x = flow.alpha(tn) * x0_hat + flow.beta(tn) * eps
    return flow.solution(net, x, times[nfe - 1] * ones, zeros, y)


@torch.no_grad()
def euler_sample(net: Callable, flow: Flow, x1: Tensor, steps: int, y: Optional[Tensor] = None) -> Tensor:
    """A multi-step Euler solve of the model's own velocity ODE dx/dt = v(x, t, y) from t = 1 to 0 (for scale)."""
    x = x1
    ones = torch.ones(x1.shape[0], device=x1.device, dtype=torch.promote_types(x1.dtype, torch.float32))
    for i in range(steps):
        t = 1.0 - i / steps
        x = x - flow.velocity(net, x, t * ones, y) / steps
    return x
