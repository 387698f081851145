"""DiT with SoFlow's second time embedding (docs/algorithm.md section 3).

Module and parameter names follow the reference implementation (timm's PatchEmbed / Attention / Mlp names), so a
reference state dict loads after stripping its "network." prefix. The adaLN pieces are the functions of the model's
KernelOps (soflow_fast.kernel_ops), chosen once from cfg.kernels: the eager references or the fused Triton kernels.

Every module also runs as a secant pair (docs/precision.md, section 5): given the difference d of its input from a
second point, it returns beside its output the difference of its outputs at the two points, computed without
subtracting two separately rounded outputs: linear maps act on d directly, nonlinear pieces use `secant` or an
exact identity. `DiT.forward(..., pair=(dx, dt))` thus gives F(x, t, s, y) and F(x + dx, t + dt, s, y) - F(x, t, s, y).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..kernel_ops import KernelOps, kernel_ops_for, parse_kernels
from ..precision import skeleton

# name -> (patch, hidden, depth, heads). DiT-T/2 is ours: tiny, for tests and CPU demos.
DIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "DiT-T/2": (2, 64, 2, 4),
    "DiT-S/2": (2, 384, 12, 6),
    "DiT-S/4": (4, 384, 12, 6),
    "DiT-B/2": (2, 768, 12, 12),
    "DiT-B/4": (4, 768, 12, 12),
    "DiT-M/2": (2, 1024, 16, 16),
    "DiT-L/2": (2, 1024, 24, 16),
    "DiT-XL/2": (2, 1152, 28, 16),
}


def canonical_size(name: str) -> str:
    """Accepts 'DiT-B/4' and the reference configs' 'DiT-B-4'."""
    key = name if name in DIT_SIZES else (name[::-1].replace("-", "/", 1)[::-1] if name.count("-") == 2 else name)
    if key not in DIT_SIZES:
        raise ValueError(f"model_type: unknown DiT size {name!r}; expected one of {sorted(DIT_SIZES)}")
    return key


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000      # 0 = unconditional (no label table)
    null_class: bool = True      # an extra label row (index num_classes) for CFG; the reference has it iff drop > 0
    kernels: str = "eager"       # resolved per op: 'eager', 'triton' or 'op=impl,...' (kernel_ops.resolve_kernels)

    @classmethod
    def from_size(cls, size: str, **fields) -> "DiTConfig":
        """A named size ('DiT-XL/2', 'DiT-B-4', ...); `fields` set the rest and override the table's entries."""
        table = dict(zip(("patch_size", "hidden_size", "depth", "num_heads"), DIT_SIZES[canonical_size(size)]))
        return cls(**{**table, **fields})

    def forward_macs(self) -> int:
        """Multiply-accumulates of one forward pass of one sample (docs/algorithm.md section 8's accounting)."""
        H, T = self.hidden_size, (self.input_size // self.patch_size) ** 2
        patch = self.patch_size ** 2 * self.in_channels
        per_block = T * (12 * H * H + 2 * T * H) + 6 * H * H  # qkv, proj, mlp; attention; adaLN
        embed = T * patch * H + 2 * (256 * H + H * H)          # patch embedding; two time embedders
        return self.depth * per_block + embed + 2 * H * H + T * H * patch

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos embedding)")
        parse_kernels(self.kernels)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """[cos(t f), sin(t f)], f_i = exp(-ln(max_period) i / (dim/2)); t raw in [0, 1]."""
    half = dim // 2
    f = torch.promote_types(t.dtype, torch.float32)  # fp32 as the reference; fp64 stays fp64 (exactness tests)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=f, device=t.device) / half)
    args = t.to(f)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def timestep_embedding_difference(t: Tensor, dt: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """timestep_embedding(t + dt) - timestep_embedding(t) by the sum-to-product identities (no cancellation)."""
    half = dim // 2
    f = torch.promote_types(t.dtype, torch.float32)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=f, device=t.device) / half)
    mid = (t.to(f) + dt.to(f) / 2)[:, None] * freqs[None]
    half_gap = torch.sin(dt.to(f)[:, None] * freqs[None] / 2)
    return torch.cat([-2 * torch.sin(mid) * half_gap, 2 * torch.cos(mid) * half_gap], dim=-1)


def secant(fn, a: tuple[Tensor, ...], d: tuple[Tensor, ...]) -> Tensor:
    """fn(a + d) - fn(a) without gradient, in at least fp32 (a, d: tuples of the arguments and their differences).
    Its rounding error is that of fn in fp32, not the bf16 rounding of the two outputs."""
    f = torch.promote_types(a[0].dtype, torch.float32)
    with torch.no_grad():
        base = [x.detach().to(f) for x in a]
        return fn(*(x + dx.to(f) for x, dx in zip(base, d))) - fn(*base)


def linear_difference(layer: nn.Linear, d: Tensor) -> Tensor:
    """layer(x + d) - layer(x) = W d: the bias cancels exactly."""
    return torch.nn.functional.linear(d, layer.weight.detach())


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim]: half the channels for each axis, sin then cos."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    coords = np.arange(grid, dtype=np.float32)
    col, row = np.meshgrid(coords, coords)  # col varies along a row: the reference's first half encodes it

    def axis(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([axis(col), axis(row)], axis=1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor, dt: Optional[Tensor] = None):
        emb = timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        if dt is None:
            return self.mlp(emb)
        hidden = self.mlp[0](emb)
        d_emb = timestep_embedding_difference(t, dt, self.freq_dim).to(emb.dtype)
        d_hidden = linear_difference(self.mlp[0], d_emb)
        d_act = secant(torch.nn.functional.silu, (hidden,), (d_hidden,))
        return self.mlp[2](self.mlp[1](hidden)), linear_difference(self.mlp[2], d_act)


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int, null_class: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(null_class), hidden)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_ch: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor, dx: Optional[Tensor] = None):
        # Tokens made contiguous: inductor (torch 2.13, CPU) computed the input gradient of a DiT block compiled on
        # its own (compile: blocks) wrongly, by up to 30%, for this transposed layout (tests/test_compile.py).
        out = self.proj(x).flatten(2).transpose(1, 2).contiguous()
        if dx is None:
            return out
        d = torch.nn.functional.conv2d(dx, self.proj.weight.detach(), stride=self.proj.stride)
        return out, d.flatten(2).transpose(1, 2).contiguous()


AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class Attention(nn.Module):
    """attend: q, k, v [B, H, T, Dh] -> [B, H, T, Dh], resolved once at build (soflow_fast.attention). The block
    applies `qkv` (fused with the adaLN LayerNorm before it: KernelOps.layernorm_modulate_linear) and hands the
    result in."""

    def __init__(self, hidden: int, heads: int, attend: AttentionFn = F.scaled_dot_product_attention):
        super().__init__()
        self.heads = heads
        self.attend = attend
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, qkv: Tensor, dqkv: Optional[Tensor] = None):
        B, T, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3

        def heads(t: Tensor) -> Tensor:
            return t.reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)

        def merge(o: Tensor) -> Tensor:
            return o.transpose(1, 2).reshape(B, T, D)

        q, k, v = heads(qkv)
        out = self.proj(merge(self.attend(q, k, v)))
        if dqkv is None:
            return out
        dq, dk, dv = heads(dqkv)
        return out, linear_difference(self.proj, merge(attention_difference(q, k, v, dq, dk, dv)))


def attention_difference(q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor) -> Tensor:
    """attention(q + dq, k + dk, v + dv) - attention(q, k, v) without cancellation: with S = q k^T / sqrt(d),
    P = softmax(S) and e = expm1(dS), softmax(S + dS) - P = P (e - E) / (1 + E) where E = sum_j P_j e_j; every
    product of a difference is a GEMM in the region's precision, relative to the difference itself."""
    f = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        q, k, v = q.detach(), k.detach(), v.detach()
        p = ((q @ k.transpose(-2, -1)).to(f) * scale).softmax(dim=-1)
        ds = (dq @ k.transpose(-2, -1) + (q + dq) @ dk.transpose(-2, -1)).to(f) * scale
        e = torch.expm1(ds)
        big_e = (p * e).sum(dim=-1, keepdim=True)
        dp = p * (e - big_e) / (1 + big_e)
        return (dp @ (v + dv).to(f) + p @ dv.to(f)).to(f)


class Mlp(nn.Module):
    """act(fc1(x)); the block applies fc2 (fused with the gated residual after it: KernelOps.linear_gated_residual)."""

    def __init__(self, hidden: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden, int(hidden * ratio))
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(int(hidden * ratio), hidden)

    def forward(self, x: Tensor, dx: Optional[Tensor] = None):
        hidden = self.fc1(x)
        out = self.act(hidden)
        if dx is None:
            return out
        return out, secant(self.act, (hidden,), (linear_difference(self.fc1, dx),))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, kernel_ops: KernelOps, attention: AttentionFn):
        super().__init__()
        self.kernel_ops = kernel_ops
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, attention)
        self.mlp = Mlp(cfg.hidden_size, cfg.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size))

    def forward(self, x: Tensor, c: Tensor, pair: Optional[tuple[Tensor, Tensor]] = None):
        with skeleton(x.device.type):
            mod = self.adaLN_modulation(c)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)
        k, qkv_layer, fc2 = self.kernel_ops, self.attn.qkv, self.mlp.fc2
        # LN + modulate as the qkv GEMM's prologue; the attention branch's residual add and the MLP branch's
        # LN + modulate in one pass over the stream; the MLP's gated residual as the fc2 GEMM's epilogue.
        qkv = k.layernorm_modulate_linear(x, shift1, scale1, qkv_layer.weight, qkv_layer.bias)
        attn = self.attn(qkv)
        res, h2 = k.gated_residual_layernorm_modulate(x, gate1, attn, shift2, scale2)
        act = self.mlp(h2)
        out = k.linear_gated_residual(res, gate2, act, fc2.weight, fc2.bias)
        if pair is None:
            return out
        dx, dc = pair
        dmod = modulation_difference(self.adaLN_modulation, c, dc).chunk(6, dim=1)
        dh = secant(ops.layernorm_modulate_eager, (x, shift1, scale1), (dx, dmod[0], dmod[1]))
        _, d_attn = self.attn(qkv, linear_difference(qkv_layer, dh))
        d_res = residual_difference(dx, gate1, attn, dmod[2], d_attn)
        dh2 = secant(ops.layernorm_modulate_eager, (res, shift2, scale2), (d_res, dmod[3], dmod[4]))
        _, d_act = self.mlp(h2, dh2)
        mlp = fc2(act)  # the branch output the difference needs (the fused op returns only the sum)
        return out, (residual_difference(d_res, gate2, mlp, dmod[5], linear_difference(fc2, d_act)), dc)


def modulation_difference(ada: nn.Sequential, c: Tensor, dc: Tensor) -> Tensor:
    """adaLN_modulation(c + dc) - adaLN_modulation(c): Linear(SiLU(.))."""
    return linear_difference(ada[1], secant(ada[0], (c,), (dc,)))


def residual_difference(dx: Tensor, gate: Tensor, y: Tensor, dgate: Tensor, dy: Tensor) -> Tensor:
    """(x + dx) + (gate + dgate)(y + dy) - (x + gate y), expanded so that no term cancels."""
    f = torch.promote_types(dx.dtype, torch.float32)
    gate, y = gate.detach().to(f).unsqueeze(1), y.detach().to(f)
    dgate, dy = dgate.to(f).unsqueeze(1), dy.to(f)
    return dx.to(f) + dgate * y + (gate + dgate) * dy


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig, kernel_ops: KernelOps):
        super().__init__()
        self.kernel_ops = kernel_ops
        self.linear = nn.Linear(cfg.hidden_size, cfg.patch_size ** 2 * cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size))

    def forward(self, x: Tensor, c: Tensor, pair: Optional[tuple[Tensor, Tensor]] = None):
        with skeleton(x.device.type):
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            out = self.kernel_ops.layernorm_modulate_linear(x, shift, scale, self.linear.weight, self.linear.bias)
            if pair is None:
                return out
            dx, dc = pair
            dshift, dscale = modulation_difference(self.adaLN_modulation, c, dc).chunk(2, dim=1)
            dh = secant(ops.layernorm_modulate_eager, (x, shift, scale), (dx, dshift, dscale))
            return out, linear_difference(self.linear, dh)


class DiT(nn.Module):
    """F(x, t, s, y): x [B, C, H, W], t and s [B] in [0, 1], y [B] int64 or None (the null label). attention: the
    blocks' implementation (soflow_fast.attention.resolve_attention; default PyTorch SDPA). device_type: where the
    model will run, which picks how Triton ops are registered (soflow_fast.kernel_ops.kernel_ops_for)."""

    def __init__(self, cfg: DiTConfig, attention: AttentionFn = F.scaled_dot_product_attention,
                 device_type: str = "cpu"):
        super().__init__()
        self.cfg = cfg
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.s_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.null_class) if cfg.num_classes else None
        grid = cfg.input_size // cfg.patch_size
        # A frozen parameter (not a buffer) so that it sits in checkpoints under the reference's key.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, cfg.hidden_size), requires_grad=False)
        self.kernel_ops = kernel_ops_for(cfg.kernels, device_type)  # chosen here, once: forward only calls them
        self.blocks = nn.ModuleList(DiTBlock(cfg, self.kernel_ops, attention) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg, self.kernel_ops)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        grid = self.cfg.input_size // self.cfg.patch_size
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.cfg.hidden_size, grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # Only the first (t) embedder gets N(0, 0.02); the t - s embedder keeps xavier (reference behaviour).
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                     self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_label(self) -> Optional[int]:
        """Index of the null label, or None when the model has none (unconditional, or trained without CFG)."""
        return self.cfg.num_classes if self.cfg.num_classes and self.cfg.null_class else None

    def unpatchify(self, x: Tensor) -> Tensor:
        p, c = self.cfg.patch_size, self.cfg.in_channels
        g = self.cfg.input_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def _check(self, x: Tensor, t: Tensor, s: Tensor) -> None:
        want = (self.cfg.in_channels, self.cfg.input_size, self.cfg.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"DiT input x: expected shape [B, {', '.join(map(str, want))}], got {list(x.shape)}")
        for name, v in (("t", t), ("s", s)):
            if v.shape != (x.shape[0],):
                raise ValueError(f"DiT input {name}: expected shape [{x.shape[0]}], got {list(v.shape)}")

    def forward(self, x: Tensor, t: Tensor, s: Tensor, y: Optional[Tensor] = None,
                pair: Optional[tuple[Tensor, Tensor]] = None):
        """F(x, t, s, y); with pair = (dx, dt) also F(x + dx, t + dt, s, y) - F(x, t, s, y) (no gradient)."""
        self._check(x, t, s)
        if self.y_embedder is not None:
            if y is None:
                if self.null_label is None:
                    raise ValueError("DiT: y is None but the model has no null label (trained without CFG)")
                y = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        elif y is not None:
            raise ValueError("DiT: labels were given to an unconditional model (num_classes 0)")
        dx, dt = pair if pair is not None else (None, None)
        with skeleton(x.device.type):
            # the second embedder sees t - s, not s (moving t by dt moves t - s by dt too)
            ct, cs, h = self.t_embedder(t, dt), self.s_embedder(t - s, dt), self.x_embedder(x, dx)
            c_label = self.y_embedder(y) if self.y_embedder is not None else 0
        if pair is None:
            c = ct + cs + c_label
            h = h + self.pos_embed
            for block in self.blocks:
                h = block(h, c)
            return self.unpatchify(self.final_layer(h, c))
        c, state = ct[0] + cs[0] + c_label, (h[1], ct[1] + cs[1])
        h = h[0] + self.pos_embed
        for block in self.blocks:
            h, state = block(h, c, state)
        out, d_out = self.final_layer(h, c, state)
        return self.unpatchify(out), self.unpatchify(d_out)
