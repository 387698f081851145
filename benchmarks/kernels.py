"""Benchmark of the fused Triton kernels against eager PyTorch and torch.compile of eager.

For each kernel (LN + modulate, gated residual, the two fused, FM loss, consistency loss, and the GEMM-fused
LN + modulate + linear (the qkv projection, N = 3D) and linear + gated residual (fc2, K = 4D)) at the DiT-B/2, L/2 and
XL/2 widths (256 tokens, batch 32 and 256) in bf16 and fp32, forward and forward + backward, for eager, torch.compile
of eager, the Triton op, and torch.compile of the Triton op (the custom ops traced into the graph), three times:
  ms        median of triton.testing.do_bench (L2 flushed per repetition) of the Python call: what a caller pays,
            host work included (a call whose host path outlasts its kernels is timed at its host path);
  host ms   the host time to issue one call (20 back-to-back calls, no synchronisation inside);
  graph ms  the same call captured once in a CUDA graph and replayed (do_bench, L2 flushed): device time alone.
With the minimum bytes each op must move (every input read once, every output written once), GB/s and the fraction
of a device-to-device copy measured in the same run (from ms, and from graph ms), and the max abs error vs eager.
Prints a Markdown table; --json PATH writes the rows.

Without CUDA it prints (1) the parity part, at small shapes under the Triton interpreter, and (2) the host path of
each op at tiny shapes with the Triton launches replaced by no-ops: the Python, dispatcher and autograd cost that a
Triton op adds around its kernels, beside eager's. Kernel timings need a GPU.

    python benchmarks/kernels.py [--json out.json] [--batches 32 256] [--budget-s 420]
"""
from __future__ import annotations

import argparse
import contextlib
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
from soflow_fast.kernels import adaln, adaln_linear, soflow_loss  # noqa: E402

WIDTHS = {"DiT-B/2": 768, "DiT-L/2": 1024, "DiT-XL/2": 1152}
TOKENS = 256
LATENT = (4, 32, 32)  # ImageNet 256 latents: one loss row
FLOW = Flow("linear", "euler")
GUIDE = dict(cfg_scale=3.0, mix_ratio=0.25, cfg_decay_time=0.8)


# -- the cases: (name, make inputs, eager fn, fwd bytes, fwd+bwd bytes) ----------------------------
def adaln_case(name, B, D, dtype, dev, T=TOKENS):
    es = torch.tensor([], dtype=dtype).element_size()
    act = lambda: torch.randn(B, T, D, device=dev, dtype=dtype)  # noqa: E731
    vec = lambda: torch.randn(B, D, device=dev, dtype=dtype) * 0.5  # noqa: E731
    nd = B * T * D * es
    fns = adaln.functions(torch.device(dev).type)  # the registration a model on dev uses
    if name == "layernorm_modulate":
        return (act(), vec(), vec()), ops.layernorm_modulate_eager, fns.layernorm_modulate, 2 * nd, 5 * nd
    if name == "gated_residual":  # backward: dx is dout itself, so read dout, y and write dy
        return (act(), vec(), act()), ops.gated_residual_eager, fns.gated_residual, 3 * nd, 6 * nd
    return ((act(), vec(), act(), vec(), vec()), ops.gated_residual_layernorm_modulate_eager,
            fns.gated_residual_layernorm_modulate, 4 * nd, 10 * nd)


def linear_case(name, B, D, dtype, dev, T=TOKENS):
    """The GEMM-fused ops at the DiT block's shapes: qkv (N = 3D) after LN + modulate, fc2 (K = 4D) before the
    gated residual. Bytes: activations read and written once, the weight once; the backward's GEMM operands."""
    es = torch.tensor([], dtype=dtype).element_size()
    r = lambda *s, k=1.0: torch.randn(*s, device=dev, dtype=dtype) * k  # noqa: E731
    fns = adaln_linear.functions(torch.device(dev).type)
    if name == "layernorm_modulate_linear":
        N, nbytes = 3 * D, B * T * 4 * D * es + 3 * D * D * es
        return ((r(B, T, D), r(B, D, k=0.5), r(B, D, k=0.5), r(N, D, k=D ** -0.5), r(N)),
                ops.layernorm_modulate_linear_eager, fns.layernorm_modulate_linear, nbytes, 3 * nbytes)
    K, nbytes = 4 * D, B * T * 7 * D * es + 4 * D * D * es
    return ((r(B, T, D), r(B, D, k=0.5), r(B, T, K), r(D, K, k=K ** -0.5), r(D)), ops.linear_gated_residual_eager,
            fns.linear_gated_residual, nbytes, 3 * nbytes)


def loss_case(name, B, dtype, dev, latent=LATENT):
    es = torch.tensor([], dtype=dtype).element_size()
    n = B * latent[0] * latent[1] * latent[2]
    r = lambda dt=torch.float32: torch.randn(B, *latent, device=dev, dtype=dt)  # noqa: E731
    t = torch.rand(B, device=dev) * 0.9 + 0.05
    fns = soflow_loss.functions(torch.device(dev).type)
    if name == "fm_loss":  # read F, F_unc (dtype), v_t (fp32); write the fp32 gradient; bwd: read it, write dF
        mask = torch.rand(B, device=dev) < 0.1
        fwd_bytes = n * (2 * es + 4 + 4)
        eager = lambda F, v, Fu: tuple(L.fm_loss(FLOW, F, v, v, t, p=1.0, eps=0.01, F_unc=Fu, mask=mask, **GUIDE))  # noqa
        fast = lambda F, v, Fu: tuple(fns.fm_loss(FLOW, F, v, v, t, p=1.0, eps=0.01, F_unc=Fu, mask=mask,  # noqa
                                                  **GUIDE))
        return (r(dtype), r(), r(dtype)), eager, fast, fwd_bytes, fwd_bytes + n * (4 + es)
    s = t * 0.5
    l = t - (t - s) * 0.1
    fwd_bytes = n * (2 * es + 4 + 4 + 4)  # F_t, F_l (dtype), x_t, u (fp32), gradient out (fp32)
    eager = lambda F, x, u, Fl: tuple(L.consistency_loss(FLOW, F, x, u, t, s, l, Fl, p=1.0, eps=0.01))  # noqa
    fast = lambda F, x, u, Fl: tuple(fns.consistency_loss(FLOW, F, x, u, t, s, l, Fl, p=1.0, eps=0.01))  # noqa
    return (r(dtype), r(), r(), r(dtype)), eager, fast, fwd_bytes, fwd_bytes + n * (4 + es)


ADALN = ["layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate"]
LINEAR = ["layernorm_modulate_linear", "linear_gated_residual"]
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


def host_ms(call, n: int = 20) -> float:
    """Host time to issue one call, ms: n back-to-back calls, no synchronisation inside the loop (on a GPU the
    launch queue absorbs them, so this is the Python + dispatcher + launch cost, not the device time)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    call()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    dt = time.perf_counter() - t0
    sync()
    return dt / n * 1e3


def graph_ms(call, bench):
    """Device time of call, ms: captured once in a CUDA graph and replayed, so no host work is timed.

    Warm-up runs on a side stream first (as CUDA-graph capture of autograd requires). None when capture fails
    (the reason is printed; the row shows n/a).
    """
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
    except Exception as e:  # noqa: BLE001 - one failed capture must not end the run
        print(f"    CUDA graph capture failed: {type(e).__name__}: {e}", flush=True)
        return None
    return bench(graph.replay)


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
              for k in ADALN + LINEAR]
    for kernel, model, B, dtype in cases:
        if time.time() - t_start > args.budget_s:
            print(f"time budget spent: skipping {kernel} {model} B={B} {dtype}", flush=True)
            continue
        if kernel in LOSSES:
            inputs, eager, fast, b_fwd, b_all = loss_case(kernel, B, dtype, dev)
        elif kernel in LINEAR:
            inputs, eager, fast, b_fwd, b_all = linear_case(kernel, B, WIDTHS[model], dtype, dev)
        else:
            inputs, eager, fast, b_fwd, b_all = adaln_case(kernel, B, WIDTHS[model], dtype, dev)
        compiled, compiled_fast = torch.compile(eager, dynamic=False), torch.compile(fast, dynamic=False)
        n_grad = GRAD_ARGS.get(kernel, len(inputs))
        ref_out, ref_grad = eager(*inputs), fwd_bwd(eager, inputs, n_grad)()
        for mode, nbytes in (("fwd", b_fwd), ("fwd+bwd", b_all)):
            for impl, fn in (("eager", eager), ("compile", compiled), ("triton", fast),
                             ("compile+triton", compiled_fast)):
                call = (lambda fn=fn: fn(*inputs)) if mode == "fwd" else fwd_bwd(fn, inputs, n_grad)
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    out = call()
                    err = max_err(out, ref_out if mode == "fwd" else ref_grad)
                    ms, host, graph = bench(call), host_ms(call), graph_ms(call, bench)
                frac = lambda t: None if t is None else nbytes / t / 1e6 / copy_gbs  # noqa: E731
                row = dict(kernel=kernel, model=model, batch=B, dtype=str(dtype).replace("torch.", ""), mode=mode,
                           impl=impl, ms=ms, host_ms=host, graph_ms=graph, min_bytes=nbytes,
                           gb_s=nbytes / ms / 1e6, copy_fraction=frac(ms), graph_copy_fraction=frac(graph),
                           max_abs_err=err, device=torch.cuda.get_device_name(), copy_gb_s=copy_gbs)
                rows.append(row)
                print(f"  {kernel} {model} B={B} {row['dtype']} {mode} {impl}: {ms:.4f} ms (host {host:.4f}, "
                      f"graph {graph if graph is None else round(graph, 4)}) {frac(ms):.0%} of copy, err {err:.2e}",
                      flush=True)
    return rows


def parity_cpu() -> list[dict]:
    """Interpreter parity at small shapes (max abs error of outputs and gradients vs eager)."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for kernel in ADALN:
            inputs, eager, fast, _, _ = adaln_case(kernel, 2, 72, dtype, "cpu", T=9)  # T = 9: odd on purpose
            err_f = max_err(fast(*inputs), eager(*inputs))
            err_b = max_err(fwd_bwd(fast, inputs, len(inputs))(), fwd_bwd(eager, inputs, len(inputs))())
            rows.append(dict(kernel=kernel, dtype=str(dtype).replace("torch.", ""), fwd_err=err_f, grad_err=err_b))
        for kernel in LINEAR:
            inputs, eager, fast, _, _ = linear_case(kernel, 2, 40, dtype, "cpu", T=9)
            err_f = max_err(fast(*inputs), eager(*inputs))
            err_b = max_err(fwd_bwd(fast, inputs, len(inputs))(), fwd_bwd(eager, inputs, len(inputs))())
            rows.append(dict(kernel=kernel, dtype=str(dtype).replace("torch.", ""), fwd_err=err_f, grad_err=err_b))
        for kernel in LOSSES:
            inputs, eager, fast, _, _ = loss_case(kernel, 3, dtype, "cpu")
            err_f = max_err(fast(*inputs), eager(*inputs))
            err_b = max_err(fwd_bwd(fast, inputs, 1)(), fwd_bwd(eager, inputs, 1)())
            rows.append(dict(kernel=kernel, dtype=str(dtype).replace("torch.", ""), fwd_err=err_f, grad_err=err_b))
    return rows


KERNEL_OBJECTS = ((adaln, "_adaln_fwd_kernel"), (adaln, "_adaln_bwd_kernel"), (adaln, "_sum_chunks_kernel"),
                  (adaln_linear, "_row_stats_kernel"), (adaln_linear, "_ln_linear_kernel"),
                  (adaln_linear, "_linear_gated_residual_kernel"), (soflow_loss, "_fm_kernel"),
                  (soflow_loss, "_consistency_kernel"))


class _NoLaunch:
    """Stands in for a Triton kernel object: kernel[grid](...) launches nothing; `record` keeps each launch's
    (kernel name, grid, args, kwargs)."""

    def __init__(self, name: str, record: list):
        self.name, self.record = name, record

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.record.append((self.name, grid, args, kwargs))


@contextlib.contextmanager
def launches_stubbed(record: list | None = None):
    """Within: the Triton ops' launches (custom_op registration) are recorded, not run."""
    from unittest import mock
    record = [] if record is None else record
    with contextlib.ExitStack() as stack:
        for module, name in KERNEL_OBJECTS:
            stack.enter_context(mock.patch.object(module, name, _NoLaunch(name, record)))
        yield record


def host_path_cpu(repeats: int = 200) -> list[dict]:
    """Host cost per call (us) of each op on CPU at tiny shapes: eager, and the Triton op with its launches
    replaced by no-ops (so what is timed is the Python, custom-op dispatch and autograd path around the kernels;
    outputs are left uninitialised). The launches themselves, and all device time, are not included."""
    cases = [(k, adaln_case(k, 2, 8, torch.float32, "cpu", T=4)) for k in ADALN]
    cases += [(k, linear_case(k, 2, 8, torch.float32, "cpu", T=4)) for k in LINEAR]
    cases += [(k, loss_case(k, 2, torch.float32, "cpu", latent=(1, 2, 2))) for k in LOSSES]
    rows = []
    for kernel, (inputs, eager, fast, _, _) in cases:
        n_grad = GRAD_ARGS.get(kernel, len(inputs))
        row = dict(kernel=kernel)
        for impl, fn in (("eager", eager), ("triton", fast)):
            for mode in ("fwd", "fwd+bwd"):
                call = (lambda fn=fn: fn(*inputs)) if mode == "fwd" else fwd_bwd(fn, inputs, n_grad)
                with torch.no_grad() if mode == "fwd" else torch.enable_grad(), \
                        launches_stubbed() if impl == "triton" else contextlib.nullcontext():
                    row[f"{impl} {mode} us"] = 1e3 * min(host_ms(call, repeats) for _ in range(3))
        rows.append(row)
    return rows


def dump_json(path: str | None, rows) -> None:
    """Write rows to path as JSON (nothing when path is None: --json was not given)."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def table(rows: list[dict], cols: list[str]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else "n/a" if v is None else str(v)  # noqa: E731
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
        print(table(rows, ["kernel", "model", "batch", "dtype", "mode", "impl", "ms", "host_ms", "graph_ms",
                           "copy_fraction", "graph_copy_fraction", "max_abs_err"]))
    else:
        print("No CUDA device: kernel timings need a GPU. Parity under the Triton interpreter at small shapes:")
        rows = parity_cpu()
        print(table(rows, ["kernel", "dtype", "fwd_err", "grad_err"]))
        host = host_path_cpu()
        print(f"\nHost path per call on this CPU ({torch.get_num_threads()} threads), us, tiny shapes; Triton "
              "launches replaced by no-ops (launch cost and device time not included):")
        print(table(host, list(host[0])))
        rows = dict(parity=rows, host_path=host)
    dump_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
