"""Latent loader throughput on this device: samples/s of each backend over ImageNet-latent-sized shards (8x32x32,
written here as synthetic files), next to the rate at which a DiT-XL/2 SoFlow step consumes samples.

    python benchmarks/loader.py [--count 16384] [--batch-size 256] [--dtype float16] [--batches 40] [--step]

The loaders' rate includes reading, the host-to-device copy (CUDA) and the noise draw x0 = (mean + std eps) 0.18215;
--step also times one training step of DiT-XL/2 (three-call, batch --step-batch-size; the default on CUDA only, as on a
CPU it takes minutes). On a CPU every number is a CPU number and says so.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from soflow_fast.data.latents import LatentLoader, dali_available
from soflow_fast.data.prepare import write_manifest, write_shard
from soflow_fast.vae import LATENT_SCALE


def write_synthetic(root: Path, count: int, shard_size: int, dtype: str) -> None:
    rng = np.random.default_rng(0)
    shards = (count + shard_size - 1) // shard_size
    for k in range(shards):
        n = min(shard_size, count - k * shard_size)
        lat = rng.standard_normal((n, 8, 32, 32), dtype=np.float32).astype(dtype)
        write_shard(root, k, lat, rng.integers(0, 1000, n))
    write_manifest(root, shards, (8, 32, 32), np.dtype(dtype),
                   {"image_size": 256, "latent_scale": LATENT_SCALE, "classes": None, "num_classes": 1000,
                    "shard_size": shard_size, "source": "synthetic", "vae": None})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(root: Path, backend: str, batch: int, batches: int, device: torch.device, workers: int) -> float:
    loader = LatentLoader(root, batch, seed=0, device=device, backend=backend, num_workers=workers)
    for _ in range(3):
        loader.next()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next()
    _sync(device)
    return batches * batch / (time.perf_counter() - t0)


def xl2_step_rate(batch: int, device: torch.device, steps: int = 5) -> float:
    """Samples/s of a DiT-XL/2 SoFlow training step on 32x32x4 latents (the reference ImageNet hyperparameters)."""
    from soflow_fast.config import TrainConfig
    from soflow_fast.models import build_model
    from soflow_fast.step import draw_noise, soflow_loss
    from soflow_fast.precision import numerics, resolve_precision

    cfg = TrainConfig.from_dict({"model_type": "DiT-XL/2", "dataset_type": "Imagenet", "data_size": 32,
                                 "batch_size": batch, "cfg_scale": 3.0, "cfg_drop_rate": 0.1, "mix_ratio": 0.25,
                                 "device": device.type})
    mode = resolve_precision(cfg.precision, device)
    model = build_model("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, null_class=True,
                        kernels=cfg.kernels, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    gen = torch.Generator(device).manual_seed(0)
    kernel_ops = model.kernel_ops

    def step():
        noise = draw_noise(cfg.hparams, x0, True, gen)
        opt.zero_grad(set_to_none=True)
        with numerics(mode, device):
            soflow_loss(model, cfg.flow, cfg.hparams, x0, y, noise, 0, model.null_label, kernel_ops=kernel_ops,
                        precision=mode).loss.backward()
        opt.step()

    step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=16384, help="synthetic latents (default 16384)")
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--step-batch-size", type=int, default=32,
                    help="per-GPU batch of the XL/2 step (default 32: the reference's 256 over 8 GPUs)")
    ap.add_argument("--batches", type=int, default=40, help="timed batches per loader (default 40)")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers / DALI threads (default 4)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dir", help="where to write the shards (default: a temporary folder, removed after)")
    ap.add_argument("--step", action=argparse.BooleanOptionalAction, default=None,
                    help="also time a DiT-XL/2 step (default: on CUDA only)")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    with tempfile.TemporaryDirectory() if args.dir is None else contextlib.nullcontext(args.dir) as d:
        root = Path(d)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_synthetic(root, args.count, args.shard_size, args.dtype)
        size = sum(f.stat().st_size for f in root.glob("shard-*.npy")) / 2 ** 20
        where = (f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else
                 f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible) -- CPU numbers")
        print(f"device: {where}; {args.count} synthetic latents 8x32x32 {args.dtype} ({size:.0f} MiB, page-cached, "
              f"written in {time.perf_counter() - t0:.1f}s), batch {args.batch_size}, {args.workers} workers/threads")
        print("| source | samples/s |")
        print("|---|---|")
        backends = [("torch", 0), ("torch", args.workers)] + ([("dali", args.workers)] if dali_available() else [])
        for backend, workers in backends:
            label = f"{backend} ({'DALI threads' if backend == 'dali' else 'DataLoader workers'} {workers})"
            rate = loader_rate(root, backend, args.batch_size, args.batches, device, workers)
            print(f"| {label} | {rate:,.0f} |", flush=True)
        if not dali_available():
            print("| dali | not installed |")
        if args.step or (args.step is None and device.type == "cuda"):
            rate = xl2_step_rate(args.step_batch_size, device)
            print(f"| DiT-XL/2 SoFlow training step consumes (batch {args.step_batch_size}) | {rate:,.0f} |")


if __name__ == "__main__":
    sys.exit(main())
