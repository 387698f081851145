"""Precision modes: which network calls of a step run their GEMMs in bf16 (docs/precision.md).

The consistency quotient q = (f_t - f_l) / (t - l) divides the difference of two network outputs by a gap the l
schedule shrinks to 0.2% of t - s, so rounding that differs between the F_t and F_l calls is amplified by 1/(t - l).
A mode therefore says, per call of the step, whether it runs under bf16 autocast:

| mode         | teacher (call 1) | FM rows of the gradient call | consistency pair (F_t rows, F_l)  | skeleton |
|--------------|------------------|------------------------------|-----------------------------------|----------|
| fp32         | fp32             | fp32                         | fp32, two calls                   | fp32     |
| bf16         | bf16             | bf16                         | bf16, two calls                   | bf16     |
| bf16-split   | bf16             | bf16                         | fp32, two calls                   | fp32     |
| bf16-secant  | bf16             | bf16                         | bf16, F_l = F_t + dF (the secant) | fp32     |

"fp32" is TF32 on Ampere and newer GPUs (the reference's setting). The skeleton is the DiT's patch embedding, time
and label embedders, adaLN modulation and final layer: few FLOPs, and the place where t and l enter. On CUDA the
regions are torch.autocast regions (weight-cast cache off: see `region`); on a CPU a bf16 mode runs under the exact
emulator (soflow_fast.emulate), which reproduces the GPU's rounding in fp32.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from . import emulate

PRECISIONS = ("auto", "fp32", "bf16", "bf16-split", "bf16-secant")
# What `precision: auto` means on CUDA (docs/precision.md section 4: the measured choice); networks without the
# secant pair (the U-Net) get the split mode.
AUTO_CUDA, AUTO_CUDA_NO_SECANT = "bf16-secant", "bf16-split"


@dataclass(frozen=True)
class Precision:
    """A resolved mode: whether each part of a step runs its GEMMs in bf16."""

    name: str
    teacher_bf16: bool = False
    fm_bf16: bool = False
    pair_bf16: bool = False
    skeleton_bf16: bool = False
    secant: bool = False

    @property
    def any_bf16(self) -> bool:
        return self.teacher_bf16 or self.fm_bf16 or self.pair_bf16

    @property
    def fsdp_param_dtype(self):
        """FSDP2 gathers bf16 parameters only when every GEMM is bf16 anyway; otherwise fp32 (autocast casts)."""
        return torch.bfloat16 if self.skeleton_bf16 else None


MODES = {
    "fp32": Precision("fp32"),
    "bf16": Precision("bf16", teacher_bf16=True, fm_bf16=True, pair_bf16=True, skeleton_bf16=True),
    "bf16-split": Precision("bf16-split", teacher_bf16=True, fm_bf16=True),
    "bf16-secant": Precision("bf16-secant", teacher_bf16=True, fm_bf16=True, pair_bf16=True, secant=True),
}


def resolve_precision(name: str, device: torch.device | str, secant: bool = True) -> Precision:
    """'auto' -> the measured choice on CUDA, fp32 elsewhere; an explicit mode is taken as asked. `secant`: whether
    the network has the secant pair (the DiT does)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision: unknown value {name!r}; expected one of {list(PRECISIONS)}")
    if name == "auto":
        name = (AUTO_CUDA if secant else AUTO_CUDA_NO_SECANT) if torch.device(device).type == "cuda" else "fp32"
    mode = MODES[name]
    if mode.any_bf16 and torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision: {name!r} needs bf16, which this GPU does not support")
    return mode


def emulated(mode: Precision, device: torch.device | str) -> bool:
    """A bf16 mode on a CPU runs under the exact emulator (CPU bf16 is ~100x slower and rounds differently)."""
    return mode.any_bf16 and torch.device(device).type != "cuda"


@contextlib.contextmanager
def numerics(mode: Precision, device: torch.device | str) -> Iterator[None]:
    """Where a step (forward and backward) runs: the emulator for a bf16 mode on CPU, as is otherwise."""
    if emulated(mode, device) and emulate.active() is None:
        with emulate.BF16Emulator(tf32=True):
            yield
    else:
        yield


class _Local(threading.local):
    def __init__(self) -> None:  # set on the instance from the start: a compiled step guards on its __dict__
        self.skeleton_fp32 = False


_local = _Local()


@contextlib.contextmanager
def region(mode: Precision, bf16: bool, device_type: str) -> Iterator[None]:
    """Run the enclosed calls with bf16 autocast on (bf16=True) or off (an fp32 region inside an autocast one);
    inside a bf16 region, the model's `skeleton` parts run in fp32 unless the mode puts them in bf16.

    Under the emulator this switches the emulated autocast. On CUDA it is torch.autocast with the weight-cast cache
    disabled: with the cache, a no-grad call and a gradient call in one region share casts made without grad
    history, and the weights get no gradient (pytorch/pytorch#112583, fixed only in recent releases). Elsewhere
    without the emulator (fp32 on CPU) it does nothing.
    """
    before, _local.skeleton_fp32 = _local.skeleton_fp32, bf16 and not mode.skeleton_bf16
    try:
        with _autocast(bf16, device_type):
            yield
    finally:
        _local.skeleton_fp32 = before


@contextlib.contextmanager
def skeleton(device_type: str) -> Iterator[None]:
    """The model marks its skeleton (embedders, adaLN modulation, final layer) with this: fp32 inside the bf16
    region of a mode that keeps the skeleton in fp32, unchanged otherwise."""
    if _local.skeleton_fp32:
        with _autocast(False, device_type):
            yield
    else:
        yield


def _autocast(bf16: bool, device_type: str):
    if emulate.active() is not None:
        return emulate.autocast(bf16)
    if device_type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
    if bf16:
        raise RuntimeError("a bf16 region on a CPU runs under the emulator: wrap the step in precision.numerics()")
    return contextlib.nullcontext()
