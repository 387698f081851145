"""The SD-VAE that maps images to latents and back (a LOCAL diffusers AutoencoderKL; nothing is downloaded).

Latent models train on x0 = (mean + std * eps) * LATENT_SCALE, a draw from the VAE posterior of each image, scaled
to about unit variance (docs/algorithm.md section 6); their samples are decoded from latent / LATENT_SCALE. Data
preparation (data/prepare.py) encodes, the latent loader (data/latents.py) scales, sampling (sampling.py) decodes.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

LATENT_SCALE = 0.18215  # SD-VAE scaling factor


class VAEError(ValueError):
    """A VAE directory that does not load (missing, not a diffusers AutoencoderKL, diffusers not installed)."""


def load_vae(vae_dir: str | os.PathLike, device: torch.device | str):
    """A diffusers AutoencoderKL from a local directory (config.json + weights), frozen, in eval mode."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise VAEError("the VAE needs diffusers (pip install diffusers)") from e
    path = Path(vae_dir)
    if not (path / "config.json").is_file():
        raise VAEError(f"VAE directory {path} does not load: no config.json (expected a diffusers AutoencoderKL "
                       "folder, e.g. a local copy of stabilityai/sd-vae-ft-mse)")
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- diffusers raises many kinds; the user needs the folder named
        raise VAEError(f"VAE directory {path} does not load as a diffusers AutoencoderKL: {e}") from e
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images: Tensor) -> Tensor:
    """uint8 [B, H, W, 3] -> [B, 8, H/8, W/8] float32: the posterior mean (0-3) and std (4-7) of x in [-1, 1]."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    dist = vae.encode(x).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()


def posterior_sample(meanstd: Tensor, eps: Tensor) -> Tensor:
    """[B, 8, h, w] posterior (mean, std) and standard-normal eps [B, 4, h, w] -> the scaled latent sample."""
    mean, std = meanstd.float().chunk(2, dim=1)
    return (mean + std * eps) * LATENT_SCALE


@torch.no_grad()
def decode(vae, latents: Tensor) -> Tensor:
    """Scaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] in about [-1, 1]."""
    return vae.decode(latents.float() / LATENT_SCALE).sample
