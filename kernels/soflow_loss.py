"""Fused SoFlow losses (docs/algorithm.md sections 4 and 5). Eager twins: soflow_fast.loss.fm_loss and consistency_loss.

One program per sample row. The forward computes the guided target, the row's squared error (or q^2 and F_t q
for the consistency loss), the adaptive weight, the row's loss term and the gradient w.r.t. the network output,
all in fp32: one pass when the row fits one block (ImageNet latents: 4 x 32 x 32 = 4096 elements), else two
(reduce, then recompute and write the gradient). The backward only scales the saved fp32 gradient by grad_output.
Only the solution-function coefficients enter the losses (da/ds(t, t) = 0 for both types, so x_t drops out of
the FM loss; the noising path does not enter either loss), so the kernels take the coefficient type alone.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from soflow_fast.flow import CFG_DECAY_K, Flow
from soflow_fast import loss as eager
from soflow_fast.loss import LossTerms

from ._common import CUSTOM, HAVE_TRITON, INLINE, Registration, check_shape, next_pow2, registration_for

HALF_PI = math.pi / 2
MAX_BLOCK = 4096  # elements of a row held at once; longer rows loop (two passes)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _fm_diff(F, V, FU, row, offs, msk, db, kw, mix, masked, GUIDED: tl.constexpr):
        """v_pred - target for one block of a row (zero outside the row)."""
        v_pred = db * tl.load(F + row + offs, mask=msk, other=0.0).to(tl.float32)
        v = tl.load(V + row + offs, mask=msk, other=0.0).to(tl.float32)
        target = v
        if GUIDED:
            v_unc = db * tl.load(FU + row + offs, mask=msk, other=0.0).to(tl.float32)
            g = v + kw * (v - v_unc)
            g = mix * g + (1.0 - mix) * v_pred
            target = tl.where(masked, v, g)
        return tl.where(msk, v_pred - target, 0.0)

    @triton.jit
    def _fm_kernel(F, V, FU, MASK, TIME, ROW_LOSS, ROW_MSE, ROW_W, GRAD, n, inv_B, p, eps, w_minus_1, mix, tau,
                   decay_k, COEF_TRIG: tl.constexpr, GUIDED: tl.constexpr, HAS_MASK: tl.constexpr, DECAY: tl.constexpr,
                   BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
        i = tl.program_id(0)
        row = i.to(tl.int64) * n
        db = 1.5707963267948966 if COEF_TRIG else 1.0  # db/ds(t, t)
        kw = 0.0
        masked = False
        if GUIDED:
            k = 1.0
            if DECAY:  # k(t) = 1 up to tau, then 1 - exp(-decay_k d / (1 - d)), d = clamp((1 - t) / (1 - tau))
                t = tl.load(TIME + i).to(tl.float32)
                d = tl.minimum(tl.maximum((1.0 - t) / (1.0 - tau), 0.0), 1.0 - 1e-6)
                k = tl.where(t <= tau, 1.0, 1.0 - tl.exp(-decay_k * d / (1.0 - d)))
            kw = k * w_minus_1
            if HAS_MASK:
                masked = tl.load(MASK + i) != 0
        offs0 = tl.arange(0, BLOCK)
        if ONE_PASS:
            msk = offs0 < n
            diff = _fm_diff(F, V, FU, row, offs0, msk, db, kw, mix, masked, GUIDED)
            sq = tl.sum(diff * diff, axis=0)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n, BLOCK):
                offs = start + offs0
                dd = _fm_diff(F, V, FU, row, offs, offs < n, db, kw, mix, masked, GUIDED)
                acc += dd * dd
            sq = tl.sum(acc, axis=0)
        mse = sq / n
        w = 1.0 / (db * tl.exp(p * tl.log(mse + eps)))  # 1 / (|db/ds| (mse + eps)^p), a constant
        # d/dF of mean_i(w_i mse_i): the target is detached, d v_pred / dF = db.
        coef = w * 2.0 * db / n * inv_B
        if ONE_PASS:
            tl.store(GRAD + row + offs0, coef * diff, mask=msk)
        else:
            for start in range(0, n, BLOCK):
                offs = start + offs0
                dd = _fm_diff(F, V, FU, row, offs, offs < n, db, kw, mix, masked, GUIDED)
                tl.store(GRAD + row + offs, coef * dd, mask=offs < n)
        tl.store(ROW_LOSS + i, w * mse)
        tl.store(ROW_MSE + i, mse)
        tl.store(ROW_W + i, w)

    @triton.jit
    def _c_q(FT, XT, U, FL, row, offs, msk, a_t, b_t, a_l, b_l, l_minus_t, t_minus_l):
        """(F_t, q) for one block of a row: q = (f_t - f_l) / (t - l), x_l = x_t + u (l - t)."""
        f = tl.load(FT + row + offs, mask=msk, other=0.0).to(tl.float32)
        x = tl.load(XT + row + offs, mask=msk, other=0.0).to(tl.float32)
        u = tl.load(U + row + offs, mask=msk, other=0.0).to(tl.float32)
        fl = tl.load(FL + row + offs, mask=msk, other=0.0).to(tl.float32)
        x_l = x + u * l_minus_t
        q = ((a_t * x + b_t * f) - (a_l * x_l + b_l * fl)) / t_minus_l
        return f, tl.where(msk, q, 0.0)

    @triton.jit
    def _consistency_kernel(FT, XT, U, FL, TT, SS, LL, ROW_LOSS, ROW_Q2, ROW_W, GRAD, n, inv_B, p, eps,
                            COEF_TRIG: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
        i = tl.program_id(0)
        row = i.to(tl.int64) * n
        t = tl.load(TT + i).to(tl.float32)
        s = tl.load(SS + i).to(tl.float32)
        l = tl.load(LL + i).to(tl.float32)
        if COEF_TRIG:  # a = cos(pi (s - t) / 2), b = sin(pi (s - t) / 2)
            a_t = tl.cos(1.5707963267948966 * (s - t))
            b_t = tl.sin(1.5707963267948966 * (s - t))
            a_l = tl.cos(1.5707963267948966 * (s - l))
            b_l = tl.sin(1.5707963267948966 * (s - l))
        else:  # a = 1, b = s - t
            a_t = 1.0
            b_t = s - t
            a_l = 1.0
            b_l = s - l
        sign = tl.where(b_t > 0, 1.0, tl.where(b_t < 0, -1.0, 0.0))
        offs0 = tl.arange(0, BLOCK)
        if ONE_PASS:
            msk = offs0 < n
            f, q = _c_q(FT, XT, U, FL, row, offs0, msk, a_t, b_t, a_l, b_l, l - t, t - l)
            q2 = tl.sum(q * q, axis=0)
            fq = tl.sum(f * q, axis=0)
        else:
            acc_q2 = tl.zeros([BLOCK], dtype=tl.float32)
            acc_fq = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n, BLOCK):
                offs = start + offs0
                ff, qq = _c_q(FT, XT, U, FL, row, offs, offs < n, a_t, b_t, a_l, b_l, l - t, t - l)
                acc_q2 += qq * qq
                acc_fq += ff * qq
            q2 = tl.sum(acc_q2, axis=0)
            fq = tl.sum(acc_fq, axis=0)
        q2 = q2 / n
        w = 1.0 / tl.exp(p * tl.log(q2 + eps))  # 1 / (mean(q^2) + eps)^p, a constant
        coef = sign * w / n * inv_B  # d/dF_t of mean_i(sign_i w_i mean_j(F_t q)) with q, w constant
        if ONE_PASS:
            tl.store(GRAD + row + offs0, coef * q, mask=msk)
        else:
            for start in range(0, n, BLOCK):
                offs = start + offs0
                ff, qq = _c_q(FT, XT, U, FL, row, offs, offs < n, a_t, b_t, a_l, b_l, l - t, t - l)
                tl.store(GRAD + row + offs, coef * qq, mask=offs < n)
        tl.store(ROW_LOSS + i, sign * (fq / n) * w)
        tl.store(ROW_Q2 + i, q2)
        tl.store(ROW_W + i, w)


def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).contiguous()


def _launch_cfg(n: int) -> tuple[int, bool, int]:
    block = min(next_pow2(n), MAX_BLOCK)
    return block, n <= block, 8 if block >= 2048 else 4


def _terms(row_loss: Tensor, row_mse: Tensor, row_w: Tensor, grad: Tensor):
    return row_loss.mean(), row_mse.mean(), row_w.mean(), grad


# -- registered ops -------------------------------------------------------------------------------
class Losses(NamedTuple):
    """The public functions of one registration (what soflow_fast.kernel_ops hands the step)."""
    fm_loss: Callable[..., LossTerms]
    consistency_loss: Callable[..., LossTerms]


def _register(reg: Registration) -> Losses:
    """Register the two losses as reg.namespace::name the way reg says (soflow_fast.kernels._common); the public
    functions calling them."""
    ns, launch = reg.namespace, reg.launch

    @reg.define(f"{ns}::fm_loss", mutates_args=())
    def fm_op(F_pred: Tensor, v_t: Tensor, t: Tensor, F_unc: Optional[Tensor], mask: Optional[Tensor],
              coef_trig: bool, p: float, eps: float, cfg_scale: float, mix_ratio: float, cfg_decay_time: float
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        B = F_pred.shape[0]
        F2, V2 = _rows(F_pred), _rows(v_t)
        n = F2.shape[1]
        guided = F_unc is not None
        FU = _rows(F_unc) if guided else F2
        M = mask.to(torch.int8).contiguous() if (guided and mask is not None) else F2
        f32 = dict(dtype=torch.float32, device=F2.device)
        row_loss, row_mse, row_w = (torch.empty(B, **f32) for _ in range(3))
        grad = torch.empty(F_pred.shape, **f32)
        block, one_pass, warps = _launch_cfg(n)
        launch(_fm_kernel)[(B,)](
            F2, V2, FU, M, t.contiguous(), row_loss, row_mse, row_w, grad, n, 1.0 / B, p, eps, cfg_scale - 1.0,
            mix_ratio, cfg_decay_time, CFG_DECAY_K, COEF_TRIG=coef_trig, GUIDED=guided,
            HAS_MASK=guided and mask is not None, DECAY=guided and cfg_decay_time < 1.0, BLOCK=block,
            ONE_PASS=one_pass, num_warps=warps)
        return _terms(row_loss, row_mse, row_w, grad)

    @reg.define(f"{ns}::consistency_loss", mutates_args=())
    def c_op(F_t: Tensor, x_t: Tensor, u: Tensor, t: Tensor, s: Tensor, l: Tensor, F_l: Tensor, coef_trig: bool,
             p: float, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        B = F_t.shape[0]
        FT = _rows(F_t)
        n = FT.shape[1]
        f32 = dict(dtype=torch.float32, device=FT.device)
        row_loss, row_q2, row_w = (torch.empty(B, **f32) for _ in range(3))
        grad = torch.empty(F_t.shape, **f32)
        block, one_pass, warps = _launch_cfg(n)
        launch(_consistency_kernel)[(B,)](
            FT, _rows(x_t), _rows(u), _rows(F_l), t.contiguous(), s.contiguous(), l.contiguous(), row_loss, row_q2,
            row_w, grad, n, 1.0 / B, p, eps, COEF_TRIG=coef_trig, BLOCK=block, ONE_PASS=one_pass, num_warps=warps)
        return _terms(row_loss, row_q2, row_w, grad)

    if reg.fake:
        fm_op.register_fake(_fake_terms)
        c_op.register_fake(_fake_terms)
    fm_op.register_autograd(_fm_backward, setup_context=_setup)
    c_op.register_autograd(_c_backward, setup_context=_setup)
    return _public(fm_op, c_op)


def _fake_terms(F, *args):
    """Three fp32 scalars and the fp32 gradient w.r.t. F (shapes for torch.compile's tracing of custom_op)."""
    z = F.new_empty((), dtype=torch.float32)
    return z, torch.empty_like(z), torch.empty_like(z), F.new_empty(F.shape, dtype=torch.float32)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[3])
    ctx.dtype = inputs[0].dtype


def _fm_backward(ctx, d_loss, d_mse, d_w, d_grad):
    (grad,) = ctx.saved_tensors
    return (grad * d_loss).to(ctx.dtype), *([None] * 10)


def _c_backward(ctx, d_loss, d_mse, d_w, d_grad):
    (grad,) = ctx.saved_tensors
    return (grad * d_loss).to(ctx.dtype), *([None] * 9)


# -- public functions ------------------------------------------------------------------------------
def _check_rows(op: str, ref: Tensor, **tensors: Optional[Tensor]) -> None:
    for name, v in tensors.items():
        if v is not None:
            check_shape(v, ref.shape if v.dim() > 1 else (ref.shape[0],), name, op)


def _public(fm_op, c_op) -> Losses:
    """Shape checks, and float64 to the eager twin (the kernels compute in fp32; fp64 callers check the math)."""
    def fm_loss(flow: Flow, F_pred: Tensor, x_t: Tensor, v_t: Tensor, t: Tensor, *, p: float, eps: float,
                F_unc: Optional[Tensor] = None, mask: Optional[Tensor] = None, cfg_scale: float = 1.0,
                mix_ratio: float = 1.0, cfg_decay_time: float = 1.0) -> LossTerms:
        """Fused soflow_fast.loss.fm_loss: same values, same gradient w.r.t. F_pred."""
        _check_rows("fm_loss", F_pred, x_t=x_t, v_t=v_t, t=t, F_unc=F_unc, mask=mask)
        if F_pred.dtype == torch.float64:
            return eager.fm_loss(flow, F_pred, x_t, v_t, t, p=p, eps=eps, F_unc=F_unc, mask=mask,
                                 cfg_scale=cfg_scale, mix_ratio=mix_ratio, cfg_decay_time=cfg_decay_time)
        loss, mse, w, _ = fm_op(F_pred, v_t, t, F_unc, mask, flow.coefficient == "trig", float(p), float(eps),
                                float(cfg_scale), float(mix_ratio), float(cfg_decay_time))
        return LossTerms(loss, mse.detach(), w.detach())

    def consistency_loss(flow: Flow, F_t: Tensor, x_t: Tensor, u: Tensor, t: Tensor, s: Tensor, l: Tensor,
                         F_l: Tensor, *, p: float, eps: float) -> LossTerms:
        """Fused soflow_fast.loss.consistency_loss: same values, same gradient w.r.t. F_t (F_l gets none)."""
        _check_rows("consistency_loss", F_t, x_t=x_t, u=u, t=t, s=s, l=l, F_l=F_l)
        if F_t.dtype == torch.float64:
            return eager.consistency_loss(flow, F_t, x_t, u, t, s, l, F_l, p=p, eps=eps)
        loss, mse, w, _ = c_op(F_t, x_t, u, t, s, l, F_l.detach(), flow.coefficient == "trig", float(p),
                               float(eps))
        return LossTerms(loss, mse.detach(), w.detach())

    return Losses(fm_loss, consistency_loss)


REGISTERED = {reg.namespace: _register(reg) for reg in (CUSTOM, INLINE)}


def functions(device_type: str) -> Losses:
    """The public functions for models on this device type (the registration chosen once, at build)."""
    return REGISTERED[registration_for(device_type).namespace]


# The custom_op registration's functions by name: tests and benchmarks call these.
fm_loss, consistency_loss = REGISTERED[CUSTOM.namespace]
