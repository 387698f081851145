"""Registers, spills and occupancy of each Triton kernel, compiled for a GPU target on any machine (no GPU needed).

Each op runs once on small CPU tensors with its launches recorded instead of run (benchmarks/kernels.py
launches_stubbed), so every kernel is compiled exactly as its launcher would launch it at that width: the same
constexprs, num_warps and argument dtypes, pointers and multiples of 16 specialised as a CUDA launch would. The
resources of the cubin Triton builds for the target (default sm_90, the H100) are read back with its bundled
cuobjdump. From the registers and shared memory: programs and warps resident per SM, the tile slots (BLOCK_T rows
x the columns a program holds) resident per SM, the fraction of them that is real data (the rest is masked
padding to powers of two), and so the real elements resident per SM.

Why it matters: Triton does not software-pipeline plain pointer loads (checked on this PTX: no cp.async in a
tl.range loop without a tl.dot; loads through tl.make_tensor_descriptor do get TMA stages), so a kernel that loops
over rows (the adaLN backward) has at most one tile per resident program in flight, and by Little's law the bytes
in flight per SM bound its bandwidth. The forward launches one short program per tile and the GPU overlaps many.

    python benchmarks/kernel_occupancy.py [--arch 90] [--widths 384 768 1024 1152] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

# Compile for the GPU target: the kernels must be decorated without the interpreter (this must precede the first
# import of triton and of soflow_fast.kernels; benchmarks/kernels.py would otherwise ask for the interpreter).
os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels as bench  # noqa: E402  (benchmarks/kernels.py: the cases and the launch recorder)

# Per-SM limits (CUDA occupancy tables): registers, warps, resident blocks, shared memory and its per-block reserve.
SM_LIMITS = {80: dict(regs=65536, warps=64, blocks=32, smem=167936, smem_reserved=1024),
             90: dict(regs=65536, warps=64, blocks=32, smem=233472, smem_reserved=1024)}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8",
                torch.bool: "i1", torch.int64: "i64"}


def recorded_launches(kernel: str, D: int, dtype: torch.dtype) -> list[tuple]:
    """(kernel name, args, kwargs) of every launch that the forward and backward of `kernel` make at width D."""
    if kernel in bench.ADALN:
        inputs, _, fast, _, _ = bench.adaln_case(kernel, 2, D, dtype, "cpu", T=4)
    else:
        inputs, _, fast, _, _ = bench.loss_case(kernel, 2, dtype, "cpu", latent=bench.LATENT)
    with bench.launches_stubbed() as record, torch.enable_grad():
        bench.fwd_bwd(fast, inputs, bench.GRAD_ARGS.get(kernel, len(inputs)))()
    return [(name, args, kwargs) for name, _, args, kwargs in record]


def compile_launch(name: str, args: tuple, kwargs: dict, arch: int):
    """Compile the recorded launch for sm_<arch>; the compiled kernel (its .asm['ptx'] and .metadata)."""
    fn = getattr(bench.adaln, name, None) or getattr(bench.soflow_loss, name)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    signature, attrs = {}, {}
    for i, (arg_name, v) in enumerate(zip(fn.arg_names, args)):
        if isinstance(v, torch.Tensor):
            signature[arg_name] = "*" + TRITON_DTYPE[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # fresh contiguous allocations are 16-byte aligned
        elif isinstance(v, bool):
            signature[arg_name] = "i1"
        elif isinstance(v, int):
            signature[arg_name] = "i32" if abs(v) < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg_name] = "fp32"
    src = ASTSource(fn=fn, signature=signature, constexprs=kwargs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(compiled) -> dict:
    """Registers per thread, local memory (spills, stack) bytes per thread and static shared memory of the cubin
    Triton built (its own ptxas run), read back with the bundled cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", out))
    return dict(registers=int(usage["REG"]), local_bytes=int(usage["LOCAL"]), static_shared=int(usage["SHARED"]))


def resident_programs(regs: int, warps: int, smem: int, arch: int) -> int:
    """Programs (thread blocks) of this kernel resident on one SM at once."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = (lim["regs"] // regs_per_warp) // warps
    by_smem = lim["smem"] // (smem + lim["smem_reserved"])
    return min(lim["blocks"], lim["warps"] // warps, by_regs, by_smem)


def occupancy_rows(widths: list[int], arch: int) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        cases = [(k, D) for k in bench.ADALN for D in widths] + [(k, None) for k in bench.LOSSES]
        for kernel, D in cases:
            for name, args, kwargs in recorded_launches(kernel, D or 8, dtype):
                kwargs = dict(kwargs)
                warps = kwargs.get("num_warps", 4)
                # Columns a program holds per row: an adaLN row padded to a power of two, or a loss block.
                tile_t = kwargs.get("BLOCK_T", 1)
                tile_d = kwargs.get("BLOCK_D", kwargs.get("BLOCK"))
                compiled = compile_launch(name, args, kwargs, arch)
                use = resource_usage(compiled)
                smem = compiled.metadata.shared + use["static_shared"]
                progs = resident_programs(use["registers"], warps, smem, arch)
                width = D if D is not None else bench.LATENT[0] * bench.LATENT[1] * bench.LATENT[2]
                rows.append(dict(op=kernel, kernel=name.strip("_"), D=width, dtype=str(dtype).replace("torch.", ""),
                                 BLOCK_T=tile_t, tile_columns=tile_d, warps=warps, registers=use["registers"],
                                 local_bytes=use["local_bytes"], shared_bytes=smem, programs_per_sm=progs,
                                 warps_per_sm=progs * warps, tile_slots_per_sm=progs * tile_t * tile_d,
                                 real_fraction=min(1.0, width / tile_d),
                                 real_elements_per_sm=progs * tile_t * min(width, tile_d)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS), help="compute capability x10")
    ap.add_argument("--widths", type=int, nargs="+", default=[384, 768, 1024, 1152], help="hidden sizes D")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    rows = occupancy_rows(args.widths, args.arch)
    print(f"Triton {triton.__version__}, compiled for sm_{args.arch} (no GPU involved). "
          f"Loss rows: one {'x'.join(map(str, bench.LATENT))} latent per program.")
    print(bench.table(rows, list(rows[0])))
    bench.dump_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
