"""Time one optimizer step + EMA update: torch AdamW + a separate EMA pass vs the fused AdamW+EMA step.

    python benchmarks/optim.py                       # CUDA if present: DiT-B/2-like, ~130M params
    python benchmarks/optim.py --numel 20000000      # CPU default is 20M

Parameters are split like a DiT (per block, hidden h: qkv 3h^2, proj h^2, MLP 8h^2, adaLN 6h^2, plus
biases; 12 blocks), so the per-tensor overheads are realistic. Bytes per parameter count the minimum
traffic of each method: AdamW reads p, g, m, v and writes p, m, v; a separate EMA reads p, e and writes
e; the fused step reads p, g, m, v, e once and writes p, m, v, e once (4 bytes each, grad by dtype).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch

from soflow_fast.optim import FusedAdamWEMA, ema_update_, optimizer_backends
from soflow_fast import optim


def dit_like_shapes(numel: int, depth: int = 12) -> list[tuple[int, ...]]:
    h = max(64, round((numel / (18 * depth)) ** 0.5 / 64) * 64)
    block = [(3 * h, h), (3 * h,), (h, h), (h,), (4 * h, h), (4 * h,), (h, 4 * h), (h,), (6 * h, h), (6 * h,)]
    return block * depth


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except Exception:  # noqa: BLE001 -- lscpu missing: fall back to platform
        model = platform.processor() or platform.machine()
    return f"CPU: {model}, {torch.get_num_threads()} threads"


def time_ms(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--numel", type=int, default=None, help="about this many parameters (DiT-B/2: 130M)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    numel = args.numel or (130_000_000 if device.type == "cuda" else 20_000_000)
    iters = args.iters or (20 if device.type == "cuda" else 5)

    gen = torch.Generator(device=device).manual_seed(0)
    shapes = dit_like_shapes(numel)
    params = [torch.randn(s, device=device, generator=gen).requires_grad_() for s in shapes]
    for p in params:
        p.grad = 1e-3 * torch.randn(p.shape, device=device, generator=gen)
    n = sum(p.numel() for p in params)
    ema = [p.detach().clone() for p in params]
    hp = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    rows = []  # (method, grad dtype, bytes per param, ms)

    def add(name, grad_bytes, unfused, fn):
        ms = time_ms(fn, device, args.warmup, iters)
        rows.append((name, {4: "fp32", 2: "bf16"}[grad_bytes], (40 if unfused else 36) - 4 + grad_bytes, ms))

    flavours = ["foreach"] + (["fused"] if device.type == "cuda" else [])
    for flavour in flavours:
        opt = torch.optim.AdamW(params, **hp, **{flavour: True})

        def torch_step(opt=opt):
            opt.step()
            ema_update_(ema, params, 0.9999)

        add(f"torch AdamW ({flavour}) + EMA (foreach lerp)", 4, True, torch_step)
        del opt

    if optim._fused_optim is None:
        print(f"fused_adamw_ema not built: {optim.BUILD_HINT}")
    elif device.type == "cuda" and not optimizer_backends()["fused_adamw_ema_cuda"]:
        print("fused_adamw_ema was built without CUDA: skipping the fused rows")
    else:
        fused = FusedAdamWEMA(params, **hp, ema_decay=0.9999, ema_params=ema)
        add("FusedAdamWEMA.step (one pass)", 4, False, fused.step)
        state = [fused.state[p] for p in params]
        m, v = [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state]
        g16 = [p.grad.to(torch.bfloat16) for p in params]
        data = [p.detach() for p in params]
        kernel = optim._fused_optim.fused_adamw_ema_
        add("fused kernel, bf16 grads", 2, False,
            lambda: kernel(data, g16, m, v, ema, 10, 1e-4, 0.9, 0.999, 1e-8, 0.0, 0.9999))

    print(f"\n{device_name(device)}; {n / 1e6:.1f}M params in {len(params)} tensors; "
          f"median of {iters} steps\n")
    print("| method | grads | bytes/param (min) | ms/step | GB/s |")
    print("| --- | --- | --- | --- | --- |")
    for name, gdt, bpp, ms in rows:
        print(f"| {name} | {gdt} | {bpp} | {ms:.2f} | {bpp * n / ms / 1e6:.0f} |")


if __name__ == "__main__":
    main()
