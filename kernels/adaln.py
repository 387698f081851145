"""Fused adaLN kernels: LayerNorm + modulate, gated residual, and the two fused (DiT block's middle).

Eager twins: soflow_fast.ops.layernorm_modulate_eager, gated_residual_eager and
gated_residual_layernorm_modulate_eager. One forward and one backward kernel serve all three ops, switched by
constexpr flags:
  forward   res = x + gate[b] * y (HAS_RES);  h = LN(res or x) * (1 + scale[b]) + shift[b] (HAS_NORM)
  backward  dh -> dx_ln, dshift, dscale (HAS_NORM);  total = dx_ln + dres;  dy = total * gate, dgate (HAS_RES)
Each program holds BLOCK_T whole rows of one sample b (so shift/scale/gate are loaded once and LN statistics are
row-local). The backward's sums over T (dshift, dscale, dgate) go to per-chunk partials [B, chunks, D] in fp32,
summed afterwards: deterministic, no atomics. LN statistics are fp32 and recomputed in the backward (cheaper than
saving them: the row is loaded anyway). Intermediate products are rounded to the dtype torch would round them to,
so the forward is the eager twin's arithmetic, not merely close to it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from soflow_fast.ops import (LN_EPS, gated_residual_eager, gated_residual_layernorm_modulate_eager,
                             layernorm_modulate_eager)

from ._common import (HAVE_TRITON, check_shape, dtype_code, programs_target, reduction_chunks, row_tile, cdiv,
                      use_triton)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _round(v, CODE: tl.constexpr):
        """v (fp32) rounded to nearest-even in the dtype with code CODE (0 fp32, 1 bf16, 2 fp16), kept as fp32.

        bf16 is rounded by hand on the bits: the Triton interpreter's fp32 -> bf16 cast truncates, and this way the
        interpreter and the GPU both round like torch.
        """
        if CODE == 1:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
        elif CODE == 2:
            v = v.to(tl.float16).to(tl.float32)
        return v

    @triton.jit
    def _adaln_fwd_kernel(X, GATE, Y, SHIFT, SCALE, RES, OUT, T, D, eps,
                          HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr, PROD_DT: tl.constexpr,
                          RES_DT: tl.constexpr, OUT_DT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask = (rows < T)[:, None] & cmask[None, :]
        offs = (b * T + rows).to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            g = tl.load(GATE + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
            x = _round(x + _round(g[None, :] * y, PROD_DT), RES_DT)
            tl.store(RES + offs, x.to(RES.dtype.element_ty), mask=mask)  # x is already rounded to RES_DT
        if HAS_NORM:
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
            shift = tl.load(SHIFT + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
            scale = tl.load(SCALE + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
            h = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
            tl.store(OUT + offs, _round(h, OUT_DT).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _adaln_bwd_kernel(DH, DRES, XN, GATE, Y, SCALE, DX, DY, P_SHIFT, P_SCALE, P_GATE, T, D, rows_per_chunk, eps,
                          HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr, HAS_DRES: tl.constexpr,
                          STORE_DX: tl.constexpr, PROD_DT: tl.constexpr, DX_DT: tl.constexpr, DY_DT: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_NORM:
            scale = tl.load(SCALE + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_RES:
            g = tl.load(GATE + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
        start = chunk * rows_per_chunk
        for r0 in range(0, rows_per_chunk, BLOCK_T):
            rows = start + r0 + tl.arange(0, BLOCK_T)
            mask = (rows < T)[:, None] & cmask[None, :]
            offs = (b * T + rows).to(tl.int64)[:, None] * D + cols[None, :]
            total = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            if HAS_NORM:
                x = tl.load(XN + offs, mask=mask, other=0.0).to(tl.float32)
                dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
                mean = tl.sum(x, axis=1) / D
                xc = tl.where(mask, x - mean[:, None], 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
                xhat = xc * rstd[:, None]
                acc_shift += tl.sum(dh, axis=0)
                acc_scale += tl.sum(dh * xhat, axis=0)
                dxhat = dh * (1.0 + scale[None, :])
                c1 = tl.sum(dxhat * xhat, axis=1) / D
                c2 = tl.sum(dxhat, axis=1) / D
                total = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_DRES:
                total += tl.load(DRES + offs, mask=mask, other=0.0).to(tl.float32)
            if STORE_DX:
                tl.store(DX + offs, _round(total, DX_DT).to(DX.dtype.element_ty), mask=mask)
            if HAS_RES:
                dp = _round(total, PROD_DT)  # the gradient reaching gate * y, in the product's dtype
                y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(DY + offs, _round(dp * g[None, :], DY_DT).to(DY.dtype.element_ty), mask=mask)
                acc_gate += tl.sum(dp * y, axis=0)
        p_offs = (b * tl.num_programs(1) + chunk) * D + cols
        if HAS_NORM:
            tl.store(P_SHIFT + p_offs, acc_shift, mask=cmask)
            tl.store(P_SCALE + p_offs, acc_scale, mask=cmask)
        if HAS_RES:
            tl.store(P_GATE + p_offs, acc_gate, mask=cmask)


# -- launchers ------------------------------------------------------------------------------------
def _fwd(x: Tensor, gate: Optional[Tensor], y: Optional[Tensor], shift: Optional[Tensor],
         scale: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(res, h): res = x + gate * y when gate is given, h = LN-modulate(res or x) when shift is given."""
    B, T, D = x.shape
    has_res, has_norm = gate is not None, shift is not None
    x = x.contiguous()
    res = h = None
    prod_dt = res_dt = 0
    if has_res:
        y = y.contiguous()
        prod_dtype = torch.promote_types(gate.dtype, y.dtype)
        res = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, prod_dtype), device=x.device)
        prod_dt, res_dt = dtype_code(prod_dtype, "gate * y"), dtype_code(res.dtype, "x + gate * y")
    if has_norm:
        h = torch.empty_like(res if has_res else x)
    block_t, block_d, warps = row_tile(D)
    _adaln_fwd_kernel[(B, cdiv(T, block_t))](
        x, gate.contiguous() if has_res else x, y if has_res else x,
        shift.contiguous() if has_norm else x, scale.contiguous() if has_norm else x,
        res if has_res else x, h if has_norm else x, T, D, LN_EPS,
        HAS_RES=has_res, HAS_NORM=has_norm, PROD_DT=prod_dt, RES_DT=res_dt,
        OUT_DT=dtype_code(h.dtype, "h") if has_norm else 0,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    return res, h


def _bwd(dh: Optional[Tensor], dres: Optional[Tensor], xn: Optional[Tensor], gate: Optional[Tensor],
         y: Optional[Tensor], scale: Optional[Tensor], store_dx: bool):
    """(dx, dy, dgate, dshift, dscale), the reduced ones fp32 [B, D]; None where the op has no such input."""
    like = dh if dh is not None else dres
    B, T, D = like.shape
    has_res, has_norm = gate is not None, dh is not None
    block_t, block_d, warps = row_tile(D)
    rows, chunks = reduction_chunks(B, T, block_t, programs_target(like))
    f32 = dict(dtype=torch.float32, device=like.device)
    p_shift = torch.empty(B, chunks, D, **f32) if has_norm else None
    p_scale = torch.empty(B, chunks, D, **f32) if has_norm else None
    p_gate = torch.empty(B, chunks, D, **f32) if has_res else None
    dx = torch.empty_like(xn if xn is not None else like) if store_dx else None
    prod_dt = 0
    if has_res:
        y = y.contiguous()
        prod_dtype = torch.promote_types(gate.dtype, y.dtype)
        prod_dt = dtype_code(prod_dtype, "gate * y")
    dy = torch.empty_like(y) if has_res else None
    c = lambda t: like if t is None else t.contiguous()  # noqa: E731 (unused pointers get a valid tensor)
    _adaln_bwd_kernel[(B, chunks)](
        c(dh), c(dres), c(xn), c(gate), c(y), c(scale), c(dx), c(dy), c(p_shift), c(p_scale), c(p_gate),
        T, D, rows, LN_EPS, HAS_RES=has_res, HAS_NORM=has_norm, HAS_DRES=dres is not None, STORE_DX=store_dx,
        PROD_DT=prod_dt, DX_DT=dtype_code(dx.dtype, "dx") if store_dx else 0,
        DY_DT=dtype_code(dy.dtype, "dy") if has_res else 0, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    s = lambda p: None if p is None else p.sum(dim=1)  # noqa: E731
    return dx, dy, s(p_gate), s(p_shift), s(p_scale)


# -- registered ops -------------------------------------------------------------------------------
@torch.library.custom_op("soflow::layernorm_modulate", mutates_args=())
def _ln_mod_op(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return _fwd(x, None, None, shift, scale)[1]


@_ln_mod_op.register_fake
def _(x, shift, scale):
    return torch.empty_like(x)


@torch.library.custom_op("soflow::layernorm_modulate_backward", mutates_args=())
def _ln_mod_bwd_op(dh: Tensor, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dx, _, _, dshift, dscale = _bwd(dh.contiguous(), None, x.contiguous(), None, None, scale, store_dx=True)
    return dx, dshift, dscale


@_ln_mod_bwd_op.register_fake
def _(dh, x, scale):
    B, _, D = x.shape
    return torch.empty_like(x), x.new_empty(B, D, dtype=torch.float32), x.new_empty(B, D, dtype=torch.float32)


def _ln_mod_setup(ctx, inputs, output):
    x, shift, scale = inputs
    ctx.save_for_backward(x, scale)
    ctx.dtypes = (shift.dtype, scale.dtype)


def _ln_mod_backward(ctx, dh):
    x, scale = ctx.saved_tensors
    dx, dshift, dscale = _ln_mod_bwd_op(dh, x, scale)
    return dx, dshift.to(ctx.dtypes[0]), dscale.to(ctx.dtypes[1])


_ln_mod_op.register_autograd(_ln_mod_backward, setup_context=_ln_mod_setup)


@torch.library.custom_op("soflow::gated_residual", mutates_args=())
def _gated_res_op(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return _fwd(x, gate, y, None, None)[0]


@_gated_res_op.register_fake
def _(x, gate, y):
    dtype = torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("soflow::gated_residual_backward", mutates_args=())
def _gated_res_bwd_op(dout: Tensor, gate: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    _, dy, dgate, _, _ = _bwd(None, dout.contiguous(), None, gate, y, None, store_dx=False)
    return dy, dgate


@_gated_res_bwd_op.register_fake
def _(dout, gate, y):
    return torch.empty_like(y), gate.new_empty(gate.shape, dtype=torch.float32)


def _gated_res_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)
    ctx.dtypes = (x.dtype, gate.dtype)


def _gated_res_backward(ctx, dout):
    gate, y = ctx.saved_tensors
    dy, dgate = _gated_res_bwd_op(dout, gate, y)
    return dout.to(ctx.dtypes[0]), dgate.to(ctx.dtypes[1]), dy  # d/dx of x + gate * y is the identity


_gated_res_op.register_autograd(_gated_res_backward, setup_context=_gated_res_setup)


@torch.library.custom_op("soflow::gated_residual_layernorm_modulate", mutates_args=())
def _fused_op(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    return _fwd(x, gate, y, shift, scale)


@_fused_op.register_fake
def _(x, gate, y, shift, scale):
    dtype = torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("soflow::gated_residual_layernorm_modulate_backward", mutates_args=())
def _fused_bwd_op(dres: Optional[Tensor], dh: Tensor, res: Tensor, gate: Tensor, y: Tensor,
                  scale: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _bwd(dh.contiguous(), dres, res.contiguous(), gate, y, scale, store_dx=True)


@_fused_bwd_op.register_fake
def _(dres, dh, res, gate, y, scale):
    B, _, D = res.shape
    f32 = lambda: res.new_empty(B, D, dtype=torch.float32)  # noqa: E731
    return torch.empty_like(res), torch.empty_like(y), f32(), f32(), f32()


def _fused_setup(ctx, inputs, output):
    x, gate, y, shift, scale = inputs
    ctx.save_for_backward(output[0], gate, y, scale)
    ctx.dtypes = (x.dtype, gate.dtype, shift.dtype, scale.dtype)


def _fused_backward(ctx, dres, dh):
    res, gate, y, scale = ctx.saved_tensors
    if dh is None:
        dh = torch.zeros_like(res)
    dx, dy, dgate, dshift, dscale = _fused_bwd_op(dres, dh, res, gate, y, scale)
    return dx.to(ctx.dtypes[0]), dgate.to(ctx.dtypes[1]), dy, dshift.to(ctx.dtypes[2]), dscale.to(ctx.dtypes[3])


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


# -- public functions (what soflow_fast.kernel_ops hands the model) ------------------------------
def _check(op: str, x: Tensor, **per_sample: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, T, D], got shape {list(x.shape)}")
    for name, v in per_sample.items():
        check_shape(v, (x.shape[0], x.shape[2]), name, op)


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """LN(x) (no affine, eps 1e-6, fp32 statistics) * (1 + scale[b]) + shift[b], in x.dtype."""
    _check("layernorm_modulate", x, shift=shift, scale=scale)
    if not use_triton(x):
        return layernorm_modulate_eager(x, shift, scale)
    return _ln_mod_op(x.contiguous(), shift.contiguous(), scale.contiguous())


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x + gate[b] * y."""
    _check("gated_residual", x, gate=gate)
    check_shape(y, x.shape, "y", "gated_residual")
    if not use_triton(x):
        return gated_residual_eager(x, gate, y)
    return _gated_res_op(x.contiguous(), gate.contiguous(), y.contiguous())


def gated_residual_layernorm_modulate(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor,
                                      scale: Tensor) -> tuple[Tensor, Tensor]:
    """(res, h) with res = x + gate[b] * y and h = layernorm_modulate(res, shift, scale), in one pass."""
    _check("gated_residual_layernorm_modulate", x, gate=gate, shift=shift, scale=scale)
    check_shape(y, x.shape, "y", "gated_residual_layernorm_modulate")
    if not use_triton(x):
        return gated_residual_layernorm_modulate_eager(x, gate, y, shift, scale)
    return _fused_op(x.contiguous(), gate.contiguous(), y.contiguous(), shift.contiguous(), scale.contiguous())
