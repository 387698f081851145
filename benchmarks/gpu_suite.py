"""Every speed question in one short GPU window: device ceilings, attention backends, the precision q-error table,
a profile of the eager DiT-XL/2 step, and the step matrix (formulation x precision x kernels x compile x batch).

    python benchmarks/gpu_suite.py --out suite/ [--total-s 510] [--cap-matrix 360] [--stages ceilings matrix ...]

Each stage runs in a child process under its own time cap (killed when it passes it) and writes OUT/<stage>.json
atomically, partial results included, before the next stage starts; a stage that fails or times out records why
and the suite goes on. Each stage's table is printed when it ends, and a Markdown summary table last (all of it
also in OUT/summary.md; each child's output in OUT/<stage>.log). Stages run in this order, each capped at its
--cap-<stage> and at what is left of --total-s (default caps in seconds):

  ceilings   30  copy GB/s (1 GiB device to device); GEMM TFLOP/s at 8192^3 in bf16, TF32 and fp32
  attention  45  forward and forward + backward ms of SDPA with each backend forced, and of flash-attn when
                 installed, bf16, at the three call shapes of an XL/2 step at batch 32 (16 heads of 72, 256 tokens)
  precision  90  benchmarks/precision.py's q-error table in real bf16 (XL/2 at the depth it uses on CUDA)
  profile    75  torch.profiler over the eager XL/2 step at batch 32 (precision auto): GPU-busy %, kernels per
                 step, device ms by kernel category, host ms per step
  kernels    60  each Triton op (the registration a CUDA model uses: triton_op, which inductor traces into) under
                 torch.compile vs the same op run eagerly: max abs difference of outputs and gradients (a
                 correctness check of the compiled path, which only CUDA can run); and fwd+bwd ms of
                 torch.compile of the eager twin, the Triton op, and the Triton op compiled, bf16, at the model's
                 width and the first batch x its tokens (the GEMM-fused ops among them)
  matrix    360  step ms, images/s and MFU of the three-call step for every precision mode x kernels (eager,
                 triton, auto) x compile (none, blocks, model, step; on CUDA also model+graphs and step+graphs:
                 CUDA graph trees, mode "reduce-overhead") x batch (32, 64), and of the reference's six-call
                 step in fp32 + TF32, measured round-robin; most wanted first, what does not fit is recorded as
                 skipped; a warm-up (compile) past --warmup-cap-s is abandoned

Without CUDA the stages that need it report "skipped: no CUDA" (ceilings and precision run on the CPU). --tiny
runs every stage at tiny shapes on any device; tests/test_gpu_suite.py runs it on a CPU with the clock stubbed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # --tiny's Triton variants on a CPU; before triton is imported

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernels as kernel_bench  # noqa: E402  (benchmarks/kernels.py: the op cases)
import precision as precision_bench  # noqa: E402  (benchmarks/precision.py)
import reference_math  # noqa: E402  (the reference's six-call step, as benchmarks/step.py times it)

from soflow_fast.attention import SUITE_LABELS, attention_fn, flash_attn_problem, resolve_attention  # noqa: E402
from soflow_fast.config import load_config  # noqa: E402
from soflow_fast.fileio import atomic_open  # noqa: E402
from soflow_fast.kernel_ops import kernel_ops_for, resolve_kernels  # noqa: E402
from soflow_fast.models.dit import DiT, DiTConfig  # noqa: E402
from soflow_fast.parallel import compile_backend, parallelize  # noqa: E402
from soflow_fast.precision import AUTO_CUDA, MODES, numerics, resolve_precision  # noqa: E402
from soflow_fast.step import compiled_loss, draw_noise, soflow_loss  # noqa: E402
from soflow_fast.metrics import peak_flops  # noqa: E402

RECIPE = ROOT / "configs" / "imagenet.yaml"  # the step's hyper-parameters and AdamW settings
RESERVE_S = 5.0  # kept back from --total-s for the summary


# -- shapes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    model: DiTConfig
    batches: tuple[int, ...]  # the first is the profile's and the attention stage's
    copy_mib: int
    gemm_n: int
    micro: tuple[int, int]  # (repetitions, calls per repetition) of a microbenchmark
    warmup: int
    reps: int  # step-matrix rounds; also the profile's timed steps
    profile_steps: int
    precision_argv: tuple[str, ...]
    tiny: bool = False  # every stage on any device, bf16 and TF32 GEMMs on a CPU included


FULL = Shapes(DiTConfig.from_size("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000), (32, 64),
              copy_mib=1024, gemm_n=8192, micro=(10, 5), warmup=2, reps=5, profile_steps=3, precision_argv=())
# A CPU runs only the ceilings and the precision table; XL/2 under the bf16 emulator would take many minutes.
CPU = dataclasses.replace(FULL, copy_mib=256, gemm_n=2048, micro=(3, 2), precision_argv=("--xl-depth", "0"))
TINY = Shapes(DiTConfig(input_size=4, in_channels=4, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                        num_classes=10), (4, 8), copy_mib=1, gemm_n=64, micro=(2, 1), warmup=1, reps=1,
              profile_steps=1, precision_argv=("--xl-depth", "0", "--rows", "4"), tiny=True)


# -- timing ---------------------------------------------------------------------------------------
class Timer:
    """Wall-clock seconds with the device queue drained around the timed calls. `clock` is the one time source
    (the CPU test replaces it)."""

    clock = staticmethod(time.perf_counter)

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = self.clock()
        fn()
        self.sync()
        return self.clock() - t0

    def issue(self, fn: Callable[[], object]) -> float:
        """Seconds until fn() returns while the device still works: the host's part of a step (a launch queue
        that fills up blocks the host, so this reaches the step time when the device is the bottleneck)."""
        self.sync()
        t0 = self.clock()
        fn()
        dt = self.clock() - t0
        self.sync()
        return dt

    def per_call(self, fn: Callable[[], object], reps: int, inner: int) -> float:
        """Median over reps of the mean of `inner` back-to-back calls (amortises the synchronisation)."""
        self.once(lambda: [fn() for _ in range(inner)])  # warm-up: allocations, autotuning, clocks
        return statistics.median(self.once(lambda: [fn() for _ in range(inner)]) / inner for _ in range(reps))


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after `seconds`: a compile that runs away must not take the stage."""
    def expire(signum, frame):
        raise TimeoutError(f"passed {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def tf32_matmuls(on: Optional[bool]):
    """TF32 for fp32 matmuls and convolutions on or off within (None: as they are); the flags restored after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if on is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def describe(e: BaseException) -> str:
    """An exception in one line (its first), for a table cell."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows])


# -- a stage's context ----------------------------------------------------------------------------
@dataclass
class Ctx:
    device: torch.device
    shapes: Shapes
    timer: Timer
    budget_s: float
    save: Callable[[dict], None]  # write the stage's partial result
    compile_estimate_s: float
    warmup_cap_s: float
    t0: float = dataclasses.field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


# -- (a) ceilings ---------------------------------------------------------------------------------
GEMMS = (("bf16", torch.bfloat16, False), ("TF32", torch.float32, True), ("fp32", torch.float32, False))


def copy_gb_s(ctx: Ctx) -> float:
    """GB/s of a device-to-device copy, bytes read + written."""
    src = torch.randn(ctx.shapes.copy_mib * 2**20 // 4, device=ctx.device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / ctx.timer.per_call(lambda: dst.copy_(src), *ctx.shapes.micro) / 1e9


def gemm_tflops(ctx: Ctx, dtype: torch.dtype, tf32: bool) -> float:
    n = ctx.shapes.gemm_n
    a, b, c = (torch.randn(n, n, device=ctx.device, dtype=dtype) for _ in range(3))
    with tf32_matmuls(tf32):
        return 2 * n**3 / ctx.timer.per_call(lambda: torch.matmul(a, b, out=c), *ctx.shapes.micro) / 1e12


def stage_ceilings(ctx: Ctx) -> dict:
    out = {"copy": {"MiB": ctx.shapes.copy_mib, "GB_s": copy_gb_s(ctx)}, "gemm": []}
    for label, dtype, tf32 in GEMMS:
        row = {"dtype": label, "n": ctx.shapes.gemm_n}
        if ctx.device.type != "cuda" and (dtype != torch.float32 or tf32) and not ctx.shapes.tiny:
            row["skipped"] = "no CUDA"  # a CPU's bf16 and TF32 say nothing of the GPU's
        else:
            row["TFLOP_s"] = gemm_tflops(ctx, dtype, tf32)
        out["gemm"].append(row)
        ctx.save(out)
    return out


def ceilings_table(r: dict) -> str:
    rows = [["copy", f"{fmt(r['copy']['GB_s'], 4)} GB/s ({r['copy']['MiB']} MiB)"]]
    rows += [[f"GEMM {g['dtype']} {g['n']}^3", g.get("skipped") or f"{fmt(g['TFLOP_s'], 4)} TFLOP/s"]
             for g in r["gemm"]]
    return table(["ceiling", "measured"], rows)


def ceilings_answer(r: dict) -> str:
    gemm = ", ".join(f"{g['dtype']} {fmt(g['TFLOP_s'], 4)}" for g in r["gemm"] if "TFLOP_s" in g)
    return f"copy {fmt(r['copy']['GB_s'], 4)} GB/s; GEMM TFLOP/s: {gemm or '-'}"


# -- the step bench (shared by the profile and the matrix) ----------------------------------------
THREE, SIX = "three-call", "six-call"


@dataclass(frozen=True)
class Variant:
    formulation: str
    precision: str
    kernels: str
    compile: str
    batch: int

    @property
    def name(self) -> str:
        return f"{self.formulation} {self.precision} {self.kernels}/{self.compile} B={self.batch}"


def share_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Point every parameter and buffer of dst at src's (same architecture): variants cost no weight memory and
    one optimizer steps them all."""
    source = dict(src.named_modules())
    for name, d in dst.named_modules():
        d._parameters.update(source[name]._parameters)
        d._buffers.update(source[name]._buffers)


def split_compile(compile: str) -> tuple[str, bool]:
    """A variant's compile ('none' | 'blocks' | 'model' | 'step', '+graphs' for CUDA graphs) -> (mode, graphs)."""
    mode, _, graphs = compile.partition("+")
    return mode, graphs == "graphs"


def compile_model(net: torch.nn.Module, compile: str, device: torch.device) -> torch.nn.Module:
    """The suite's one call of parallelize (one process: no wrapper); 'step' compiles the loss, not the net."""
    mode, graphs = split_compile(compile)
    return parallelize(net, "none", param_dtype=None, activation_checkpointing=False, compile=mode, device=device,
                       cuda_graphs=graphs)


class StepBench:
    """One set of DiT weights on the device with one AdamW, and a step closure (with its own inputs) per variant.
    A step = loss forward + backward + AdamW update, as in benchmarks/step.py."""

    def __init__(self, cfg: DiTConfig, device: torch.device):
        recipe = load_config(RECIPE)
        self.hp, self.flow, self.recipe, self.cfg, self.device = recipe.hparams, recipe.flow, recipe, cfg, device
        torch.manual_seed(0)
        with torch.device(device):  # initialised where it runs: seconds saved at XL/2 on the day
            self.base = DiT(cfg, device_type=device.type)
        self.opt = torch.optim.AdamW(self.base.parameters(), lr=recipe.learning_rate, betas=tuple(recipe.betas))
        self.nets = {("eager", "none"): self.base}
        self.gen = torch.Generator(device).manual_seed(0)
        self.guided = cfg.num_classes > 0 and self.hp.cfg_scale > 1

    def net(self, kernels: str, compile: str) -> torch.nn.Module:
        if (kernels, compile) not in self.nets:
            with torch.device("meta"):  # no second initialisation: the weights are the base's
                twin = DiT(dataclasses.replace(self.cfg, kernels=kernels), device_type=self.device.type)
            share_weights(twin, self.base)
            self.nets[kernels, compile] = compile_model(twin, compile, self.device)
        return self.nets[kernels, compile]

    def flops(self, batch: int) -> float:
        """Model FLOPs of one step as benchmarks/step.py counts them (the same for both formulations)."""
        return 2 * self.cfg.forward_macs() * self.hp.forward_equivalents(batch, self.guided)

    def step(self, v: Variant) -> Callable[[], None]:
        net, mode, hp, flow, dev = self.net(v.kernels, v.compile), MODES[v.precision], self.hp, self.flow, self.device
        x0 = torch.randn(v.batch, self.cfg.in_channels, self.cfg.input_size, self.cfg.input_size, device=dev)
        y = torch.randint(0, self.cfg.num_classes, (v.batch,), device=dev) if self.cfg.num_classes else None
        null = self.base.null_label
        net_ops = kernel_ops_for(v.kernels, dev.type)
        mode_c, graphs = split_compile(v.compile)
        loss_fn = compiled_loss(compile_backend(), graphs) if mode_c == "step" else soflow_loss

        def run() -> None:
            if graphs:  # a new step for CUDA graph trees: the last step's graph outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            noise = draw_noise(hp, x0, self.guided, self.gen)
            self.opt.zero_grad(set_to_none=True)
            with numerics(mode, dev):
                if v.formulation == SIX:
                    loss, _ = reference_math.six_call_step(net, flow.noising, flow.coefficient, hp, x0, y, noise, 0,
                                                           null)
                else:
                    loss = loss_fn(net, flow, hp, x0, y, noise, 0, null, kernel_ops=net_ops, precision=mode).loss
                loss.backward()
            self.opt.step()
        return run


# -- (b) profile ----------------------------------------------------------------------------------
# Kernel name -> category, first match wins: attention before GEMM (flash kernels are CUTLASS templates), the
# optimizer's multi-tensor kernels before elementwise. Without CUDA the aten ops stand in.
CATEGORIES = (
    ("attention", r"flash|fmha|attention|sdpa|mha"),
    ("optimizer", r"adam|multi_tensor_apply|foreach"),
    ("GEMM", r"gemm|gemv|cublas|cutlass|nvjet|xmma|wgmma|matmul|splitk|triton_tem|\bmm\b|addmm|bmm"),
    ("elementwise/norm", (r"elementwise|vectorized|unrolled|norm|reduce|softmax|triton|adaln|_fm_kernel"
                          r"|consistency|copy|fill|cat|index|gelu|silu|where|mul|add|sub|div|pow|exp|sum|mean"
                          r"|clamp|rand")),
)


def classify(kernel: str) -> str:
    low = kernel.lower()
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, low)), "other")


def profile_kernels(step: Callable[[], None], steps: int, timer: Timer) -> tuple[list[tuple[str, float]], str]:
    """(name, device us) of every kernel, memcpy and memset of `steps` steps, and what they are."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = timer.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
        timer.sync()  # the last kernels inside the window
    if cuda:
        kernels = [(e.name, e.time_range.end - e.time_range.start) for e in prof.events()
                   if e.device_type == DeviceType.CUDA]
        if not kernels:  # zeros would read as an idle GPU
            raise RuntimeError("the profiler recorded no CUDA kernels (is CUPTI usable here?)")
        return kernels, "CUDA kernels"
    return [(e.name, e.self_cpu_time_total) for e in prof.events() if e.name.startswith("aten::")], \
        "aten ops, self CPU time (no CUDA: a stand-in for kernels)"


def summarize_profile(kernels: list[tuple[str, float]], steps: int, wall_s: float, host_s: float) -> dict:
    by_cat = {cat: 0.0 for cat, _ in CATEGORIES} | {"other": 0.0}
    per_name: dict[str, list[float]] = {}
    for name, us in kernels:
        by_cat[classify(name)] += us / 1e3 / steps
        per_name.setdefault(name, []).append(us)
    device_ms = sum(by_cat.values())
    top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:10]
    launches = sum(not name.startswith(("Memcpy", "Memset")) for name, _ in kernels)
    return {"wall_ms_per_step": wall_s * 1e3, "host_ms_per_step": host_s * 1e3, "device_ms_per_step": device_ms,
            "gpu_busy_pct": 100 * device_ms / (wall_s * 1e3), "kernels_per_step": launches / steps,
            "device_ms_by_category": by_cat,
            "top_kernels": [{"name": n[:160], "category": classify(n), "ms_per_step": sum(t) / 1e3 / steps,
                             "calls_per_step": len(t) / steps} for n, t in top]}


def stage_profile(ctx: Ctx) -> dict:
    with tf32_matmuls(True):
        bench = StepBench(ctx.shapes.model, ctx.device)
        mode = resolve_precision("auto", ctx.device)
        B, reps = ctx.shapes.batches[0], ctx.shapes.reps
        step = bench.step(Variant(THREE, mode.name, "eager", "none", B))
        for _ in range(ctx.shapes.warmup + 1):
            step()
        wall = statistics.median(ctx.timer.once(step) for _ in range(reps))
        host = statistics.median(ctx.timer.issue(step) for _ in range(reps))
        out = {"batch": B, "precision": mode.name, "kernels": "eager", "compile": "none", "timed_steps": reps,
               "wall_ms_per_step": wall * 1e3, "host_ms_per_step": host * 1e3}
        ctx.save(out)  # kept should the profiler fail
        kernels, source = profile_kernels(step, ctx.shapes.profile_steps, ctx.timer)
    return {**out, "profiled_steps": ctx.shapes.profile_steps, "kernel_source": source,
            **summarize_profile(kernels, ctx.shapes.profile_steps, wall, host)}


def profile_table(r: dict) -> str:
    cats, total = r["device_ms_by_category"], max(r["device_ms_per_step"], 1e-12)
    return (table(["category", "device ms/step", "share of device time"],
                  [[c, ms, f"{100 * ms / total:.1f}%"] for c, ms in cats.items()]) + "\n\n"
            + table(["top kernel", "category", "ms/step", "calls/step"],
                    [[k["name"][:90], k["category"], k["ms_per_step"], k["calls_per_step"]] for k in r["top_kernels"]]))


def profile_answer(r: dict) -> str:
    head = (f"{r['precision']} B={r['batch']}: host {fmt(r['host_ms_per_step'])} of {fmt(r['wall_ms_per_step'])} "
            "ms/step")
    if "device_ms_by_category" not in r:
        return head
    cats = ", ".join(f"{c} {fmt(ms)}" for c, ms in r["device_ms_by_category"].items())
    return (f"{head}, GPU busy {fmt(r['gpu_busy_pct'])}%, {fmt(r['kernels_per_step'], 4)} kernels/step; "
            f"device ms: {cats}")


# -- (c) the step matrix --------------------------------------------------------------------------
def matrix_variants(impls: list[str], batches: tuple[int, ...], cuda: bool) -> list[Variant]:
    """Every variant, most wanted first: the default mode compiled as a model, as a step and (CUDA) as a step in CUDA
    graphs, the reference's six-call baseline, then the uncompiled variants (cheap), then the compiled ones (a
    compile costs minutes), default mode first."""
    modes = [AUTO_CUDA] + [m for m in MODES if m != AUTO_CUDA]
    compiles = ("model", "step") + (("step+graphs", "model+graphs") if cuda else ()) + ("blocks",)
    out = [Variant(THREE, AUTO_CUDA, "eager", c, batches[0]) for c in compiles[:3 if cuda else 2]]
    out += [Variant(SIX, "fp32", "eager", "none", batches[0])]
    for B in batches:
        out += [Variant(SIX, "fp32", "eager", "none", B)]
        out += [Variant(THREE, m, k, "none", B) for m in modes for k in impls]
    for B in batches:
        out += [Variant(THREE, m, k, c, B) for m in modes for c in compiles for k in impls]
    return list(dict.fromkeys(out))


class Planner:
    """Whether a variant still fits the stage's budget: its warm-up (a compile costing what the last one of its
    kind did, else the estimate) plus the measuring rounds of every variant admitted so far and of this one."""

    def __init__(self, ctx: Ctx, reps: int):
        self.ctx, self.reps = ctx, reps
        self.step_s: dict[Variant, float] = {}
        self.compile_s: dict[str, float] = {}
        self.timed_out: set[str] = set()  # compile kinds whose warm-up passed the cap: the next would too

    def warmup_steps(self, v: Variant) -> int:
        return self.ctx.shapes.warmup + (v.compile != "none")  # a compiled net recompiles on its second shapes

    def step_estimate(self, v: Variant) -> float:
        same = [s for u, s in self.step_s.items() if u.batch == v.batch]
        return max(same) if same else max((s * v.batch / u.batch for u, s in self.step_s.items()), default=1.0)

    def refusal(self, v: Variant) -> Optional[str]:
        """Why v is not started, or None."""
        if v.compile in self.timed_out:
            return f"skipped: a compile={v.compile} warm-up passed --warmup-cap-s"
        step = self.step_estimate(v)
        compile_s = 0.0 if v.compile == "none" else min(self.compile_s.get(v.compile, self.ctx.compile_estimate_s),
                                                        self.ctx.warmup_cap_s)
        need = compile_s + self.warmup_steps(v) * step + self.reps * (self.round_s() + step)
        return None if self.ctx.elapsed() + need <= self.ctx.budget_s else "skipped: stage cap"

    def round_s(self) -> float:
        return sum(self.step_s.values())

    def admit(self, v: Variant, warm: list[float]) -> None:
        self.step_s[v] = warm[-1]
        if v.compile != "none":
            self.compile_s[v.compile] = max(self.compile_s.get(v.compile, 0.0), warm[0] - warm[-1])

    def drop(self, v: Variant) -> None:
        self.step_s.pop(v, None)


def matrix_row(bench: StepBench, v: Variant, row: dict, six: Optional[dict]) -> dict:
    """The row with its figures from the measured step times (median)."""
    if not row.get("times_s"):
        return row
    sec = statistics.median(row["times_s"])
    peak = peak_flops(bench.recipe, bench.device, bf16=MODES[v.precision].any_bf16)
    flops = bench.flops(v.batch) / sec
    row.update(step_ms=sec * 1e3, images_s=v.batch / sec, model_TFLOP_s=flops / 1e12,
               mfu=None if peak is None else flops / peak)
    if six and six.get("times_s"):
        row["speedup_vs_six_call"] = statistics.median(six["times_s"]) / sec
    return row


def dynamo_limits() -> dict:
    """Raised recompile limits: each (mode, batch) is its own graph on a shared compiled net, and past the default
    limit dynamo would run the rest eagerly without a word. The names changed across torch releases."""
    limits = {}
    for names, value in ((("recompile_limit", "cache_size_limit"), 256),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 1024)):
        known = [n for n in names if hasattr(torch._dynamo.config, n)]
        limits.update({known[0]: value} if known else {})
    return limits


def matrix_result(bench: StepBench, rows: dict, kernels_auto: str, reps: int, done: int) -> dict:
    six = {v.batch: row for v, row in rows.items() if v.formulation == SIX}
    peaks = {"bf16": peak_flops(bench.recipe, bench.device, True),
             "fp32 (TF32)": peak_flops(bench.recipe, bench.device, False)}
    return {"kernels_auto": kernels_auto, "reps": reps, "rounds_done": done,
            "peak_TFLOP_s": {k: None if p is None else p / 1e12 for k, p in peaks.items()},
            "flops_per_step": {B: bench.flops(B) for B in six},
            "rows": [matrix_row(bench, v, row, six.get(v.batch)) for v, row in rows.items()]}


def stage_matrix(ctx: Ctx) -> dict:
    requested = {k: resolve_kernels(k, ctx.device) for k in ("eager", "triton", "auto")}
    variants = matrix_variants(list(dict.fromkeys(requested.values())), ctx.shapes.batches,
                               ctx.device.type == "cuda")
    rows = {v: {**dataclasses.asdict(v), "name": v.name, "status": "pending"} for v in variants}
    reps, done, steps = ctx.shapes.reps, 0, {}
    with tf32_matmuls(True), torch._dynamo.config.patch(**dynamo_limits()):
        bench = StepBench(ctx.shapes.model, ctx.device)
        plan = Planner(ctx, reps)
        for v in variants:  # warm-ups (compiles) in order of priority, while they fit
            rows[v]["status"] = plan.refusal(v) or "warming up"
            if rows[v]["status"] == "warming up":
                step = warm_up(ctx, bench, v, plan, rows[v])
                steps.update({v: step} if step else {})
                ctx.save(matrix_result(bench, rows, requested["auto"], reps, done))
        while done < reps and steps and ctx.elapsed() + plan.round_s() <= ctx.budget_s:
            measure_round(ctx, steps, rows, plan, done)
            done += 1
            ctx.save(matrix_result(bench, rows, requested["auto"], reps, done))
    for row in rows.values():
        if row["status"] == "warmed":
            row["status"] = "measured" if row.get("times_s") else "skipped: no time left to measure"
    return matrix_result(bench, rows, requested["auto"], reps, done)


def warm_up(ctx: Ctx, bench: StepBench, v: Variant, plan: Planner, row: dict) -> Optional[Callable[[], None]]:
    """Build and warm up one variant (its compile happens here, under --warmup-cap-s); None when it failed."""
    print(f"warming up {v.name}", flush=True)
    try:
        with time_limit(ctx.warmup_cap_s):
            step = bench.step(v)
            row["warmup_s"] = [ctx.timer.once(step) for _ in range(plan.warmup_steps(v))]
    except Exception as e:  # noqa: BLE001 - one variant (OOM, a compile error, a timeout) must not end the stage
        row["status"] = f"error: {describe(e)}"
        if isinstance(e, TimeoutError) and v.compile != "none":
            plan.timed_out.add(v.compile)
        step = None
    else:
        row["status"] = "warmed"
        plan.admit(v, row["warmup_s"])
    free_memory(ctx.device)
    return step


def measure_round(ctx: Ctx, steps: dict, rows: dict, plan: Planner, r: int) -> None:
    """One step of every admitted variant, the starting point rotating, so that drift hits all alike."""
    order = list(steps)
    start = r % len(order) if order else 0
    for v in order[start:] + order[:start]:
        try:
            rows[v].setdefault("times_s", []).append(ctx.timer.once(steps[v]))
        except Exception as e:  # noqa: BLE001
            rows[v]["status"] = f"error while measuring: {describe(e)}"
            del steps[v]
            plan.drop(v)
            free_memory(ctx.device)


def matrix_table(r: dict) -> str:
    skipped = [m["name"] for m in r["rows"] if m["status"].startswith("skipped")]
    rows = [[m["name"], m["status"], m.get("step_ms"), m.get("images_s"), m.get("model_TFLOP_s"), m.get("mfu"),
             m.get("speedup_vs_six_call"), sum(m.get("warmup_s") or [0.0])]
            for m in r["rows"] if not m["status"].startswith("skipped")]
    return (table(["variant", "status", "step ms", "images/s", "model TFLOP/s", "MFU", "speed-up vs six-call",
                   "warm-up s"], rows)
            + f"\n\nkernels auto = {r['kernels_auto']} here: its rows are the {r['kernels_auto']} rows. "
            f"{r['rounds_done']} of {r['reps']} round-robin rounds measured; step ms = median."
            + (f"\n\nskipped ({len(skipped)}): {', '.join(skipped)}" if skipped else ""))


def matrix_answer(r: dict) -> str:
    rows = r["rows"]
    counts = ", ".join(f"{sum(m['status'].startswith(s) for m in rows)} {s}" for s in ("measured", "skipped", "error"))
    first = next((m for m in rows if "step_ms" in m and m["formulation"] == THREE), None)
    if first is None:
        return counts
    ratio = (f", {fmt(first['speedup_vs_six_call'])}x the six-call fp32's speed"
             if "speedup_vs_six_call" in first else "")
    return f"{counts}; {first['name']}: {fmt(first['step_ms'])} ms{ratio}"


# -- (d) attention --------------------------------------------------------------------------------
def call_shapes(hp, batch: int) -> list[tuple[str, int]]:
    """Rows of the step's three network calls (soflow_fast.step): the guided teacher, x_l, the gradient call
    (which a mode with bf16 FM rows and an fp32 or secant pair runs as two calls, n_fm and n_c rows)."""
    n_fm, n_c = hp.split(batch)
    return [("teacher", n_fm + n_c * (2 if hp.mix_ratio != 1.0 else 1)), ("x_l", n_c), ("gradient", batch)]


def attention_impls(q: torch.Tensor) -> dict[str, Optional[Callable]]:
    """gpu_suite's label -> the callable the model's `attention` key resolves to (flash-attn: None if unusable)."""
    bf16 = q.dtype == torch.bfloat16
    return {label: None if name == "flash-attn" and flash_attn_problem(q.device, bf16, q.shape[-1]) else
            attention_fn(name) for label, name in SUITE_LABELS.items()}


def time_attention(ctx: Ctx, fn: Callable, rows: int, cfg: DiTConfig) -> dict:
    H, D, T = cfg.num_heads, cfg.hidden_size // cfg.num_heads, (cfg.input_size // cfg.patch_size) ** 2
    q, k, v = (torch.randn(rows, H, T, D, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(rows, H, T, D, device=ctx.device, dtype=torch.bfloat16)
    reps, inner = ctx.shapes.micro
    with torch.no_grad():
        fwd = ctx.timer.per_call(lambda: fn(q, k, v), reps, inner)
    both = ctx.timer.per_call(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout), reps, inner)
    return {"fwd_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3, "fwd_TFLOP_s": 4 * rows * H * T * T * D / fwd / 1e12}


def stage_attention(ctx: Ctx) -> dict:
    cfg = ctx.shapes.model
    hp, B = load_config(RECIPE).hparams, ctx.shapes.batches[0]
    probe = torch.empty(1, 1, 1, cfg.hidden_size // cfg.num_heads, device=ctx.device, dtype=torch.bfloat16)
    out = {"batch": B, "heads": cfg.num_heads, "head_dim": cfg.hidden_size // cfg.num_heads,
           "tokens": (cfg.input_size // cfg.patch_size) ** 2, "rows": [],
           "model_uses": resolve_attention("auto", ctx.device, bf16=True, head_dim=probe.shape[-1]).describe()}
    for call, rows in call_shapes(hp, B):
        for impl, fn in attention_impls(probe).items():
            row = {"call": call, "rows": rows, "impl": impl}
            if fn is None:
                row["skipped"] = "flash-attn not importable (or not usable for these tensors)"
            elif ctx.elapsed() > ctx.budget_s:
                row["skipped"] = "stage cap"
            else:
                try:
                    row.update(time_attention(ctx, fn, rows, cfg))
                except Exception as e:  # noqa: BLE001 - a backend that cannot run this shape is a finding
                    row["error"] = describe(e)
            out["rows"].append(row)
            ctx.save(out)
    return out


def attention_table(r: dict) -> str:
    return table(["call (rows)", "impl", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s", "note"],
                 [[f"{a['call']} ({a['rows']})", a["impl"], a.get("fwd_ms"), a.get("fwd_bwd_ms"),
                   a.get("fwd_TFLOP_s"), a.get("error") or a.get("skipped") or ""] for a in r["rows"]])


def attention_answer(r: dict) -> str:
    timed = [a for a in r["rows"] if "fwd_bwd_ms" in a and a["call"] == "gradient"]
    best = min(timed, key=lambda a: a["fwd_bwd_ms"], default=None)
    fastest = "" if best is None else (f"gradient call ({best['rows']} rows): fastest fwd+bwd {best['impl']} "
                                       f"{fmt(best['fwd_bwd_ms'])} ms; ")
    return f"{fastest}the model uses {r['model_uses']}"


# -- (e) precision --------------------------------------------------------------------------------
def stage_precision(ctx: Ctx) -> dict:
    with tempfile.TemporaryDirectory() as tmp, tf32_matmuls(None):  # precision.py sets the flags per mode
        path = Path(tmp) / "precision.json"
        precision_bench.main([*ctx.shapes.precision_argv, "--json", str(path)])
        got = json.loads(path.read_text())
    return {"argv": list(ctx.shapes.precision_argv), "device": got["device"], "rows": got["rows"],
            "table": precision_bench.table(got["rows"], got["device"])}


def precision_answer(r: dict) -> str:
    """The q errors of the last model measured (XL/2 on a GPU) at the smallest l ratio."""
    rows = r["rows"]
    model, r_min = rows[-1]["model"], min(x["r"] for x in rows)
    errs = ", ".join(f"{x['mode']} {100 * x['q_rel_error']:.3g}%" for x in rows
                     if x["model"] == model and x["r"] == r_min)
    return f"{model}, r = {r_min}: q error {errs}"


# -- (f) kernels ----------------------------------------------------------------------------------
def kernel_case(name: str, ctx: Ctx) -> tuple:
    """(inputs, eager twin, Triton op for this device's models, how many inputs get gradients)."""
    cfg, B, dev = ctx.shapes.model, ctx.shapes.batches[0], ctx.device
    T = (cfg.input_size // cfg.patch_size) ** 2
    if name in kernel_bench.LOSSES:
        inputs, eager, fast, _, _ = kernel_bench.loss_case(name, B, torch.bfloat16, dev,
                                                           latent=(cfg.in_channels, cfg.input_size, cfg.input_size))
        return inputs, eager, fast, kernel_bench.GRAD_ARGS[name]
    build = kernel_bench.linear_case if name in kernel_bench.LINEAR else kernel_bench.adaln_case
    inputs, eager, fast, _, _ = build(name, B, cfg.hidden_size, torch.bfloat16, dev, T=T)
    return inputs, eager, fast, len(inputs)


def max_abs_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(kernel_bench.as_tuple(a),
                                                                          kernel_bench.as_tuple(b)))


def stage_kernels(ctx: Ctx) -> dict:
    out = {"dtype": "bfloat16", "batch": ctx.shapes.batches[0], "width": ctx.shapes.model.hidden_size, "rows": []}
    reps, inner = ctx.shapes.micro
    for name in kernel_bench.ADALN + kernel_bench.LINEAR + kernel_bench.LOSSES:
        row = {"op": name}
        out["rows"].append(row)
        if ctx.elapsed() > ctx.budget_s:
            row["skipped"] = "stage cap"
            continue
        try:
            inputs, eager, fast, n_grad = kernel_case(name, ctx)
            compiled_fast = torch.compile(fast, dynamic=False)
            ref = kernel_bench.fwd_bwd(fast, inputs, n_grad)
            got = kernel_bench.fwd_bwd(compiled_fast, inputs, n_grad)
            row["compiled_vs_eager_err"] = max(max_abs_diff(fast(*inputs), compiled_fast(*inputs)),
                                               max_abs_diff(ref(), got()))
            row["triton_vs_twin_err"] = max_abs_diff(fast(*inputs), eager(*inputs))
            for label, fn in (("compile_twin_ms", torch.compile(eager, dynamic=False)), ("triton_ms", fast),
                              ("compile_triton_ms", compiled_fast)):
                row[label] = 1e3 * ctx.timer.per_call(kernel_bench.fwd_bwd(fn, inputs, n_grad), reps, inner)
        except Exception as e:  # noqa: BLE001 - one op that fails (a compile error is a finding) must not end it
            row["error"] = describe(e)
        ctx.save(out)
    return out


def kernels_table(r: dict) -> str:
    return table(["op", "compiled vs eager (max abs)", "Triton vs twin", "compile(twin) ms", "Triton ms",
                  "compile(Triton) ms", "note"],
                 [[k["op"], k.get("compiled_vs_eager_err"), k.get("triton_vs_twin_err"), k.get("compile_twin_ms"),
                   k.get("triton_ms"), k.get("compile_triton_ms"), k.get("error") or k.get("skipped") or ""]
                  for k in r["rows"]])


def kernels_answer(r: dict) -> str:
    timed = [k for k in r["rows"] if "triton_ms" in k]
    wins = [k["op"] for k in timed if min(k["triton_ms"], k["compile_triton_ms"]) < k["compile_twin_ms"]]
    worst = max((k["compiled_vs_eager_err"] for k in timed), default=None)
    return (f"{len(timed)} ops timed (fwd+bwd, bf16); Triton faster than compile(twin): {', '.join(wins) or 'none'}; "
            f"compiled vs eager Triton max abs diff {fmt(worst)}")


# -- stages, their documents and their tables -----------------------------------------------------
@dataclass(frozen=True)
class Stage:
    run: Callable[[Ctx], dict]
    table: Callable[[dict], str]  # the stage's table, from its (possibly partial) result
    answer: Callable[[dict], str]  # its line in the summary
    cap_s: float
    needs_cuda: bool


STAGES = {
    "ceilings": Stage(stage_ceilings, ceilings_table, ceilings_answer, 30, needs_cuda=False),
    "attention": Stage(stage_attention, attention_table, attention_answer, 45, needs_cuda=True),
    "precision": Stage(stage_precision, lambda r: r["table"], precision_answer, 90, needs_cuda=False),
    "profile": Stage(stage_profile, profile_table, profile_answer, 75, needs_cuda=True),
    "kernels": Stage(stage_kernels, kernels_table, kernels_answer, 60, needs_cuda=True),
    "matrix": Stage(stage_matrix, matrix_table, matrix_answer, 360, needs_cuda=True),
}


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}


def write_json(path: Path, doc: dict) -> None:
    with atomic_open(path, "w") as fh:
        json.dump(doc, fh, indent=1, default=str)


def new_doc(name: str, device: torch.device, cap_s: float) -> dict:
    return {"stage": name, "status": "running", **environment(device), "cap_s": round(cap_s, 1), "result": {}}


def run_stage(name: str, args: argparse.Namespace, device: torch.device, budget_s: float) -> dict:
    """Run one stage here, writing its JSON at the start, at each partial result and at the end."""
    path, doc, t0 = Path(args.out) / f"{name}.json", new_doc(name, device, budget_s), time.monotonic()

    def save(result: dict, status: str = "running") -> None:
        doc.update(result=result, status=status, elapsed_s=round(time.monotonic() - t0, 1))
        write_json(path, doc)

    save({})
    ctx = Ctx(device, shapes_for(args, device), Timer(device), budget_s, save, args.compile_estimate_s,
              args.warmup_cap_s)
    try:
        save(STAGES[name].run(ctx), "ok")
    except Exception as e:  # noqa: BLE001 - recorded; the suite goes on
        doc.update(error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:])
        save(doc["result"], "error")
    return doc


def run_isolated(name: str, argv: list[str], out: Path, device: torch.device, cap_s: float) -> dict:
    """Run one stage in a child process killed at cap_s; its JSON, finished by what the parent saw."""
    path, log = out / f"{name}.json", out / f"{name}.log"
    path.unlink(missing_ok=True)  # a stale file from an earlier run must not pass for this one
    # The child stops starting work a little before the kill, so that its last save lands.
    deadline = time.time() + cap_s - min(5.0, 0.1 * cap_s)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--stage", name, "--deadline", str(deadline)]
    t0 = time.monotonic()
    with open(log, "w") as fh:
        child = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = child.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # its whole group: inductor's compile workers too
            child.wait()
            rc = None
    doc = json.loads(path.read_text()) if path.exists() else new_doc(name, device, cap_s)
    doc["elapsed_s"] = round(time.monotonic() - t0, 1)
    if rc is None:
        doc.update(status="timeout", error=f"killed at the stage cap of {cap_s:.0f} s; log tail: {tail(log)}")
    elif doc["status"] == "running":
        doc.update(status="error", error=f"the child exited with code {rc}; log tail: {tail(log)}")
    write_json(path, doc)
    return doc


def tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def shapes_for(args: argparse.Namespace, device: torch.device) -> Shapes:
    shapes = TINY if args.tiny else FULL if device.type == "cuda" else CPU
    given = {k: v for k, v in (("batches", tuple(args.batches or ())), ("warmup", args.warmup), ("reps", args.reps))
             if v}
    return dataclasses.replace(shapes, **given) if given else shapes


def detail(doc: dict) -> str:
    """The stage's own table ('' without a result)."""
    r = doc.get("result")
    return safely(STAGES[doc["stage"]].table, r, doc["stage"]) if r else ""


def headline(doc: dict) -> str:
    """The stage's answer in one line, and why it failed or was skipped."""
    r, why = doc.get("result"), (doc.get("error") or doc.get("reason") or "")[:200]
    return "; ".join(x for x in (safely(STAGES[doc["stage"]].answer, r, doc["stage"]) if r else "", why) if x)


def safely(fn: Callable[[dict], str], result: dict, stage: str) -> str:
    """fn(result), or why not: a partial result the tables did not expect must not stop the suite."""
    try:
        return fn(result)
    except Exception as e:  # noqa: BLE001
        return f"(not printable: {describe(e)}; see {stage}.json)"


def summary(docs: list[dict]) -> str:
    return table(["stage", "status", "s", "answer"],
                 [[d["stage"], d["status"], d.get("elapsed_s"), headline(d).replace("|", "/")] for d in docs])


def report(docs: list[dict], out: Path, final: bool) -> None:
    """OUT/summary.md: every stage's table so far, and the summary at the end."""
    text = "\n\n".join(f"## {d['stage']} ({d['status']})\n\n{detail(d)}" for d in docs)
    text += "\n\n## summary\n\n" + summary(docs) if final else ""
    with atomic_open(out / "summary.md", "w") as fh:
        fh.write(text + "\n")


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_suite_out", help="folder for <stage>.json, <stage>.log, summary.md")
    ap.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    ap.add_argument("--total-s", type=float, default=510.0, help="the whole suite's time budget")
    for name, stage in STAGES.items():
        ap.add_argument(f"--cap-{name}", type=float, default=stage.cap_s, help=f"seconds (default {stage.cap_s})")
    ap.add_argument("--compile-estimate-s", type=float, default=120.0,
                    help="matrix: a compile's cost before one of its kind has been seen")
    ap.add_argument("--warmup-cap-s", type=float, default=150.0, help="matrix: one variant's warm-up (compile) cap")
    ap.add_argument("--batches", type=int, nargs="+", help="matrix batches (default 32 64)")
    ap.add_argument("--warmup", type=int, help="warm-up steps per variant (default 2)")
    ap.add_argument("--reps", type=int, help="measured steps per variant, round-robin (default 5)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, every stage on any device (the CPU test)")
    ap.add_argument("--in-process", action="store_true", help="no child processes (no hard caps)")
    ap.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # a child: run this stage only
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # a child's, in time.time() seconds
    return ap.parse_args(argv)


def run_one(name: str, args: argparse.Namespace, argv: list[str], device: torch.device, deadline: float) -> dict:
    out, cap = Path(args.out), min(getattr(args, f"cap_{name}"), deadline - time.monotonic() - RESERVE_S)
    if STAGES[name].needs_cuda and device.type != "cuda" and not args.tiny:
        doc = {**new_doc(name, device, 0), "status": "skipped", "reason": "skipped: no CUDA"}
    elif cap <= 0:
        doc = {**new_doc(name, device, 0), "status": "skipped", "reason": "skipped: --total-s spent"}
    elif args.in_process:
        return run_stage(name, args, device, cap)
    else:
        return run_isolated(name, argv, out, device, cap)
    write_json(out / f"{name}.json", doc)
    return doc


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.stage:
        run_stage(args.stage, args, device, args.deadline - time.time())
        return 0
    deadline, out, docs = time.monotonic() + args.total_s, Path(args.out), []
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_suite: {environment(device)}; stages {args.stages}; out {out}", flush=True)
    for name in args.stages:
        try:
            doc = run_one(name, args, argv, device, deadline)
        except Exception as e:  # noqa: BLE001 - the suite itself must not stop (e.g. an unreadable child JSON)
            doc = {**new_doc(name, device, 0), "status": "error", "error": f"suite: {type(e).__name__}: {e}"}
            write_json(out / f"{name}.json", doc)
        docs.append(doc)
        print(f"\n## {name} ({doc['status']}, {fmt(doc.get('elapsed_s'))} s)\n\n{detail(doc)}", flush=True)
        report(docs, out, final=False)
    report(docs, out, final=True)
    print("\n## summary (" + environment(device)["device"] + ")\n\n" + summary(docs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
