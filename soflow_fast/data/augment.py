"""EDM's geometric augmentation as the reference's CIFAR-10 run uses it (docs/algorithm.md section 6).

The reference applies EDM's AugmentPipe(p=0.12, xflip=1e8, scale=1, aniso=1, translate_frac=1) to every batch and
feeds the network the 6-D augment labels, in this order:
  [x-flip (0/1), isotropic scale w, anisotropic w cos r, anisotropic w sin r, translate x, translate y]
where w are the standard-normal draws behind each transform (0 when the transform is off). xflip=1e8 makes the
x-flip "enabled" for every image (1e8 * p >= 1), so an image is flipped with probability 1/2 whatever p is (p > 0);
each of the three other transforms is on with probability p.

The geometric transforms compose into one inverse matrix per image, applied as in EDM: reflect-pad, 2x upsample
with the sym6 wavelet low-pass filter, bilinear resampling of the upsampled image, filtered 2x downsample, crop.
Randomness comes only from the caller's torch.Generator, drawn in EDM's order and shapes, so a CPU generator seeded
like EDM's global RNG reproduces its augmentations. One deliberate difference: images with no geometric transform drawn
(~68% at p = 0.12) are returned untouched, where EDM resamples them with an identity matrix too, which gives the
same image up to ~2e-5 of rounding; the padding is then computed over the transformed images only, which changes
nothing but rounding either (it only has to cover what the sampling reaches).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Low-pass decomposition filter of the Symlet-6 wavelet (12 taps; the standard published coefficients).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)


@dataclass(frozen=True)
class AugmentConfig:
    """Probability multipliers (a transform is on with probability min(1, multiplier * p)) and strengths.
    Defaults are the reference's CIFAR-10 pipeline; yflip and fractional rotation are off there."""

    p: float = 0.12
    xflip: float = 1e8
    yflip: float = 0.0
    scale: float = 1.0
    rotate_frac: float = 0.0
    aniso: float = 1.0
    translate_frac: float = 1.0
    scale_std: float = 0.2            # log2 std of isotropic scaling
    rotate_frac_max: float = 1.0      # rotation range, 1 = full circle
    aniso_std: float = 0.2            # log2 std of anisotropic scaling
    aniso_rotate_prob: float = 0.5    # probability that the anisotropic axes are rotated
    translate_frac_std: float = 0.125  # std of translation, relative to the image size

    @property
    def label_dim(self) -> int:
        """Length of the augment-label vector (6 for the defaults)."""
        return (int(self.xflip > 0) + int(self.yflip > 0) + int(self.scale > 0) + 2 * int(self.rotate_frac > 0)
                + 2 * int(self.aniso > 0) + 2 * int(self.translate_frac > 0))

    @property
    def geometric(self) -> bool:
        return self.scale > 0 or self.rotate_frac > 0 or self.aniso > 0 or self.translate_frac > 0

    def __post_init__(self) -> None:
        if self.p < 0:
            raise ValueError(f"augment p = {self.p} must be >= 0")


# -- 3x3 homogeneous matrices, one per image ([N] inputs -> [N, 3, 3]) -------------------------------------------
def _affine(a: Tensor, b: Tensor, c: Tensor, d: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], dim=-1).reshape(*a.shape, 3, 3)


def scale_matrix(sx: Tensor, sy: Tensor) -> Tensor:
    zero = torch.zeros_like(sx)
    return _affine(sx, zero, zero, sy, zero, zero)


def rotation_matrix(theta: Tensor) -> Tensor:
    """Counter-clockwise by theta in (x right, y down) pixel coordinates, as EDM's rotate2d."""
    zero = torch.zeros_like(theta)
    return _affine(theta.cos(), -theta.sin(), theta.sin(), theta.cos(), zero, zero)


def translation_matrix(tx: Tensor, ty: Tensor) -> Tensor:
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    return _affine(one, zero, zero, one, tx, ty)


def _const(rows, like: Tensor) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32, device=like.device)


# -- resampling --------------------------------------------------------------------------------------------------
def _filter_along(x: Tensor, taps: Tensor, dim: int, stride: int = 1, padding: int = 0) -> Tensor:
    """Depthwise 1-D correlation with `taps` along dim 2 (rows) or 3 (columns) of [N, C, H, W]."""
    C = x.shape[1]
    k = taps.to(x.dtype).view(1, 1, -1, 1) if dim == 2 else taps.to(x.dtype).view(1, 1, 1, -1)
    st, pad = ((stride, 1), (padding, 0)) if dim == 2 else ((1, stride), (0, padding))
    return F.conv2d(x, k.expand(C, -1, -1, -1), stride=st, padding=pad, groups=C)


def _upsample2(x: Tensor, h: Tensor, dim: int) -> Tensor:
    """Zero-insertion (L -> 2L - 1 samples) then convolution with h: L -> 2L samples along dim."""
    shape = list(x.shape)
    shape[dim] = 2 * shape[dim] - 1
    up = x.new_zeros(shape)
    (up[:, :, ::2] if dim == 2 else up[:, :, :, ::2]).copy_(x)
    return _filter_along(up, h.flip(0), dim, padding=(len(h) + 1) // 2)


def _downsample2(x: Tensor, h: Tensor, dim: int, crop: int) -> Tensor:
    """Filter with h, keep every second sample, and drop `crop` samples at both ends along dim."""
    y = _filter_along(x, h, dim, stride=2, padding=(len(h) - 1) // 2)
    return y[:, :, crop:-crop] if dim == 2 else y[:, :, :, crop:-crop]


def warp(images: Tensor, G_inv: Tensor) -> Tensor:
    """Resample images [N, C, H, W] so that output pixel p shows input point G_inv p, in pixel coordinates centred
    on the image (x right, y down). EDM's scheme: reflect-pad by what the batch's corners reach (plus the filter
    margin), 2x sym6 upsampling, bilinear sampling at 2x, sym6 2x downsampling, crop back to H x W."""
    N, C, H, W = images.shape
    h = torch.tensor(SYM6, dtype=torch.float32, device=images.device)
    fpad = len(SYM6) // 4
    cx, cy = (W - 1) / 2, (H - 1) / 2

    # Padding: how far outside the image the output's corners sample, over the whole batch, plus 2 * fpad.
    corners = _const([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1]], images)
    xy = (G_inv @ corners)[:, :2]                                     # [N, 2, 4]
    reach = torch.stack([-xy, xy]).amax(dim=(1, 3)).flatten().cpu()    # [x0, y0, x1, y1]
    reach = reach + torch.tensor([2 * fpad - cx, 2 * fpad - cy] * 2)
    limit = torch.tensor([W - 1, H - 1] * 2, dtype=reach.dtype)
    mx0, my0, mx1, my1 = (int(v) for v in torch.minimum(reach.clamp(min=0), limit).ceil())
    images = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")
    G_inv = _const([[1, 0, (mx0 - mx1) / 2], [0, 1, (my0 - my1) / 2], [0, 0, 1]], images) @ G_inv

    # 2x upsampling; in upsampled coordinates the matrix is conjugated by the 2x scaling and a half-pixel shift.
    images = _upsample2(_upsample2(images, h, dim=3), h, dim=2)
    to_up = _const([[2, 0, -0.5], [0, 2, -0.5], [0, 0, 1]], images)    # T(-1/2) S(2)
    from_up = _const([[0.5, 0, 0.25], [0, 0.5, 0.25], [0, 0, 1]], images)  # its inverse
    G_inv = to_up @ G_inv @ from_up

    # Bilinear sampling on a (H + 2 fpad) x (W + 2 fpad) grid at 2x; affine_grid works in [-1, 1] coordinates.
    Ho, Wo = (H + 2 * fpad) * 2, (W + 2 * fpad) * 2
    Hi, Wi = images.shape[2], images.shape[3]
    theta = _const([[2 / Wi, 0, 0], [0, 2 / Hi, 0], [0, 0, 1]], images) @ G_inv @ \
        _const([[Wo / 2, 0, 0], [0, Ho / 2, 0], [0, 0, 1]], images)
    grid = F.affine_grid(theta[:, :2].to(images.dtype), [N, C, Ho, Wo], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    return _downsample2(_downsample2(images, h, dim=3, crop=fpad), h, dim=2, crop=fpad)


# -- the pipeline ------------------------------------------------------------------------------------------------
class AugmentPipe:
    """augment(images [N, C, H, W] float, generator) -> (augmented images, labels [N, label_dim] float32)."""

    def __init__(self, cfg: Optional[AugmentConfig] = None):
        self.cfg = cfg or AugmentConfig()

    @property
    def label_dim(self) -> int:
        return self.cfg.label_dim

    def __call__(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"augment: expected float images [N, C, H, W], got {images.dtype} {list(images.shape)}")
        cfg, dev = self.cfg, images.device
        N, C, H, W = images.shape
        gdev = generator.device

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=gdev).to(dev)

        def randn(*shape: int) -> Tensor:
            return torch.randn(shape, generator=generator, device=gdev).to(dev)

        def gate(w: Tensor, multiplier: float, u: Tensor) -> Tensor:
            """w where the transform is on (u < multiplier * p), else 0."""
            return torch.where(u < multiplier * cfg.p, w, torch.zeros_like(w))

        labels: list[Tensor] = []
        for multiplier, dim in ((cfg.xflip, 3), (cfg.yflip, 2)):
            if multiplier > 0:
                w = torch.randint(2, (N, 1, 1, 1), generator=generator, device=gdev).to(dev)
                w = gate(w, multiplier, rand(N, 1, 1, 1))
                images = torch.where(w == 1, images.flip(dim), images)
                labels.append(w)

        G_inv = torch.eye(3, device=dev).expand(N, 3, 3)
        moved = torch.zeros(N, dtype=torch.bool, device=dev)  # rows with a geometric transform drawn
        if cfg.scale > 0:
            w = gate(randn(N), cfg.scale, rand(N))
            s = torch.exp2(w * cfg.scale_std)
            G_inv = G_inv @ scale_matrix(1 / s, 1 / s)
            moved |= w != 0
            labels.append(w)
        if cfg.rotate_frac > 0:
            w = (rand(N) * 2 - 1) * (math.pi * cfg.rotate_frac_max)
            w = gate(w, cfg.rotate_frac, rand(N))
            G_inv = G_inv @ rotation_matrix(w)
            moved |= w != 0
            labels += [w.cos() - 1, w.sin()]
        if cfg.aniso > 0:
            w, r = randn(N), (rand(N) * 2 - 1) * math.pi
            w = gate(w, cfg.aniso, rand(N))
            r = torch.where(rand(N) < cfg.aniso_rotate_prob, r, torch.zeros_like(r))
            s = torch.exp2(w * cfg.aniso_std)
            # Stretch by s along the axis at angle r and by 1/s across it (area kept).
            G_inv = G_inv @ rotation_matrix(-r) @ scale_matrix(1 / s, s) @ rotation_matrix(r)
            moved |= w != 0
            labels += [w * r.cos(), w * r.sin()]
        if cfg.translate_frac > 0:
            w = gate(randn(2, N), cfg.translate_frac, rand(1, N))
            shift = w * torch.tensor([[W], [H]], dtype=w.dtype, device=dev) * cfg.translate_frac_std
            G_inv = G_inv @ translation_matrix(-shift[0], -shift[1])
            moved |= (w != 0).any(dim=0)
            labels += [w[0], w[1]]

        if cfg.geometric:
            if bool(moved.any()):
                images = images.clone()
                images[moved] = warp(images[moved], G_inv[moved])

        out = torch.cat([v.to(torch.float32).reshape(N, -1) for v in labels], dim=1) if labels else \
            images.new_zeros(N, 0, dtype=torch.float32)
        return images, out
