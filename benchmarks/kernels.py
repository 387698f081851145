"""Benchmark of the fused Triton kernels against eager PyTorch and torch.compile of eager.

For each kernel (LN + modulate, gated residual, the two fused, FM loss, consistency loss) at the DiT-B/2, L/2 and
XL/2 widths (256 tokens, batch 32 and 256) in bf16 and fp32: median time (triton.testing.do_bench, L2 flushed per
repetition) of the forward and of forward + backward, the minimum bytes each must move (every input read once,
every output written once), achieved GB/s, that as a fraction of a device-to-device copy measured in the same run,
and the max abs error vs eager. Prints a Markdown table; --json PATH writes the rows.

Without CUDA it runs the parity part only, at small shapes under the Triton interpreter: timings need a GPU.

    python benchmarks/kernels.py [--json out.json] [--batches 32 256] [--budget-s 420]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from soflow_fast import loss as L  # noqa: E402
from soflow_fast import ops  # noqa: E402
from soflow_fast.flow import Flow  # noqa: E402
from soflow_fast.kernels import adaln, soflow_loss  # noqa: E402

WIDTHS = {"DiT-B/2": 768, "DiT-L/2": 1024, "DiT-XL/2": 1152}
TOKENS = 256
LATENT = (4, 32, 32)  # ImageNet 256 latents: one loss row
FLOW = Flow("linear", "euler")
GUIDE = dict(cfg_scale=3.0, mix_ratio=0.25, cfg_decay_time=0.8)


# -- the cases: (name, make inputs, eager fn, fwd bytes, fwd+bwd bytes) ----------------------------
def adaln_case(name, B, D, dtype, dev):
    T, es = TOKENS, torch.tensor([], dtype=dtype).element_size()
    act = lambda: torch.randn(B, T, D, device=dev, dtype=dtype)  # noqa: E731
    vec = lambda: torch.randn(B, D, device=dev, dtype=dtype) * 0.5  # noqa: E731
    nd = B * T * D * es
    if name == "layernorm_modulate":
        return (act(), vec(), vec()), ops.layernorm_modulate_eager, adaln.layernorm_modulate, 2 * nd, 5 * nd
    if name == "gated_residual":  # backward: dx is dout itself, so read dout, y and write dy
        return (act(), vec(), act()), ops.gated_residual_eager, adaln.gated_residual, 3 * nd, 6 * nd
    return ((act(), vec(), act(), vec(), vec()), ops.gated_residual_layernorm_modulate_eager,
            adaln.gated_residual_layernorm_modulate, 4 * nd, 10 * nd)


def loss_case(name, B, dtype, dev):
    es = torch.tensor([], dtype=dtype).element_size()
    n = B * LATENT[0] * LATENT[1] * LATENT[2]
    r = lambda dt=torch.float32: torch.randn(B, *LATENT, device=dev, dtype=dt)  # noqa: E731
    t = torch.rand(B, device=dev) * 0.9 + 0.05
    if name == "fm_loss":  # read F, F_unc (dtype), v_t (fp32); write the fp32 gradient; bwd: read it, write dF
        mask = torch.rand(B, device=dev) < 0.1
        fwd_bytes = n * (2 * es + 4 + 4)
        eager = lambda F, v, Fu: tuple(L.fm_loss(FLOW, F, v, v, t, p=1.0, eps=0.01, F_unc=Fu, mask=mask, **GUIDE))  # noqa
        fast = lambda F, v, Fu: tuple(soflow_loss.fm_loss(FLOW, F, v, v, t, p=1.0, eps=0.01, F_unc=Fu, mask=mask,  # noqa
                                                          **GUIDE))
        return (r(dtype), r(), r(dtype)), eager, fast, fwd_bytes, fwd_bytes + n * (4 + es)
    s = t * 0.5
    l = t - (t - s) * 0.1
    fwd_bytes = n * (2 * es + 4 + 4 + 4)  # F_t, F_l (dtype), x_t, u (fp32), gradient out (fp32)
    eager = lambda F, x, u, Fl: tuple(L.consistency_loss(FLOW, F, x, u, t, s, l, Fl, p=1.0, eps=0.01))  # noqa
    fast = lambda F, x, u, Fl: tuple(soflow_loss.consistency_loss(FLOW, F, x, u, t, s, l, Fl, p=1.0, eps=0.01))  # noqa
    return (r(dtype), r(), r(), r(dtype)), eager, fast, fwd_bytes, fwd_bytes + n * (4 + es)


ADALN = ["layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate"]
LOSSES = ["fm_loss", "consistency_loss"]
GRAD_ARGS = {"fm_loss": 1, "consistency_loss": 1}  # losses: gradient w.r.t. the network output only


def as_tuple(o):
    return o if isinstance(o, tuple) else (o,)


def fwd_bwd(fn, args, n_grad):
    """A closure running fn forward then backward to the first n_grad inputs; returns the gradients."""
    leaves = [a.detach().requires_grad_(i < n_grad) for i, a in enumerate(args)]

    def run():
        outs = as_tuple(fn(*leaves))
        outs = [o for o in outs if o.requires_grad]
        cots = [torch.ones_like(o) for o in outs]
        return torch.autograd.grad(outs, leaves[:n_grad], cots)
    return run


def max_err(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(as_tuple(a), as_tuple(b)))


def copy_bandwidth(dev) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written)."""
    import triton.testing
    src = torch.randn(256 * 2**20, device=dev)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6


def bench_gpu(args) -> list[dict]:
    import triton.testing
    torch._dynamo.config.cache_size_limit = 256
    dev = "cuda"
    copy_gbs = copy_bandwidth(dev)
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    bench = lambda f: triton.testing.do_bench(f, warmup=10, rep=40, return_mode="median")  # noqa: E731
    rows, t_start = [], time.time()
    cases = [(k, "latent 4x32x32", B, dt) for dt in (torch.bfloat16, torch.float32) for B in args.batches
             for k in LOSSES]
    cases += [(k, m, B, dt) for dt in (torch.bfloat16, torch.float32) for B in args.batches for m in WIDTHS
              for k in ADALN]
    for kernel, model, B, dtype in cases:
        if time.time() - t_start > args.budget_s:
            print(f"time budget spent: skipping {kernel} {model} B={B} {dtype}", flush=True)
            continue
        if kernel in LOSSES:
            inputs, eager, fast, b_fwd, b_all = loss_case(kernel, B, dtype, dev)
        else:
            inputs, eager, fast, b_fwd, b_all = adaln_case(kernel, B, WIDTHS[model], dtype, dev)
        compiled = torch.compile(eager, dynamic=False)
        n_grad = GRAD_ARGS.get(kernel, len(inputs))
        ref_out, ref_grad = eager(*inputs), fwd_bwd(eager, inputs, n_grad)()
        for mode, nbytes in (("fwd", b_fwd), ("fwd+bwd", b_all)):
            for impl, fn in (("eager", eager), ("compile", compiled), ("triton", fast)):
                call = (lambda fn=fn: fn(*inputs)) if mode == "fwd" else fwd_bwd(fn, inputs, n_grad)
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    out = call()
                    err = max_err(out, ref_out if mode == "fwd" else ref_grad)
                    ms = bench(call)
                gbs = nbytes / ms / 1e6
                row = dict(kernel=kernel, model=model, batch=B, dtype=str(dtype).replace("torch.", ""), mode=mode,
                           impl=impl, ms=ms, min_bytes=nbytes, gb_s=gbs, copy_fraction=gbs / copy_gbs,
                           max_abs_err=err, device=torch.cuda.get_device_name(), copy_gb_s=copy_gbs)
                rows.append(row)
                print(f"  {kernel} {model} B={B} {row['dtype']} {mode} {impl}: {ms:.4f} ms {gbs:.0f} GB/s "
                      f"({gbs / copy_gbs:.0%}) err {err:.2e}", flush=True)
    return rows


def parity_cpu() -> list[dict]:
    """Interpreter parity at small shapes (max abs error of outputs and gradients vs eager)."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for kernel in ADALN:
            inputs, eager, fast, _, _ = adaln_case(kernel, 2, 72, dtype, "cpu")
            inputs = tuple(a[:, :9] if a.dim() == 3 else a for a in inputs)  # T = 9 tokens: odd on purpose
            err_f = max_err(fast(*inputs), eager(*inputs))
            err_b = max_err(fwd_bwd(fast, inputs, len(inputs))(), fwd_bwd(eager, inputs, len(inputs))())
            rows.append(dict(kernel=kernel, dtype=str(dtype).replace("torch.", ""), fwd_err=err_f, grad_err=err_b))
        for kernel in LOSSES:
            inputs, eager, fast, _, _ = loss_case(kernel, 3, dtype, "cpu")
            err_f = max_err(fast(*inputs), eager(*inputs))
            err_b = max_err(fwd_bwd(fast, inputs, 1)(), fwd_bwd(eager, inputs, 1)())
            rows.append(dict(kernel=kernel, dtype=str(dtype).replace("torch.", ""), fwd_err=err_f, grad_err=err_b))
    return rows


def table(rows: list[dict], cols: list[str]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new cases after this long")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        rows = bench_gpu(args)
        print(table(rows, ["kernel", "model", "batch", "dtype", "mode", "impl", "ms", "gb_s", "copy_fraction",
                           "max_abs_err"]))
    else:
        print("No CUDA device: parity only, under the Triton interpreter at small shapes. Timings need a GPU.")
        rows = parity_cpu()
        print(table(rows, ["kernel", "dtype", "fwd_err", "grad_err"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
