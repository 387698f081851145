"""The eager ops: the documentation of the math of the adaLN pieces, and attention.

The fused Triton versions (soflow_fast.kernels) have the same signatures and must match these, which
tests/test_kernels.py checks; soflow_fast.kernel_ops chooses between them when a model is built. This module
imports no kernels: they import it.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

LN_EPS = 1e-6  # the adaLN LayerNorm's, also the Triton kernels'


# -- adaLN pieces ---------------------------------------------------------------------------------
def layernorm_modulate_eager(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """LN(x) (no affine, eps 1e-6, statistics in fp32) * (1 + scale[b]) + shift[b]; x [B, T, D], shift/scale [B, D]."""
    f = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics; fp64 stays fp64 (gradcheck)
    h = F.layer_norm(x.to(f), x.shape[-1:], eps=LN_EPS)
    return (h * (1 + scale.to(f).unsqueeze(1)) + shift.to(f).unsqueeze(1)).to(x.dtype)


def gated_residual_eager(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x + gate[b] * y; x, y [B, T, D], gate [B, D]."""
    return x + gate.unsqueeze(1) * y


def gated_residual_layernorm_modulate_eager(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor,
                                            scale: Tensor) -> tuple[Tensor, Tensor]:
    """(res, h): res = x + gate[b] * y, h = layernorm_modulate(res, shift, scale). The DiT block's middle."""
    res = gated_residual_eager(x, gate, y)
    return res, layernorm_modulate_eager(res, shift, scale)


def layernorm_modulate_linear_eager(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """F.linear(layernorm_modulate(x, shift, scale), weight, bias): the adaLN LayerNorm and the linear after it."""
    return F.linear(layernorm_modulate_eager(x, shift, scale), weight, bias)


def linear_gated_residual_eager(x: Tensor, gate: Tensor, a: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x + gate[b] * F.linear(a, weight, bias): a branch's last linear and its gated residual add."""
    return gated_residual_eager(x, gate, F.linear(a, weight, bias))


# -- attention ------------------------------------------------------------------------------------
def attention_eager(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v, written out; q, k, v [B, H, T, Dh]. The reference for the parity test."""
    up = torch.promote_types(q.dtype, torch.float32)  # at least fp32; fp64 stays fp64
    scores = (q.to(up) @ k.to(up).transpose(-2, -1)) * q.shape[-1] ** -0.5
    return (scores.softmax(dim=-1) @ v.to(up)).to(q.dtype)


def _find_flash_attn():
    """flash-attn's function (FA3 interface first, then FA2), or None when the package is not installed."""
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            return __import__(module, fromlist=["flash_attn_func"]).flash_attn_func
        except ImportError:
            continue
    return None


# Looked up once, at import: torch.compile cannot trace an import, and `attention` runs inside compiled graphs.
_FLASH_ATTN = _find_flash_attn()


def _flash_attn_func():
    return _FLASH_ATTN


def attention_backend(q: Tensor) -> str:
    """Which implementation `attention` uses for tensors like q: 'flash-attn' or 'sdpa'."""
    usable = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
    return "flash-attn" if usable and _flash_attn_func() is not None else "sdpa"


def flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """flash-attn's attention on q, k, v [B, H, T, Dh] (CUDA, bf16/fp16; the package must be installed)."""
    # flash-attn takes [B, T, H, Dh]; FA3 returns (out, lse) in some versions.
    out = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Multi-head self-attention, q, k, v [B, H, T, Dh] -> [B, H, T, Dh], chosen per call (the U-Net's; the DiT
    takes the implementation soflow_fast.attention resolved once, at build)."""
    if attention_backend(q) == "flash-attn":
        return flash_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
