"""Training-step throughput: the three-call step vs the reference's six-call formulation, on this device.

    python benchmarks/step.py configs/digits.yaml [--batch-size N] [--steps 10] [--warmup 3] [--set key=value]
    python benchmarks/step.py configs/imagenet.yaml --host-path [--steps 30] [--compiled] [--set model_type=DiT-XL-2]
    python benchmarks/step.py configs/imagenet.yaml --profile-steps 3 5 [--memory-snapshot] [--profile-dir DIR]

A step = loss forward + backward + AdamW update. Model FLOPs are counted as docs/algorithm.md section 8 (forward
MACs x 2 x
forward-equivalents per step, the same count for both formulations, so the FLOP/s ratio is the speed ratio). On CPU
the same run measures this machine's fp32 matmul rate and prints each step's fraction of it.

--host-path (any machine, CPU): the host time of a three-call step (loss forward + backward) for kernels eager and
triton, on the config's DiT with its depth and op count but width 32, 4 tokens and batch 8, so that compute is
negligible;
the Triton launches are recorded instead of run (benchmarks/kernels.py), so the launch itself is not counted.
--compiled adds the eager-kernel network compiled whole (compile 'model') and the whole loss compiled as one graph
(compile 'step'), inductor unless SOFLOW_COMPILE_BACKEND says otherwise (minutes to compile at XL/2's depth 28 on a
CPU, so it is opt-in), timed in the same alternation.

--profile-steps START END: after the table, three-call steps 1..END run again, START..END under torch.profiler
(soflow_fast/profiling.py: a chrome trace per window in --profile-dir, default ./profile); --memory-snapshot adds a
CUDA memory snapshot of the same steps (refused on a CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import reference_math  # noqa: E402  (the six-call transcription the parity tests use)

from soflow_fast.config import PROFILE_WINDOW, load_config, parse_override  # noqa: E402
from soflow_fast.errors import UserError  # noqa: E402
from soflow_fast.profiling import ProfileWindow  # noqa: E402
from soflow_fast.models import DIT_SIZES, UNET_SIZES, build_model, canonical_size  # noqa: E402
from soflow_fast.step import compiled_loss, draw_noise, soflow_loss  # noqa: E402
from soflow_fast.parallel import compile_backend, parallelize, resolve_device  # noqa: E402
from soflow_fast.precision import numerics, region, resolve_precision  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds of fn() over `steps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rate(device: torch.device, n: int = 1024, reps: int = 10) -> float:
    """fp32 FLOP/s of an n x n x n matmul on this device (median of reps)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n ** 3 / time_steps(lambda: a @ b, reps, 2, device)


def host_path(cfg, in_ch: int, classes: int, steps: int, compiled: bool) -> None:
    """Print the median host ms per three-call step, eager vs Triton ops and (compiled) the compiled network (see the
    module doc); their steps alternate, so drift on a shared machine hits all alike."""
    import kernels as kernel_bench  # benchmarks/kernels.py: the launch recorder

    hp, flow, B = cfg.hparams, cfg.flow, 8  # the op count does not depend on the batch; compute should not count
    runs = {}
    for impl in ("eager", "triton") + (("compiled", "compiled step") if compiled else ()):
        torch.manual_seed(cfg.seed)
        if cfg.model_type in UNET_SIZES:
            raise ValueError(f"--host-path: model_type {cfg.model_type}: only DiT models have the adaLN ops")
        patch = cfg.patch_size or DIT_SIZES[canonical_size(cfg.model_type)][0]
        model = build_model(cfg.model_type, input_size=2 * patch, in_channels=in_ch, num_classes=classes,
                            null_class=cfg.cfg_drop_rate > 0, kernels="triton" if impl == "triton" else "eager",
                            hidden_size=32, num_heads=2, **({"depth": cfg.depth} if cfg.depth else {}))
        if impl == "compiled":
            model = parallelize(model, "none", param_dtype=None, activation_checkpointing=False, compile="model",
                                device=torch.device("cpu"))
        loss_fn = compiled_loss(compile_backend()) if impl == "compiled step" else soflow_loss
        x0 = torch.randn(B, in_ch, 2 * patch, 2 * patch)
        y = torch.randint(0, classes, (B,)) if classes else None
        guided = y is not None and hp.cfg_scale > 1
        gen = torch.Generator().manual_seed(0)

        def step(model=model, impl=impl, y=y, guided=guided, gen=gen, x0=x0, loss_fn=loss_fn):
            with kernel_bench.launches_stubbed() if impl == "triton" else contextlib.nullcontext():
                noise = draw_noise(hp, x0, guided, gen)
                loss_fn(model, flow, hp, x0, y, noise, 0, model.null_label,
                        kernel_ops=model.kernel_ops).loss.backward()
        runs[impl] = (step, [], len(model.blocks))
    for i in range(steps + 3):  # the first calls compile (compiled), so three warm-up rounds
        for step, times, _ in runs.values():
            t0 = time.perf_counter()
            step()
            if i >= 3:
                times.append(time.perf_counter() - t0)
    if compiled:
        print(f"compiled: {compile_backend()} on CPU; compiled = compile model (the network), compiled step = compile "
              "step (the whole loss, soflow_fast.step.compiled_loss)")
    print(f"host time per three-call step (loss forward + backward), {cfg.model_type} depth {runs['eager'][2]} "
          "at width "
          f"32 and 4 tokens, batch {B}, CPU {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; Triton launches recorded, not run; median of {steps} alternating steps")
    print("| kernels | host ms per step | vs eager |")  # compiled rows: eager kernels
    print("|---|---|---|")
    base = statistics.median(runs["eager"][1])
    for impl, (_, times, _) in runs.items():
        print(f"| {impl} | {statistics.median(times) * 1e3:.1f} | {statistics.median(times) / base:.2f}x |")
    for impl in ("compiled", "compiled step") if compiled else ():
        print(f"host time eager / {impl}: {base / statistics.median(runs[impl][1]):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--batch-size", type=int, help="override the config's batch_size")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--host-path", action="store_true", help="host time per step, eager vs Triton ops (CPU)")
    ap.add_argument("--compiled", action="store_true", help="--host-path: also compile model and step")
    ap.add_argument("--profile-steps", type=int, nargs=2, default=[], metavar=("START", "END"),
                    help="profile three-call steps START..END (inclusive, from 1) after the table")
    ap.add_argument("--memory-snapshot", action="store_true", help="with --profile-steps: a CUDA memory snapshot")
    ap.add_argument("--profile-dir", default="profile", help="where the trace and snapshot go (default ./profile)")
    args = ap.parse_args()
    if not PROFILE_WINDOW.ok(args.profile_steps):
        ap.error(f"--profile-steps {args.profile_steps}: {PROFILE_WINDOW.why}")
    if args.memory_snapshot and not args.profile_steps:
        ap.error("--memory-snapshot: the snapshot covers the --profile-steps window; give it too")
    overrides = dict(parse_override(s) for s in args.set)
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    cfg = load_config(args.config, overrides)
    device = resolve_device(cfg.device)
    try:  # before the timing: a refused --memory-snapshot fails at once
        window = ProfileWindow(args.profile_steps, args.memory_snapshot, Path(args.profile_dir), device,
                               snapshot_name="--memory-snapshot")
    except UserError as e:
        ap.error(str(e))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    mode = resolve_precision(cfg.precision, device)
    in_ch = {"digits": 1, "Imagenet": 4, "CIFAR10": 3}[cfg.dataset_type]
    classes = cfg.num_classes if cfg.num_classes is not None else {"digits": 10, "Imagenet": 1000, "CIFAR10": 0}[
        cfg.dataset_type]
    if args.host_path:
        torch.set_num_threads(1)
        host_path(cfg, in_ch, classes, args.steps, args.compiled)
        return
    over = {k: getattr(cfg, k) for k in ("hidden_size", "depth", "num_heads", "patch_size") if getattr(cfg, k)}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model_type, input_size=cfg.data_size, in_channels=in_ch, num_classes=classes,
                        null_class=cfg.cfg_drop_rate > 0, kernels=cfg.kernels, device=device, **over)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=tuple(cfg.betas))
    hp, flow, B = cfg.hparams, cfg.flow, cfg.batch_size
    x0 = torch.randn(B, in_ch, cfg.data_size, cfg.data_size, device=device)
    y = torch.randint(0, classes, (B,), device=device) if classes else None
    guided = y is not None and hp.cfg_scale > 1
    gen = torch.Generator(device).manual_seed(0)
    kernel_ops = model.kernel_ops

    def three_call():
        noise = draw_noise(hp, x0, guided, gen)
        opt.zero_grad(set_to_none=True)
        with numerics(mode, device):
            soflow_loss(model, flow, hp, x0, y, noise, 0, model.null_label, kernel_ops=kernel_ops,
                        precision=mode).loss.backward()
        opt.step()

    def six_call():  # the reference's formulation, every call under the mode's widest bf16 region
        noise = draw_noise(hp, x0, guided, gen)
        opt.zero_grad(set_to_none=True)
        with numerics(mode, device):
            with region(mode, mode.any_bf16, device.type):
                loss, _ = reference_math.six_call_step(model, flow.noising, flow.coefficient, hp, x0, y, noise, 0,
                                                       model.null_label)
            loss.backward()
        opt.step()

    flops = 2 * model.cfg.forward_macs() * hp.forward_equivalents(B, guided)
    rows = [(name, time_steps(fn, args.steps, args.warmup, device)) for name, fn in
            (("three-call (soflow_fast)", three_call), ("six-call (reference)", six_call))]
    peak = matmul_rate(device) if device.type == "cpu" else None
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"device: {name}; model {cfg.model_type} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
          f"batch {B}, precision {mode.name}, kernels {model.cfg.kernels}, "
          f"{hp.forward_equivalents(B, guided) / B:.2f} forward-equivalents/sample, {flops / 1e9:.2f} GFLOP/step")
    head = ("| formulation | step ms (median) | images/s | model TFLOP/s |"
            + (" fraction of fp32 matmul |" if peak else ""))
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for label, sec in rows:
        frac = f" {flops / sec / peak:.1%} |" if peak else ""
        print(f"| {label} | {sec * 1e3:.1f} | {B / sec:.1f} | {flops / sec / 1e12:.4f} |{frac}")
    print(f"speed-up of three-call over six-call: {rows[1][1] / rows[0][1]:.2f}x")
    if peak:
        print(f"fp32 matmul rate measured in this run (1024^3): {peak / 1e9:.1f} GFLOP/s")
    if args.profile_steps:
        last = args.profile_steps[1]
        for n in range(1, last + 1):
            window.begin(n)
            three_call()
            window.end(n, last=n == last)
        print("profile of three-call steps " + "-".join(map(str, args.profile_steps)) + ": "
              + ", ".join(map(str, window.written)))


if __name__ == "__main__":
    main()
