"""Precision modes: the consistency quotient's error against fp64, and the share of GEMM FLOPs that run in bf16.

For each mode (soflow_fast.precision) and l ratio r = (t - l) / (t - s), one training step's loss is computed with
the mode's rounding and the quotient q = (f_t - f_l) / (t - l) is captured where the loss computes it; the
reference is the same step in fp64 (two calls, no rounding). Printed: relative rms error ||q - q64|| / ||q64||.
On a CPU the GPU's rounding is emulated exactly (soflow_fast.emulate); on CUDA it runs for real. "fp32" is TF32
(the GPU default for fp32 matmuls); "fp32 (IEEE)" is plain fp32 with no TF32, for scale.

Models: the digits DiT (trained weights from --checkpoint, else random non-zero weights), and DiT-XL/2's width and
heads on 32x32x4 latents with random non-zero weights (--xl-depth blocks; 28 on a GPU, fewer on a CPU for time).

    python benchmarks/precision.py [--checkpoint RUN_DIR] [--xl-depth N] [--rows B] [--xl-rows B] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

import soflow_fast.loss as loss_module
from soflow_fast import emulate, precision
from soflow_fast.fileio import atomic_open
from soflow_fast.flow import Flow
from soflow_fast.models import build_model
from soflow_fast.models.dit import DiT
from soflow_fast.step import SoFlowHParams, draw_noise, soflow_loss

RATIOS = (0.1, 0.027, 0.01, 0.002)
MODES = ("fp32 (IEEE)", "fp32", "bf16", "bf16-split", "bf16-secant")
HP = dict(cfg_scale=3.0, mix_ratio=0.25, cfg_drop_rate=0.1, cfg_decay_time=0.8, velocity_loss_ratio=0.75,
          l_schedule="const", total_steps=1)


@contextlib.contextmanager
def capture_q(out: list):
    """Record every quotient the consistency loss computes (the benchmark's only hook into the step)."""
    real = loss_module.consistency_quotient

    def spy(*args, **kwargs):
        q = real(*args, **kwargs)
        out.append(q.detach().double())
        return q

    loss_module.consistency_quotient = spy
    try:
        yield
    finally:
        loss_module.consistency_quotient = real


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-zero weights everywhere (DiT zero-initializes adaLN and the final layer, which would hide the blocks)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad:
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.data.copy_(torch.randn(p.shape, generator=g) * (0.5 / fan_in ** 0.5 if p.dim() > 1 else 0.02))
    return model


def step_q(model, mode_name: str, x0, y, noise, hp: SoFlowHParams, device, backward: bool):
    """(q, bf16 share of GEMM FLOPs or None) of one step in `mode_name`."""
    mode = precision.MODES["fp32" if mode_name == "fp32 (IEEE)" else mode_name]
    qs: list = []
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode_name != "fp32 (IEEE)"
    counter = emulate.GemmCounter() if cuda else emulate.BF16Emulator(tf32=mode_name != "fp32 (IEEE)")
    with counter, capture_q(qs):
        out = soflow_loss(model, Flow(), hp, x0, y, noise, step=0, null_label=model.null_label, precision=mode)
        if backward:
            out.loss.backward()
    model.zero_grad(set_to_none=True)
    return qs[0], (counter.bf16_fraction if backward else None)


def rel_error(q, ref) -> float:
    return float((q - ref).norm() / ref.norm())


def measure(model, name: str, rows: int, device, seed: int) -> list[dict]:
    cfg = model.cfg
    g = torch.Generator(device).manual_seed(seed)
    x0 = torch.randn(rows, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g, device=device) * 0.5
    y = torch.randint(0, cfg.num_classes, (rows,), generator=g, device=device)
    model64 = build_model_like(model).double()
    out = []
    for r in RATIOS:
        hp = SoFlowHParams(**HP, l_init_ratio=r, l_end_ratio=r)
        noise = draw_noise(hp, x0, guided=True, generator=torch.Generator(device).manual_seed(seed + 1))
        noise.cfg_mask[:] = False  # every row guided: the teacher's rounding reaches q
        ref, _ = step_q(model64, "fp32 (IEEE)", x0.double(), y, noise, hp, device, backward=False)
        for mode_name in MODES:
            q, frac = step_q(model, mode_name, x0, y, noise, hp, device, backward=r == RATIOS[0])
            row = {"model": name, "mode": mode_name, "r": r, "q_rel_error": rel_error(q, ref)}
            if frac is not None:
                row["bf16_gemm_fraction"] = frac
            out.append(row)
            print(f"  {name:<10} {mode_name:<12} r={r:<6} q error {row['q_rel_error']:.2e}", flush=True)
    return out


def build_model_like(model: DiT) -> DiT:
    twin = DiT(model.cfg).to(next(model.parameters()).device)
    twin.load_state_dict(model.state_dict())
    return twin.train()


def table(rows: list[dict], device_name: str) -> str:
    lines = [f"q relative rms error against fp64 ({device_name}); bf16 share of the step's GEMM FLOPs", "",
             "| model | mode | " + " | ".join(f"r = {r}" for r in RATIOS) + " | bf16 GEMM FLOPs |",
             "|---|---|" + "---|" * (len(RATIOS) + 1)]
    for model in dict.fromkeys(r["model"] for r in rows):
        for mode in MODES:
            sel = [r for r in rows if r["model"] == model and r["mode"] == mode]
            frac = next((r["bf16_gemm_fraction"] for r in sel if "bf16_gemm_fraction" in r), None)
            errs = " | ".join(f"{100 * r['q_rel_error']:.3g}%" for r in sel)
            lines.append(f"| {model} | {mode} | {errs} | {'-' if frac is None else f'{100 * frac:.1f}%'} |")
    return "\n".join(lines)


def load_digits(path: str, device):
    from soflow_fast.checkpoint import consolidate, model_from_checkpoint

    return model_from_checkpoint(consolidate(path), "ema", "eager", device).train()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a digits run directory or checkpoint (trained weights)")
    ap.add_argument("--xl-depth", type=int, default=None,
                    help="DiT-XL/2 blocks (default: 28 on CUDA, 2 on CPU; 0 = skip)")
    ap.add_argument("--rows", type=int, default=32, help="digits rows per step (default 32: 24 FM, 8 consistency)")
    ap.add_argument("--xl-rows", type=int, default=8, help="XL/2 rows per step (default 8: 6 FM, 2 consistency)")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.checkpoint and not Path(args.checkpoint).exists():
        ap.error(f"--checkpoint {args.checkpoint}: no such file or directory")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU, GPU rounding emulated"
    xl_depth = args.xl_depth if args.xl_depth is not None else (28 if device.type == "cuda" else 2)
    rows = []
    digits = (load_digits(args.checkpoint, device) if args.checkpoint else
              randomize(build_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, hidden_size=128,
                                    depth=4, num_heads=4), seed=0).to(device))
    rows += measure(digits, "digits" + (" (trained)" if args.checkpoint else " (random)"), args.rows, device, 1)
    if xl_depth:
        xl = randomize(build_model("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, depth=xl_depth),
                       seed=0).to(device)
        rows += measure(xl, f"XL/2 x{xl_depth}", args.xl_rows, device, 2)
    print(table(rows, device_name))
    if args.json:
        with atomic_open(args.json, "w") as fh:
            json.dump({"device": device_name, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
