"""Fused adaLN kernels: LayerNorm + modulate, gated residual, and the two fused (DiT block's middle).

Eager twins: soflow_fast.ops.layernorm_modulate_eager, gated_residual_eager and
gated_residual_layernorm_modulate_eager. One forward and one backward kernel serve all three ops, switched by
constexpr flags:
  forward   res = x + gate[b] * y (HAS_RES);  h = LN(res or x) * (1 + scale[b]) + shift[b] (HAS_NORM)
  backward  dh -> dx_ln, dshift, dscale (HAS_NORM);  total = dx_ln + dres;  dy = total * gate, dgate (HAS_RES)
Each program holds BLOCK_T whole rows of one sample b (so shift/scale/gate are loaded once and LN statistics are
row-local). The backward's sums over T (dshift, dscale, dgate) are written by the backward kernel itself, in
their final dtype, when one chunk of rows per sample suffices; otherwise it writes per-chunk fp32 partials
[B, chunks, D] that a small kernel sums in chunk order and writes in the final dtype. Deterministic: no atomics.
LN statistics are fp32 and recomputed in the backward (cheaper than saving them: the row is loaded anyway).
Intermediate products are rounded to the dtype torch would round them to, so the forward is the eager twin's
arithmetic, not merely close to it. Every output is written in its own dtype by the kernel that computes it.

Each op is registered twice from the same launchers (soflow_fast.kernels._common.Registration): custom_op as
soflow::<op> and triton_op as soflow_triton::<op>; functions(device_type) gives a model the one for its device.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from soflow_fast.ops import (LN_EPS, gated_residual_eager, gated_residual_layernorm_modulate_eager,
                             layernorm_modulate_eager)

from ._common import (CUSTOM, HAVE_TRITON, INLINE, Registration, cdiv, check_shape, dtype_code, next_pow2,
                      programs_target, reduction_chunks, registration_for, row_tile)

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
                          NORM_DT: tl.constexpr, GATE_DT: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_D: tl.constexpr):
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
        # One chunk: the final [B, D] gradients in their dtypes (NORM_DT, GATE_DT); else fp32 partials (codes 0).
        p_offs = (b * tl.num_programs(1) + chunk) * D + cols
        if HAS_NORM:
            tl.store(P_SHIFT + p_offs, _round(acc_shift, NORM_DT).to(P_SHIFT.dtype.element_ty), mask=cmask)
            tl.store(P_SCALE + p_offs, _round(acc_scale, NORM_DT).to(P_SCALE.dtype.element_ty), mask=cmask)
        if HAS_RES:
            tl.store(P_GATE + p_offs, _round(acc_gate, GATE_DT).to(P_GATE.dtype.element_ty), mask=cmask)

    @triton.jit
    def _sum_chunks_kernel(P_SHIFT, P_SCALE, P_GATE, DSHIFT, DSCALE, DGATE, chunks, D, HAS_NORM: tl.constexpr,
                           HAS_RES: tl.constexpr, NORM_DT: tl.constexpr, GATE_DT: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        """[B, chunks, D] fp32 partials -> [B, D] in the gradients' dtypes, summed in chunk order."""
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c in range(0, chunks):
            offs = (b * chunks + c) * D + cols
            if HAS_NORM:
                acc_shift += tl.load(P_SHIFT + offs, mask=cmask, other=0.0)
                acc_scale += tl.load(P_SCALE + offs, mask=cmask, other=0.0)
            if HAS_RES:
                acc_gate += tl.load(P_GATE + offs, mask=cmask, other=0.0)
        out = b * D + cols
        if HAS_NORM:
            tl.store(DSHIFT + out, _round(acc_shift, NORM_DT).to(DSHIFT.dtype.element_ty), mask=cmask)
            tl.store(DSCALE + out, _round(acc_scale, NORM_DT).to(DSCALE.dtype.element_ty), mask=cmask)
        if HAS_RES:
            tl.store(DGATE + out, _round(acc_gate, GATE_DT).to(DGATE.dtype.element_ty), mask=cmask)


# -- launchers (shared by both registrations: `launch` is the Registration's) ---------------------
def _fwd(launch: Callable, x: Tensor, gate: Optional[Tensor], y: Optional[Tensor], shift: Optional[Tensor],
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
    launch(_adaln_fwd_kernel)[(B, cdiv(T, block_t))](
        x, gate.contiguous() if has_res else x, y if has_res else x,
        shift.contiguous() if has_norm else x, scale.contiguous() if has_norm else x,
        res if has_res else x, h if has_norm else x, T, D, LN_EPS,
        HAS_RES=has_res, HAS_NORM=has_norm, PROD_DT=prod_dt, RES_DT=res_dt,
        OUT_DT=dtype_code(h.dtype, "h") if has_norm else 0,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    return res, h


def _bwd(launch: Callable, dh: Optional[Tensor], dres: Optional[Tensor], xn: Optional[Tensor],
         gate: Optional[Tensor], y: Optional[Tensor], scale: Optional[Tensor], store_dx: bool):
    """(dx, dy, dgate, dshift, dscale); dgate in gate's dtype, dshift and dscale in scale's; None where the op has
    no such input."""
    like = dh if dh is not None else dres
    B, T, D = like.shape
    has_res, has_norm = gate is not None, dh is not None
    block_t, block_d, warps = row_tile(D)
    rows, chunks = reduction_chunks(B, T, block_t, programs_target(like))
    dshift = like.new_empty(B, D, dtype=scale.dtype) if has_norm else None
    dscale = torch.empty_like(dshift) if has_norm else None
    dgate = like.new_empty(B, D, dtype=gate.dtype) if has_res else None
    finals = (dshift, dscale, dgate)
    if chunks > 1:
        partials = tuple(None if t is None else like.new_empty(B, chunks, D, dtype=torch.float32) for t in finals)
    else:
        partials = finals
    dx = torch.empty_like(xn if xn is not None else like) if store_dx else None
    prod_dt = 0
    if has_res:
        y = y.contiguous()
        prod_dt = dtype_code(torch.promote_types(gate.dtype, y.dtype), "gate * y")
    dy = torch.empty_like(y) if has_res else None
    norm_dt = dtype_code(scale.dtype, "dscale") if has_norm else 0
    gate_dt = dtype_code(gate.dtype, "dgate") if has_res else 0
    c = lambda t: like if t is None else t.contiguous()  # noqa: E731 (unused pointers get a valid tensor)
    launch(_adaln_bwd_kernel)[(B, chunks)](
        c(dh), c(dres), c(xn), c(gate), c(y), c(scale), c(dx), c(dy), *map(c, partials),
        T, D, rows, LN_EPS, HAS_RES=has_res, HAS_NORM=has_norm, HAS_DRES=dres is not None, STORE_DX=store_dx,
        PROD_DT=prod_dt, DX_DT=dtype_code(dx.dtype, "dx") if store_dx else 0,
        DY_DT=dtype_code(dy.dtype, "dy") if has_res else 0, NORM_DT=0 if chunks > 1 else norm_dt,
        GATE_DT=0 if chunks > 1 else gate_dt, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    if chunks > 1:
        sum_d = min(next_pow2(D), 1024)
        launch(_sum_chunks_kernel)[(B, cdiv(D, sum_d))](
            *map(c, partials), *map(c, finals), chunks, D, HAS_NORM=has_norm, HAS_RES=has_res, NORM_DT=norm_dt,
            GATE_DT=gate_dt, BLOCK_D=sum_d)
    return dx, dy, dgate, dshift, dscale


# -- registered ops -------------------------------------------------------------------------------
class AdaLN(NamedTuple):
    """The public functions of one registration (what soflow_fast.kernel_ops hands the model)."""
    layernorm_modulate: Callable[[Tensor, Tensor, Tensor], Tensor]
    gated_residual: Callable[[Tensor, Tensor, Tensor], Tensor]
    gated_residual_layernorm_modulate: Callable[..., tuple[Tensor, Tensor]]


def _register(reg: Registration) -> AdaLN:
    """Register the three ops and their backward ops as reg.namespace::name the way reg says; the public functions."""
    ns, launch = reg.namespace, reg.launch

    @reg.define(f"{ns}::layernorm_modulate", mutates_args=())
    def ln_mod(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return _fwd(launch, x, None, None, shift, scale)[1]

    @reg.define(f"{ns}::layernorm_modulate_backward", mutates_args=())
    def ln_mod_bwd(dh: Tensor, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dx, _, _, dshift, dscale = _bwd(launch, dh.contiguous(), None, x.contiguous(), None, None, scale, True)
        return dx, dshift, dscale

    @reg.define(f"{ns}::gated_residual", mutates_args=())
    def gated_res(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
        return _fwd(launch, x, gate, y, None, None)[0]

    @reg.define(f"{ns}::gated_residual_backward", mutates_args=())
    def gated_res_bwd(dout: Tensor, gate: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        _, dy, dgate, _, _ = _bwd(launch, None, dout.contiguous(), None, gate, y, None, False)
        return dy, dgate

    @reg.define(f"{ns}::gated_residual_layernorm_modulate", mutates_args=())
    def fused(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        return _fwd(launch, x, gate, y, shift, scale)

    @reg.define(f"{ns}::gated_residual_layernorm_modulate_backward", mutates_args=())
    def fused_bwd(dres: Optional[Tensor], dh: Tensor, res: Tensor, gate: Tensor, y: Tensor,
                  scale: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _bwd(launch, dh.contiguous(), dres, res.contiguous(), gate, y, scale, True)

    if reg.fake:
        _register_fakes(ln_mod, ln_mod_bwd, gated_res, gated_res_bwd, fused, fused_bwd)

    def ln_mod_setup(ctx, inputs, output):
        x, shift, scale = inputs
        ctx.save_for_backward(x, scale)
        ctx.shift_dtype = shift.dtype

    def ln_mod_backward(ctx, dh):
        x, scale = ctx.saved_tensors
        dx, dshift, dscale = ln_mod_bwd(dh, x, scale)
        return dx, dshift.to(ctx.shift_dtype), dscale  # .to: a no-op unless shift's dtype is not scale's

    def gated_res_setup(ctx, inputs, output):
        x, gate, y = inputs
        ctx.save_for_backward(gate, y)
        ctx.x_dtype = x.dtype

    def gated_res_backward(ctx, dout):
        gate, y = ctx.saved_tensors
        dy, dgate = gated_res_bwd(dout, gate, y)
        return dout.to(ctx.x_dtype), dgate, dy  # d/dx of x + gate * y is the identity

    def fused_setup(ctx, inputs, output):
        x, gate, y, shift, scale = inputs
        ctx.save_for_backward(output[0], gate, y, scale)
        ctx.dtypes = (x.dtype, shift.dtype)

    def fused_backward(ctx, dres, dh):
        res, gate, y, scale = ctx.saved_tensors
        if dh is None:
            dh = torch.zeros_like(res)
        dx, dy, dgate, dshift, dscale = fused_bwd(dres, dh, res, gate, y, scale)
        return dx.to(ctx.dtypes[0]), dgate, dy, dshift.to(ctx.dtypes[1]), dscale

    ln_mod.register_autograd(ln_mod_backward, setup_context=ln_mod_setup)
    gated_res.register_autograd(gated_res_backward, setup_context=gated_res_setup)
    fused.register_autograd(fused_backward, setup_context=fused_setup)
    return _public(ln_mod, gated_res, fused)


def _register_fakes(ln_mod, ln_mod_bwd, gated_res, gated_res_bwd, fused, fused_bwd) -> None:
    """Output shapes and dtypes for torch.compile's tracing of the custom_op registration."""
    def promoted(x, gate, y):
        return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype)))

    ln_mod.register_fake(lambda x, shift, scale: torch.empty_like(x))
    ln_mod_bwd.register_fake(lambda dh, x, scale: (torch.empty_like(x), scale.new_empty(scale.shape),
                                                   scale.new_empty(scale.shape)))
    gated_res.register_fake(promoted)
    gated_res_bwd.register_fake(lambda dout, gate, y: (torch.empty_like(y), torch.empty_like(gate)))
    fused.register_fake(lambda x, gate, y, shift, scale: (promoted(x, gate, y), promoted(x, gate, y)))
    fused_bwd.register_fake(lambda dres, dh, res, gate, y, scale: (
        torch.empty_like(res), torch.empty_like(y), torch.empty_like(gate), torch.empty_like(scale),
        torch.empty_like(scale)))


def _check(op: str, x: Tensor, **per_sample: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, T, D], got shape {list(x.shape)}")
    for name, v in per_sample.items():
        check_shape(v, (x.shape[0], x.shape[2]), name, op)


def _public(ln_mod, gated_res, fused) -> AdaLN:
    """Shape checks, and float64 to the eager twin (the kernels compute in fp32; fp64 callers check the math)."""
    def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        """LN(x) (no affine, eps 1e-6, fp32 statistics) * (1 + scale[b]) + shift[b], in x.dtype."""
        _check("layernorm_modulate", x, shift=shift, scale=scale)
        if x.dtype == torch.float64:
            return layernorm_modulate_eager(x, shift, scale)
        return ln_mod(x.contiguous(), shift.contiguous(), scale.contiguous())

    def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
        """x + gate[b] * y."""
        _check("gated_residual", x, gate=gate)
        check_shape(y, x.shape, "y", "gated_residual")
        if x.dtype == torch.float64:
            return gated_residual_eager(x, gate, y)
        return gated_res(x.contiguous(), gate.contiguous(), y.contiguous())

    def gated_residual_layernorm_modulate(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor,
                                          scale: Tensor) -> tuple[Tensor, Tensor]:
        """(res, h) with res = x + gate[b] * y and h = layernorm_modulate(res, shift, scale), in one pass."""
        _check("gated_residual_layernorm_modulate", x, gate=gate, shift=shift, scale=scale)
        check_shape(y, x.shape, "y", "gated_residual_layernorm_modulate")
        if x.dtype == torch.float64:
            return gated_residual_layernorm_modulate_eager(x, gate, y, shift, scale)
        return fused(x.contiguous(), gate.contiguous(), y.contiguous(), shift.contiguous(), scale.contiguous())

    return AdaLN(layernorm_modulate, gated_residual, gated_residual_layernorm_modulate)


REGISTERED = {reg.namespace: _register(reg) for reg in (CUSTOM, INLINE)}


def functions(device_type: str) -> AdaLN:
    """The public functions for models on this device type (the registration chosen once, at build)."""
    return REGISTERED[registration_for(device_type).namespace]


# The custom_op registration's functions by name: tests and benchmarks call these.
layernorm_modulate, gated_residual, gated_residual_layernorm_modulate = REGISTERED[CUSTOM.namespace]
