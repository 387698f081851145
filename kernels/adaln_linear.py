"""adaLN fused into the neighbouring GEMM, which torch.compile does not do: the DiT block's LayerNorm + modulate as
the prologue of the linear that follows it, and the gated residual as the epilogue of the linear before it.

Eager twins: soflow_fast.ops.layernorm_modulate_linear_eager and linear_gated_residual_eager.
  layernorm_modulate_linear  out = h @ W^T + bias,  h = LN(x) * (1 + scale[b]) + shift[b]
      a pre-pass writes each row's LN statistics (fp32 mean and 1/std, two passes over the row in registers); the
      matmul kernel normalises and modulates each [BLOCK_M, BLOCK_K] tile of x as it loads it, so h never goes
      to memory. h is rounded to x's dtype (as the twin's h), then to the GEMM's dtype (W's), before the dot.
  linear_gated_residual      out = x + gate[b] * lin,  lin = a @ W^T + bias
      the matmul kernel's epilogue adds the bias, rounds lin to the GEMM's dtype, then forms x + gate * lin with
      torch's rounding of the product and the sum (as kernels/adaln.py); it also writes lin, which the backward
      needs (eager autograd keeps the same tensor for the product's backward).
The GEMM's dtype is W's, or autocast's when autocast is on (the wrapper casts a, W and bias as F.linear would).
The backward is torch matmuls for the linear plus kernels/adaln.py's backward ops of the same registration: dh =
dout @ W (h recomputed by the LN + modulate forward op), then layernorm_modulate_backward; gated_residual_backward
gives dlin and dgate, then da = dlin @ W. Both backwards are deterministic (no atomics).
Not done: no autotuning (one tile shape per device type); the CPU bf16 emulator (soflow_fast.emulate) does not see
inside these ops, so under it they run at the dtypes they are given.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from soflow_fast.ops import LN_EPS, layernorm_modulate_linear_eager, linear_gated_residual_eager

from . import adaln  # noqa: F401 (registers the adaLN backward ops these backwards call)
from ._common import (CUSTOM, HAVE_TRITON, INLINE, Registration, cdiv, check_shape, dtype_code, registration_for,
                      row_tile)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .adaln import _round

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr, F32: tl.constexpr):
        """a @ b accumulated in fp32. F32 (the interpreter, whose bf16 dot is wrong): the operands upcast, exact for
        bf16/fp16 values (their products fit fp32), so the same sums as the GPU's tensor-core dot."""
        if F32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _row_stats_kernel(X, MEAN, RSTD, M, D, eps, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows < M)[:, None] & (cols < D)[None, :]
        x = tl.load(X + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(MEAN + rows, mean, mask=rows < M)
        tl.store(RSTD + rows, 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps), mask=rows < M)

    @triton.jit
    def _ln_linear_kernel(X, MEAN, RSTD, SHIFT, SCALE, W, BIAS, OUT, M, N, K, T, H_DT: tl.constexpr,
                          GEMM_DT: tl.constexpr, IEEE: tl.constexpr, F32: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = rm < M, rn < N
        b = rm // T  # each row's sample: a tile may span two
        mean = tl.load(MEAN + rm, mask=mmask, other=0.0)
        rstd = tl.load(RSTD + rm, mask=mmask, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            xm = mmask[:, None] & kmask[None, :]
            x = tl.load(X + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=xm, other=0.0).to(tl.float32)
            mod = b[:, None] * K + rk[None, :]
            scale = tl.load(SCALE + mod, mask=xm, other=0.0).to(tl.float32)
            shift = tl.load(SHIFT + mod, mask=xm, other=0.0).to(tl.float32)
            h = (x - mean[:, None]) * rstd[:, None] * (1.0 + scale) + shift
            h = _round(_round(h, H_DT), GEMM_DT)  # the twin's h in x's dtype, then autocast's cast
            w = tl.load(W + rn[None, :] * K + rk[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
            acc += _dot(h.to(W.dtype.element_ty), w, IEEE, F32)
        acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        out = rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(OUT + out, _round(acc, GEMM_DT).to(OUT.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def _linear_gated_residual_kernel(A, W, BIAS, X, GATE, OUT, LIN, M, N, K, T, GEMM_DT: tl.constexpr,
                                      PROD_DT: tl.constexpr, RES_DT: tl.constexpr, IEEE: tl.constexpr,
                                      F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                      BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = rm < M, rn < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            a = tl.load(A + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                        other=0.0)
            w = tl.load(W + rn[None, :] * K + rk[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
            acc += _dot(a, w, IEEE, F32)
        acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        lin = _round(acc, GEMM_DT)
        mask = mmask[:, None] & nmask[None, :]
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(LIN + offs, lin.to(LIN.dtype.element_ty), mask=mask)
        g = tl.load(GATE + (rm // T)[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        out = _round(x + _round(g * lin, PROD_DT), RES_DT)
        tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


def _tiles(t: Tensor) -> dict:
    """Block sizes: GPU tiles for tensor cores; on the interpreter the smallest tl.dot takes (it runs per program),
    with its dot in fp32 (F32)."""
    if t.device.type == "cuda":
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, F32=False, num_warps=8, num_stages=3)
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, F32=True, num_warps=4)


def _ieee(dtype: torch.dtype) -> bool:
    """fp32 GEMMs in full precision unless torch would use TF32 for them (torch.backends.cuda.matmul.allow_tf32)."""
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


# -- launchers (shared by both registrations) -----------------------------------------------------
def _ln_linear_fwd(launch: Callable, x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor,
                   bias: Tensor) -> Tensor:
    B, T, K = x.shape
    M, N = B * T, weight.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    mean, rstd = torch.empty(M, **f32), torch.empty(M, **f32)
    block_t, block_d, warps = row_tile(K)
    launch(_row_stats_kernel)[(cdiv(M, block_t),)](x, mean, rstd, M, K, LN_EPS, BLOCK_T=block_t, BLOCK_D=block_d,
                                                    num_warps=warps)
    out = x.new_empty(B, T, N, dtype=weight.dtype)
    tiles = _tiles(x)
    launch(_ln_linear_kernel)[(cdiv(M, tiles["BLOCK_M"]), cdiv(N, tiles["BLOCK_N"]))](
        x, mean, rstd, shift, scale, weight, bias, out, M, N, K, T, H_DT=dtype_code(x.dtype, "x"),
        GEMM_DT=dtype_code(weight.dtype, "weight"), IEEE=_ieee(weight.dtype), **tiles)
    return out


def _linear_gated_residual_fwd(launch: Callable, x: Tensor, gate: Tensor, a: Tensor, weight: Tensor,
                               bias: Tensor) -> tuple[Tensor, Tensor]:
    B, T, K = a.shape
    M, N = B * T, weight.shape[0]
    lin = a.new_empty(B, T, N, dtype=weight.dtype)
    prod_dtype = torch.promote_types(gate.dtype, lin.dtype)
    out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, prod_dtype))
    tiles = _tiles(x)
    launch(_linear_gated_residual_kernel)[(cdiv(M, tiles["BLOCK_M"]), cdiv(N, tiles["BLOCK_N"]))](
        a, weight, bias, x, gate, out, lin, M, N, K, T, GEMM_DT=dtype_code(weight.dtype, "weight"),
        PROD_DT=dtype_code(prod_dtype, "gate * lin"), RES_DT=dtype_code(out.dtype, "x + gate * lin"),
        IEEE=_ieee(weight.dtype), **tiles)
    return out, lin


def _linear_backward(dlin: Tensor, inp: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(d inp, dW, dbias) of lin = inp @ W^T + bias, by torch matmuls."""
    d2 = dlin.reshape(-1, dlin.shape[-1])
    return (d2 @ weight).reshape(inp.shape), d2.t() @ inp.reshape(-1, inp.shape[-1]), d2.sum(0)


# -- registered ops -------------------------------------------------------------------------------
class AdaLNLinear(NamedTuple):
    """The public functions of one registration (what soflow_fast.kernel_ops hands the model)."""
    layernorm_modulate_linear: Callable[..., Tensor]
    linear_gated_residual: Callable[..., Tensor]


def _register(reg: Registration) -> AdaLNLinear:
    """Register both ops as reg.namespace::name the way reg says; their backwards call kernels/adaln.py's backward
    ops of the same registration (torch.ops.<namespace>)."""
    ns, launch = reg.namespace, reg.launch
    adaln_ops = getattr(torch.ops, ns)

    @reg.define(f"{ns}::layernorm_modulate_linear", mutates_args=())
    def ln_linear(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return _ln_linear_fwd(launch, x, shift, scale, weight, bias)

    @reg.define(f"{ns}::linear_gated_residual", mutates_args=())
    def linear_gated(x: Tensor, gate: Tensor, a: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        return _linear_gated_residual_fwd(launch, x, gate, a, weight, bias)

    if reg.fake:
        ln_linear.register_fake(lambda x, shift, scale, weight, bias: x.new_empty(
            *x.shape[:2], weight.shape[0], dtype=weight.dtype))
        linear_gated.register_fake(lambda x, gate, a, weight, bias: (
            x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, torch.promote_types(gate.dtype, weight.dtype))),
            a.new_empty(*a.shape[:2], weight.shape[0], dtype=weight.dtype)))

    def ln_linear_setup(ctx, inputs, output):
        x, shift, scale, weight, _ = inputs
        ctx.save_for_backward(x, shift, scale, weight)

    def ln_linear_backward(ctx, dout):
        x, shift, scale, weight = ctx.saved_tensors
        h = adaln_ops.layernorm_modulate(x, shift, scale).to(weight.dtype)  # recomputed: cheaper than keeping it
        dh, dweight, dbias = _linear_backward(dout, h, weight)
        dx, dshift, dscale = adaln_ops.layernorm_modulate_backward(dh, x, scale)
        return dx, dshift.to(shift.dtype), dscale, dweight, dbias

    def linear_gated_setup(ctx, inputs, output):
        x, gate, a, weight, _ = inputs
        ctx.save_for_backward(gate, a, weight, output[1])
        ctx.x_dtype = x.dtype

    def linear_gated_backward(ctx, dout, _dlin):  # lin is internal (the public function returns out only)
        gate, a, weight, lin = ctx.saved_tensors
        dlin, dgate = adaln_ops.gated_residual_backward(dout, gate, lin)
        da, dweight, dbias = _linear_backward(dlin, a, weight)
        return dout.to(ctx.x_dtype), dgate, da, dweight, dbias

    ln_linear.register_autograd(ln_linear_backward, setup_context=ln_linear_setup)
    linear_gated.register_autograd(linear_gated_backward, setup_context=linear_gated_setup)
    return _public(ln_linear, linear_gated)


def _gemm_dtype(t: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype F.linear would compute in: autocast's when it is on for t's device, else the weight's."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


def _check(op: str, x: Tensor, inp: Tensor, weight: Tensor, bias: Tensor, **per_sample: Tensor) -> None:
    if x.dim() != 3 or inp.dim() != 3:
        raise ValueError(f"{op}: x must be [B, T, D], got shape {list(x.shape)}")
    check_shape(weight, (weight.shape[0], inp.shape[2]), "weight", op)
    check_shape(bias, (weight.shape[0],), "bias", op)
    for name, v in per_sample.items():
        check_shape(v, (x.shape[0], x.shape[2]), name, op)


def _public(ln_linear, linear_gated) -> AdaLNLinear:
    """Shape checks, F.linear's autocast casts, and float64 to the eager twin (the kernels compute in fp32)."""
    def layernorm_modulate_linear(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """F.linear(layernorm_modulate(x, shift, scale), weight, bias); x [B, T, D], weight [N, D]."""
        _check("layernorm_modulate_linear", x, x, weight, bias, shift=shift, scale=scale)
        if x.dtype == torch.float64:
            return layernorm_modulate_linear_eager(x, shift, scale, weight, bias)
        dt = _gemm_dtype(x, weight)
        return ln_linear(x.contiguous(), shift.contiguous(), scale.contiguous(), weight.to(dt).contiguous(),
                         bias.to(dt).contiguous())

    def linear_gated_residual(x: Tensor, gate: Tensor, a: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """x + gate[b] * F.linear(a, weight, bias); x [B, T, N], a [B, T, K], weight [N, K]."""
        _check("linear_gated_residual", x, a, weight, bias, gate=gate)
        check_shape(x, (*a.shape[:2], weight.shape[0]), "x", "linear_gated_residual")
        if x.dtype == torch.float64:
            return linear_gated_residual_eager(x, gate, a, weight, bias)
        dt = _gemm_dtype(a, weight)
        return linear_gated(x.contiguous(), gate.contiguous(), a.to(dt).contiguous(), weight.to(dt).contiguous(),
                            bias.to(dt).contiguous())[0]

    return AdaLNLinear(layernorm_modulate_linear, linear_gated_residual)


REGISTERED = {reg.namespace: _register(reg) for reg in (CUSTOM, INLINE)}


def functions(device_type: str) -> AdaLNLinear:
    """The public functions for models on this device type (the registration chosen once, at build)."""
    return REGISTERED[registration_for(device_type).namespace]


# The custom_op registration's functions by name: tests and benchmarks call these.
layernorm_modulate_linear, linear_gated_residual = REGISTERED[CUSTOM.namespace]
