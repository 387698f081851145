"""DiT with SoFlow's second time embedding (SOFLOW.md section 3).

Module and parameter names follow the reference implementation (timm's PatchEmbed / Attention / Mlp names), so a
reference state dict loads after stripping its "network." prefix. The adaLN pieces go through soflow_fast.ops, which
switches between the eager references and the fused Triton kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .. import ops

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
    kernels: str = "eager"       # resolved implementation: 'eager' or 'triton'

    @classmethod
    def from_size(cls, size: str, **kw) -> "DiTConfig":
        patch, hidden, depth, heads = DIT_SIZES[canonical_size(size)]
        return cls(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads, **kw)

    def forward_macs(self) -> int:
        """Multiply-accumulates of one forward pass of one sample (SOFLOW.md section 8's accounting)."""
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
        if self.kernels not in ("eager", "triton"):
            raise ValueError(f"kernels: expected a resolved 'eager' or 'triton', got {self.kernels!r}")


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """[cos(t f), sin(t f)], f_i = exp(-ln(max_period) i / (dim/2)); t raw in [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


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

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


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

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(ops.attention(q, k, v).transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, hidden: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden, int(hidden * ratio))
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(int(hidden * ratio), hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.impl = cfg.kernels
        self.attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.mlp = Mlp(cfg.hidden_size, cfg.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.attn(ops.layernorm_modulate(x, shift1, scale1, self.impl))
        # The attention branch's residual add and the MLP branch's LN + modulate in one pass over the stream.
        x, h = ops.gated_residual_layernorm_modulate(x, gate1, h, shift2, scale2, self.impl)
        return ops.gated_residual(x, gate2, self.mlp(h), self.impl)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.impl = cfg.kernels
        self.linear = nn.Linear(cfg.hidden_size, cfg.patch_size ** 2 * cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(ops.layernorm_modulate(x, shift, scale, self.impl))


class DiT(nn.Module):
    """F(x, t, s, y): x [B, C, H, W], t and s [B] in [0, 1], y [B] int64 or None (the null label)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.s_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.null_class) if cfg.num_classes else None
        grid = cfg.input_size // cfg.patch_size
        # A frozen parameter (not a buffer) so that it sits in checkpoints under the reference's key.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, cfg.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
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

    def forward(self, x: Tensor, t: Tensor, s: Tensor, y: Optional[Tensor] = None) -> Tensor:
        self._check(x, t, s)
        c = self.t_embedder(t) + self.s_embedder(t - s)  # the second embedder sees t - s, not s
        if self.y_embedder is not None:
            if y is None:
                if self.null_label is None:
                    raise ValueError("DiT: y is None but the model has no null label (trained without CFG)")
                y = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y)
        elif y is not None:
            raise ValueError("DiT: labels were given to an unconditional model (num_classes 0)")
        h = self.x_embedder(x) + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))
