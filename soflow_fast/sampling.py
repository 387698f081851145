"""Sampling at scale: N-NFE samples from a checkpoint into one ADM-layout .npz (arr_0 uint8 NHWC, arr_1 labels).

Work is cut into chunks of `batch_size` samples; chunk c's noise and labels come from a generator seeded by
(seed, c), so the result does not depend on the world size. Under torchrun chunk c goes to rank c mod W. Each chunk
is written to parts/ under a temporary name and renamed, so a rerun skips finished chunks (resumable); rank 0 then
joins them in order. Latent models are decoded with a LOCAL diffusers AutoencoderKL (vae.py).

`sample_images` is the one path from a network to images (noise and labels from a generator, N-NFE sampling,
VAE decoding): `generate` here, the trainer's sample grids and FID (evaluation/periodic.py) and the digits quality
report use it.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .flow import Flow, derived_seed, euler_sample, sample
from .images import save_grid, save_npz, to_uint8_nhwc
from .parallel import DistInfo, barrier
from .precision import Precision, numerics, region
from .vae import decode

log = logging.getLogger("soflow_fast")


def input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(channels, size, size) of the network's input (the DiT's input_size, the U-Net's img_resolution)."""
    cfg = model.cfg
    size = getattr(cfg, "input_size", None) or cfg.img_resolution
    return cfg.in_channels, size, size


@torch.no_grad()
def sample_images(model: torch.nn.Module, flow: Flow, n: int, *, nfe: int, generator: torch.Generator,
                  labels: Optional[Tensor] = None, vae=None, precision: Optional[Precision] = None,
                  euler_steps: int = 0) -> tuple[Tensor, Optional[Tensor]]:
    """(n images [n, C, H, W] in about [-1, 1], their labels or None) from `model`.

    The noise x1 ~ N(0, I), then (for a conditional model without given `labels`) uniform labels, are drawn from
    `generator`; nfe-step sampling (docs/algorithm.md section 7), or with euler_steps a Euler solve of the model's
    velocity (for scale); latent samples are decoded by `vae`. precision: run the network as that mode's teacher
    calls (bf16 or fp32; the emulator on a CPU), as the trainer's own evaluations do; None: as the caller runs.
    """
    device = generator.device
    x1 = torch.randn((n, *input_shape(model)), generator=generator, device=device)
    classes = getattr(model.cfg, "num_classes", 0)
    if labels is None and classes:
        labels = torch.randint(0, classes, (n,), generator=generator, device=device)
    with _teacher_numerics(precision, device):
        if euler_steps:
            x = euler_sample(model, flow, x1, euler_steps, labels)
        else:
            x = sample(model, flow, x1, nfe=nfe, y=labels, generator=generator)
    return (x if vae is None else decode(vae, x)), labels


def _teacher_numerics(precision: Optional[Precision], device: torch.device) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if precision is not None:
        stack.enter_context(numerics(precision, device))
        stack.enter_context(region(precision, precision.teacher_bf16, device.type))
    return stack


@torch.no_grad()
def generate(model: torch.nn.Module, flow: Flow, out: Path, *, num: int, nfe: int, seed: int, batch_size: int,
             dist: DistInfo, labels: Optional[list[int]] = None, vae=None, progress: bool = True) -> Optional[Path]:
    """Write out/samples_<nfe>nfe.npz (and a PNG grid of the first 100); returns its path on rank 0. Sampling runs
    in fp32 (TF32 on GPUs): a one-step sample is one call, so bf16 would save little and round the output."""
    device = dist.device
    num_classes = getattr(model.cfg, "num_classes", 0)
    parts = out / f"parts_{nfe}nfe_seed{seed}_bs{batch_size}"
    parts.mkdir(parents=True, exist_ok=True)
    chunks = range(dist.rank, (num + batch_size - 1) // batch_size, dist.world_size)
    for done, c in enumerate(chunks):
        path = parts / f"chunk_{c:06d}.npz"
        if path.exists():
            continue
        n = min(batch_size, num - c * batch_size)
        g = torch.Generator(device).manual_seed(derived_seed(seed, c))
        given = None
        if num_classes and labels:
            given = torch.tensor([labels[(c * batch_size + i) % len(labels)] for i in range(n)], device=device)
        x, y = sample_images(model, flow, n, nfe=nfe, generator=g, labels=given, vae=vae)
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
