"""What the kernel families share: when to run Triton, input checks, block shapes and launch sizes.

Triton runs on CUDA tensors, and on CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1). Triton
reads that variable when a kernel is decorated, so it is read here once, when the kernel modules are imported:
whoever wants the interpreter sets it before the first import of soflow_fast.kernels.* (the tests do).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple

import torch
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # the package imports without triton; the ops then always take the eager path
    HAVE_TRITON = False

# torch dtype <-> the small int the kernels branch on to emulate torch's rounding of intermediate products.
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def triton_runs_on(device_type: str) -> bool:
    """True when Triton kernels can run on tensors of this device type: CUDA, or CPU under the interpreter."""
    return HAVE_TRITON and (device_type == "cuda" or (device_type == "cpu" and INTERPRET))


def use_triton(t: Tensor) -> bool:
    """True when tensors like t run the Triton kernels (triton_runs_on their device, and not float64).

    float64 stays on the eager reference: the kernels compute in fp32, and fp64 callers are checking the math. This
    per-dtype rule is the only choice the public functions still make per call; the device is settled at build.
    """
    return t.dtype != torch.float64 and triton_runs_on(t.device.type)


class Registration(NamedTuple):
    """How a kernel family registers its ops with torch.library.

    custom_op: runs on any device, the interpreter's CPU included, and torch.compile sees an opaque call (its fake
    implementation gives the shapes). triton_op + wrap_triton: torch.compile traces into the op and inductor sees the
    Triton launches themselves (it can schedule them with the code around them); its tracing needs real Triton
    kernels on CUDA, so it is the CUDA registration. Both wrap the same launchers: `launch(kernel)[grid](...)`.
    """
    namespace: str
    define: Callable   # torch.library.custom_op or torch.library.triton_op
    launch: Callable   # kernel -> what is indexed by the grid and called
    fake: bool         # custom_op needs a fake implementation; triton_op traces its own body instead


CUSTOM = Registration("soflow", torch.library.custom_op, lambda kernel: kernel, fake=True)
INLINE = Registration("soflow_triton", torch.library.triton_op, lambda kernel: torch.library.wrap_triton(kernel),
                      fake=False)


def registration_for(device_type: str) -> Registration:
    """INLINE for CUDA models, CUSTOM for every other device (chosen once, when a model is built)."""
    return INLINE if device_type == "cuda" else CUSTOM


def dtype_code(dtype: torch.dtype, name: str) -> int:
    if dtype not in DTYPE_CODE:
        raise TypeError(f"{name}: unsupported dtype {dtype}; expected float32, bfloat16 or float16")
    return DTYPE_CODE[dtype]


def check_shape(t: Tensor, shape: tuple, name: str, op: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {list(t.shape)}, expected {list(shape)}")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def row_tile(D: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for kernels holding BLOCK_T whole rows of width D in registers."""
    block_d = next_pow2(D)
    block_t = max(1, min(16, 4096 // block_d))
    return block_t, block_d, 8 if block_t * block_d >= 4096 else 4


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs_target(t: Tensor) -> int:
    """How many programs a launch with a cross-row reduction should aim for: a few waves on the GPU."""
    if t.device.type == "cuda":
        return 4 * _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 2


def reduction_chunks(B: int, T: int, block_t: int, target: int) -> tuple[int, int]:
    """Split each sample's T rows into chunks (a multiple of block_t rows each) so that B * chunks ~ target.

    Returns (rows per chunk, chunks per sample). Each program reduces its chunk into one partial row; the partials
    [B, chunks, D] are summed afterwards (deterministic: no atomics).
    """
    per_sample = max(1, target // max(B, 1))
    rows = cdiv(cdiv(T, per_sample), block_t) * block_t
    return rows, cdiv(T, rows)
