"""SoFlow's two losses, eager (docs/algorithm.md sections 4 and 5), written on the network OUTPUTS.

The losses take F (the raw network output) rather than the network itself, so the training step decides how many
network calls to make (three batched ones, or the reference's six) while the math lives here once. This module is
the reference the fused Triton loss is checked against. Everything is computed in at least fp32.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .flow import Flow, bcast, cfg_decay


class LossTerms(NamedTuple):
    loss: Tensor    # scalar with gradient to the network output
    mse: Tensor     # reported mean squared error (detached scalar)
    weight: Tensor  # reported mean adaptive weight (detached scalar)


def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def at_least_fp32(x: Tensor) -> Tensor:
    """bf16/fp16 -> fp32; fp32 and fp64 stay (fp64 lets tests check the math tightly)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def guided_velocity(v_t: Tensor, v_unc: Tensor, t: Tensor, cfg_scale: float, cfg_decay_time: float) -> Tensor:
    """g = v_t + k(t) (w - 1) (v_t - v_unc)."""
    k = bcast(cfg_decay(t, cfg_decay_time), v_t)
    return v_t + k * (cfg_scale - 1) * (v_t - v_unc)


def fm_loss(flow: Flow, F_pred: Tensor, x_t: Tensor, v_t: Tensor, t: Tensor, *, p: float, eps: float,
            F_unc: Optional[Tensor] = None, mask: Optional[Tensor] = None, cfg_scale: float = 1.0,
            mix_ratio: float = 1.0, cfg_decay_time: float = 1.0) -> LossTerms:
    """Flow-matching loss. F_pred = F(x_t, t, t, y_masked) with gradient; F_unc = F(x_t, t, t, null) enables guidance.

    mask: bool [B], True = this row trains the unconditional model (its target stays v_t).
    """
    x_t, v_t = at_least_fp32(x_t), at_least_fp32(v_t)
    v_pred = flow.velocity_from_output(at_least_fp32(F_pred), x_t, t)
    target = v_t
    if F_unc is not None:
        with torch.no_grad():
            v_unc = flow.velocity_from_output(at_least_fp32(F_unc), x_t, t)
            g = guided_velocity(v_t, v_unc, t, cfg_scale, cfg_decay_time)
            g = mix_ratio * g + (1 - mix_ratio) * v_pred.detach()
            target = torch.where(bcast(mask, v_t), v_t, g) if mask is not None else g
    mse_i = _rows(v_pred - target).pow(2).mean(dim=1)
    weight_i = 1.0 / (flow.db_ds_diag(t).abs() * (mse_i.detach() + eps).pow(p))
    return LossTerms((weight_i * mse_i).mean(), mse_i.detach().mean(), weight_i.mean())


def consistency_velocity(flow: Flow, x_t: Tensor, v_t: Tensor, t: Tensor, *, F_unc: Optional[Tensor] = None,
                         F_cond: Optional[Tensor] = None, mask: Optional[Tensor] = None, cfg_scale: float = 1.0,
                         mix_ratio: float = 1.0, cfg_decay_time: float = 1.0) -> Tensor:
    """The consistency loss's target velocity u (no gradient).

    F_unc = F(x_t, t, t, null) enables guidance; F_cond = F(x_t, t, t, y) with the UNMASKED labels is required
    when mix_ratio != 1.
    """
    with torch.no_grad():
        v_t = at_least_fp32(v_t)
        if F_unc is None:
            return v_t
        x_t = at_least_fp32(x_t)
        v_unc = flow.velocity_from_output(at_least_fp32(F_unc), x_t, t)
        g = guided_velocity(v_t, v_unc, t, cfg_scale, cfg_decay_time)
        if mix_ratio != 1.0:
            if F_cond is None:
                raise ValueError("consistency_velocity: F_cond is required when mix_ratio != 1")
            g = mix_ratio * g + (1 - mix_ratio) * flow.velocity_from_output(at_least_fp32(F_cond), x_t, t)
        return torch.where(bcast(mask, v_t), v_t, g) if mask is not None else g


def consistency_point(x_t: Tensor, u: Tensor, t: Tensor, l: Tensor) -> Tensor:
    """x_l = x_t + u (l - t): one Euler step of the target velocity from t to l."""
    return at_least_fp32(x_t) + u * bcast(l - t, u)


def consistency_quotient(flow: Flow, F_t: Tensor, x_t: Tensor, u: Tensor, t: Tensor, s: Tensor, l: Tensor,
                         F_l: Optional[Tensor] = None, dF: Optional[Tensor] = None) -> Tensor:
    """q = (f_t - f_l) / (t - l) (no gradient), from F_l = F(x_l, l, s) of a second call, or from the secant
    difference dF = F_l - F_t (docs/precision.md section 5): with x_l - x_t = u (l - t),
    q = da x_t + a(l,s) u + db F_t - b(l,s) dF / (t - l), da and db the coefficients' slopes between t and l."""
    with torch.no_grad():
        x_t, F_t = at_least_fp32(x_t), at_least_fp32(F_t.detach())
        if dF is None:
            f_t = flow.solution_from_output(F_t, x_t, t, s)
            f_l = flow.solution_from_output(at_least_fp32(F_l), consistency_point(x_t, u, t, l), l, s)
            return (f_t - f_l) / bcast(t - l, f_t)
        da, db = flow.coefficient_slopes(t, l, s)
        return (bcast(da, x_t) * x_t + bcast(flow.a(l, s), u) * u + bcast(db, F_t) * F_t
                - bcast(flow.b(l, s) / (t - l), F_t) * at_least_fp32(dF))


def consistency_loss(flow: Flow, F_t: Tensor, x_t: Tensor, u: Tensor, t: Tensor, s: Tensor, l: Tensor,
                     F_l: Optional[Tensor], *, p: float, eps: float, dF: Optional[Tensor] = None) -> LossTerms:
    """Solution-consistency loss without JVP. F_t = F(x_t, t, s, y_masked) with gradient; F_l = F(x_l, l, s, y_masked),
    or dF = F_l - F_t from the secant pair (then F_l is None)."""
    F_t = at_least_fp32(F_t)
    with torch.no_grad():
        q = consistency_quotient(flow, F_t, x_t, u, t, s, l, F_l=F_l, dF=dF)
        q2_i = _rows(q).pow(2).mean(dim=1)
        weight_i = 1.0 / (q2_i + eps).pow(p)
    sign = torch.sign(flow.b(t, s))
    loss = (sign * _rows(F_t * q).mean(dim=1) * weight_i).mean()
    return LossTerms(loss, q2_i.mean(), weight_i.mean())
