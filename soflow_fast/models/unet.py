"""EDM's SongUNet (DDPM++ style) with SoFlow's second time input: the CIFAR-10 network (docs/algorithm.md section 3).

The reference configures EDM's SongUNet for 32x32 RGB, unconditional, with 6-D augment labels; this module rebuilds
that configuration (and only it: positional embedding, 'standard' encoder and decoder, DDPM++ blocks without
adaptive scale). Module, parameter and buffer names are the reference's, so a reference CIFAR checkpoint
("network.<key>") loads after stripping its prefix (checkpoint.load_state_strict).

Conditioning: emb = [PE(t), PE(t - s)] (each 256 channels, sin first) + A(augment labels), then
Linear-SiLU-Linear-SiLU; every block adds Linear(emb) to its activations as a per-channel bias. The output is the
raw network value F(x, t, s): no EDM preconditioning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..kernel_ops import parse_kernels, resolve_kernels


@dataclass(frozen=True)
class UNetConfig:
    """Defaults are the reference's CIFAR-10 network (its models.py, model_type 'UNet')."""

    img_resolution: int = 32
    in_channels: int = 3
    out_channels: int = 3
    augment_dim: int = 6                     # 0 = no augment-label input
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (2, 2, 2)
    channel_mult_emb: int = 4                # embedding width = model_channels * 4
    channel_mult_noise: int = 2              # each time embedding is model_channels * 2 wide
    num_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.3
    resample_filter: tuple[int, ...] = (1, 3, 3, 1)
    kernels: str = "eager"                   # the network has no Triton ops; the trainer reads this for the loss

    @property
    def num_classes(self) -> int:
        return 0  # unconditional, as the reference's U-Net

    @property
    def emb_channels(self) -> int:
        return self.model_channels * self.channel_mult_emb

    @property
    def noise_channels(self) -> int:
        return self.model_channels * self.channel_mult_noise

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        object.__setattr__(self, "resample_filter", tuple(self.resample_filter))
        if self.img_resolution % (1 << (len(self.channel_mult) - 1)):
            raise ValueError(f"img_resolution {self.img_resolution} cannot be halved {len(self.channel_mult) - 1} "
                             "times")
        if self.noise_channels % 2:
            raise ValueError(f"model_channels * channel_mult_noise = {self.noise_channels} must be even")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} must lie in [0, 1)")
        parse_kernels(self.kernels)


# Named sizes: 'UNet' is the reference's (model_type: UNet in its cifar.yaml); 'UNet-T' is ours, for tests and demos.
UNET_SIZES: dict[str, dict] = {
    "UNet": {},
    "UNet-T": dict(model_channels=16, num_blocks=1),
}


def positional_embedding(t: Tensor, channels: int, max_period: float = 10000.0) -> Tensor:
    """[sin(t f), cos(t f)] with f_i = max_period^(-i / (channels/2 - 1)), i = 0 .. channels/2 - 1.

    EDM's PositionalEmbedding with endpoint=True (the last frequency is exactly 1 / max_period), whose [cos, sin]
    halves the reference swaps to sin first. t is used raw (in [0, 1]).
    """
    half = channels // 2
    freqs = max_period ** -(torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _xavier(weight: Tensor, gain: float = 1.0) -> None:
    """EDM's xavier_uniform (fan_in = in * k * k, fan_out = out * k * k), scaled by gain."""
    nn.init.xavier_uniform_(weight)
    weight.data.mul_(gain)


def _linear(n_in: int, n_out: int, bias: bool = True, gain: float = 1.0) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=bias)
    _xavier(layer.weight, gain)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def _group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """EDM's group count: 32 groups unless that leaves fewer than 4 channels in a group."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=eps)


class Conv2d(nn.Module):
    """A k x k convolution (padding k // 2), optionally preceded by a 2x FIR up- or downsampling.

    The filter is the outer product of `resample_filter` with itself, normalised to sum 1 (times 4 when upsampling,
    which keeps the mean). It is a buffer named 'resample_filter', present only on resampling layers, as in EDM.
    """

    def __init__(self, cin: int, cout: int, kernel: int, up: bool = False, down: bool = False,
                 resample_filter: tuple[int, ...] = (1, 1), gain: float = 1.0):
        super().__init__()
        assert not (up and down)
        self.up, self.down = up, down
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout))
        _xavier(self.weight, gain)
        if up or down:
            f = torch.as_tensor(resample_filter, dtype=torch.float32)
            self.register_buffer("resample_filter", (torch.outer(f, f) / f.sum() ** 2)[None, None])
        else:
            self.resample_filter = None

    def forward(self, x: Tensor) -> Tensor:
        if self.up or self.down:
            f = self.resample_filter.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            depthwise = f.expand(x.shape[1], 1, -1, -1)
            if self.up:
                x = F.conv_transpose2d(x, depthwise * 4, stride=2, padding=pad, groups=x.shape[1])
            else:
                x = F.conv2d(x, depthwise, stride=2, padding=pad, groups=x.shape[1])
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), padding=self.weight.shape[-1] // 2)


class UNetBlock(nn.Module):
    """DDPM++ residual block: GN-SiLU-conv, + Linear(emb) as a bias, GN-SiLU-dropout-conv, skip, * sqrt(1/2);
    then, where asked, single-head self-attention over the pixels with its own residual and * sqrt(1/2)."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, up: bool = False, down: bool = False,
                 attention: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.takes_skip = False  # decoder blocks set this: their input is [x, the matching encoder output]
        self.skip_scale = math.sqrt(0.5)
        rf = cfg.resample_filter
        self.norm0 = _group_norm(cin)
        self.conv0 = Conv2d(cin, cout, 3, up=up, down=down, resample_filter=rf)
        self.affine = _linear(cfg.emb_channels, cout)
        self.norm1 = _group_norm(cout)
        self.dropout = nn.Dropout(cfg.dropout)  # an nn.Dropout so that step.is_stochastic sees it
        self.conv1 = Conv2d(cout, cout, 3, gain=1e-5)
        # EDM's resample_proj=True: a 1x1 projection whenever the shape changes (channels or resolution).
        self.skip = Conv2d(cin, cout, 1, up=up, down=down, resample_filter=rf) if cin != cout or up or down else None
        self.attention = attention
        if attention:
            self.norm2 = _group_norm(cout)
            self.qkv = Conv2d(cout, 3 * cout, 1, gain=math.sqrt(0.2))
            self.proj = Conv2d(cout, cout, 1, gain=1e-5)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None].to(h.dtype)))
        # Dropout's mask follows the memory layout (CPU convolutions may return channels-last): a contiguous input
        # gives the reference's masks for the same RNG state.
        h = self.conv1(self.dropout(h.contiguous()))
        x = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.attention:
            x = (self.proj(self._attend(self.norm2(x))) + x) * self.skip_scale
        return x

    def _attend(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        # EDM's qkv channel layout is interleaved: channel 3c + j is (q, k, v)[j] of channel c.
        q, k, v = self.qkv(x).reshape(B, 1, C, 3, H * W).transpose(2, 4).unbind(3)  # each [B, 1, HW, C]
        return ops.attention(q, k, v).transpose(2, 3).reshape(B, C, H, W)


class SongUNet(nn.Module):
    """F(x, t, s, y=None, augment_labels=None): x [B, C, R, R], t and s [B] in [0, 1]; unconditional (y None)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        E, N, mc = cfg.emb_channels, cfg.noise_channels, cfg.model_channels
        self.map_augment = _linear(cfg.augment_dim, 2 * N, bias=False) if cfg.augment_dim else None
        self.map_layer0 = _linear(2 * N, E)
        self.map_layer1 = _linear(E, E)

        # Encoder: a stem conv, then per level (a downsampling block and) num_blocks blocks; every output is a skip.
        self.enc = nn.ModuleDict()
        skips = []
        c = mc
        for level, mult in enumerate(cfg.channel_mult):
            res = cfg.img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cfg.in_channels, c, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c, c, cfg, down=True)
            skips.append(c)
            for i in range(cfg.num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(c, mc * mult, cfg, attention=res in cfg.attn_resolutions)
                c = mc * mult
                skips.append(c)

        # Decoder: the bottleneck pair (attention in the first), then per level (an upsampling block and)
        # num_blocks + 1 blocks, each taking one skip; attention in a level's last block at attn_resolutions.
        self.dec = nn.ModuleDict()
        for level in reversed(range(len(cfg.channel_mult))):
            res = cfg.img_resolution >> level
            if level == len(cfg.channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(c, c, cfg, attention=True)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(c, c, cfg)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(c, c, cfg, up=True)
            for i in range(cfg.num_blocks + 1):
                attn = i == cfg.num_blocks and res in cfg.attn_resolutions
                block = UNetBlock(c + skips.pop(), mc * cfg.channel_mult[level], cfg, attention=attn)
                block.takes_skip = True
                self.dec[f"{res}x{res}_block{i}"] = block
                c = block.out_channels
        res = cfg.img_resolution
        self.dec[f"{res}x{res}_aux_norm"] = _group_norm(c)
        self.dec[f"{res}x{res}_aux_conv"] = Conv2d(c, cfg.out_channels, 3, gain=1e-5)

    @property
    def null_label(self) -> Optional[int]:
        return None  # unconditional: no label table, no null label

    def embed(self, t: Tensor, s: Tensor, augment_labels: Optional[Tensor]) -> Tensor:
        N = self.cfg.noise_channels
        emb = torch.cat([positional_embedding(t, N), positional_embedding(t - s, N)], dim=1)  # t - s, not s
        emb = emb.to(self.map_layer0.weight.dtype)
        if augment_labels is not None:
            if self.map_augment is None:
                raise ValueError("SongUNet: augment_labels were given to a model built with augment_dim 0")
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def _check(self, x: Tensor, t: Tensor, s: Tensor, augment_labels: Optional[Tensor]) -> None:
        cfg = self.cfg
        want = (cfg.in_channels, cfg.img_resolution, cfg.img_resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"SongUNet input x: expected shape [B, {', '.join(map(str, want))}], got {list(x.shape)}")
        for name, v in (("t", t), ("s", s)):
            if v.shape != (x.shape[0],):
                raise ValueError(f"SongUNet input {name}: expected shape [{x.shape[0]}], got {list(v.shape)}")
        if augment_labels is not None and augment_labels.shape != (x.shape[0], cfg.augment_dim):
            raise ValueError(f"SongUNet augment_labels: expected shape [{x.shape[0]}, {cfg.augment_dim}], "
                             f"got {list(augment_labels.shape)}")

    def forward(self, x: Tensor, t: Tensor, s: Tensor, y: Optional[Tensor] = None,
                augment_labels: Optional[Tensor] = None) -> Tensor:
        if y is not None:
            raise ValueError("SongUNet is unconditional: labels y must be None")
        self._check(x, t, s, augment_labels)
        emb = self.embed(t, s, augment_labels)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if not isinstance(block, UNetBlock):
                break
            if block.takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        res = self.cfg.img_resolution
        return self.dec[f"{res}x{res}_aux_conv"](F.silu(self.dec[f"{res}x{res}_aux_norm"](x)))


def build_unet(size: str = "UNet", *, kernels: str = "eager", device: torch.device | str = "cpu",
               **overrides) -> SongUNet:
    """A SongUNet of a named size ('UNet' = the reference's CIFAR-10 network, 'UNet-T' = tiny); overrides
    (model_channels, num_blocks, dropout, ...) replace UNetConfig fields. kernels: 'auto' | 'triton' | 'eager'."""
    if size not in UNET_SIZES:
        raise ValueError(f"model_type: unknown U-Net size {size!r}; expected one of {sorted(UNET_SIZES)}")
    known = {f.name for f in fields(UNetConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError(f"build_unet: unknown field {bad[0]!r}; UNetConfig has {sorted(known)}")
    cfg = UNetConfig(**{**UNET_SIZES[size], **overrides, "kernels": resolve_kernels(kernels, device)})
    return SongUNet(cfg).to(device)
