"""Sampling at scale: N-NFE samples from a checkpoint into one ADM-layout .npz (arr_0 uint8 NHWC, arr_1 labels).

Work is cut into chunks of `batch_size` samples; chunk c's noise and labels come from a generator seeded by
(seed, c), so the result does not depend on the world size. Under torchrun chunk c goes to rank c mod W. Each chunk
is written to parts/ under a temporary name and renamed, so a rerun skips finished chunks (resumable); rank 0 then
joins them in order. Latent models are decoded with a LOCAL diffusers AutoencoderKL (latent / 0.18215).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data.latents import LATENT_SCALE
from .flow import Flow, derived_seed, sample
from .images import save_grid, save_npz, to_uint8_nhwc
from .parallel import DistInfo, barrier

log = logging.getLogger("soflow_fast")


@torch.no_grad()
def generate(model: torch.nn.Module, flow: Flow, out: Path, *, num: int, nfe: int, seed: int, batch_size: int,
             dist: DistInfo, labels: Optional[list[int]] = None, vae=None, progress: bool = True) -> Optional[Path]:
    """Write out/samples_<nfe>nfe.npz (and a PNG grid of the first 100); returns its path on rank 0. Sampling runs
    in fp32 (TF32 on GPUs): a one-step sample is one call, so bf16 would save little and round the output."""
    device = dist.device
    cfg = model.cfg
    num_classes = getattr(cfg, "num_classes", 0)
    channels = cfg.in_channels
    size = getattr(cfg, "input_size", None) or cfg.img_resolution
    parts = out / f"parts_{nfe}nfe_seed{seed}_bs{batch_size}"
    parts.mkdir(parents=True, exist_ok=True)
    chunks = range(dist.rank, (num + batch_size - 1) // batch_size, dist.world_size)
    for done, c in enumerate(chunks):
        path = parts / f"chunk_{c:06d}.npz"
        if path.exists():
            continue
        n = min(batch_size, num - c * batch_size)
        g = torch.Generator(device).manual_seed(derived_seed(seed, c))
        x1 = torch.randn((n, channels, size, size), generator=g, device=device)
        if num_classes:
            if labels:
                y = torch.tensor([labels[(c * batch_size + i) % len(labels)] for i in range(n)], device=device)
            else:
                y = torch.randint(0, num_classes, (n,), generator=g, device=device)
        else:
            y = None
        x = sample(model, flow, x1, nfe=nfe, y=y, generator=g)
        if vae is not None:
            x = vae.decode(x.float() / LATENT_SCALE).sample
        save_npz(to_uint8_nhwc(x), path, None if y is None else y.cpu().numpy())
        if progress and dist.is_main:
            log.info("sampled chunk %d (%d of %d on this rank)", c, done + 1, len(chunks))
    barrier()
    if not dist.is_main:
        return None
    files = sorted(parts.glob("chunk_*.npz"))
    arrays = [np.load(f) for f in files]
    images = np.concatenate([a["arr_0"] for a in arrays])
    ys = np.concatenate([a["arr_1"] for a in arrays]) if num_classes else None
    if images.shape[0] != num:
        raise RuntimeError(f"{parts}: found {images.shape[0]} samples in {len(files)} chunks, expected {num}")
    final = out / f"samples_{nfe}nfe.npz"
    save_npz(images, final, ys)
    cols = min(num, 10)
    save_grid(images, (min(num, 100) + cols - 1) // cols, cols, out / f"samples_{nfe}nfe.png",
              upscale=4 if images.shape[1] <= 16 else 1)
    return final


def load_decoder(vae_dir: Optional[str], device: torch.device):
    """A local AutoencoderKL for latent models (None when no --vae is given)."""
    if not vae_dir:
        return None
    from .data.prepare import load_vae

    return load_vae(vae_dir, device)
