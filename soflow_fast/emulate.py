"""Exact CPU emulation of how a CUDA GPU rounds under bf16 autocast and TF32 (docs/precision.md, section 2).

This CPU has no fast bf16 (a bf16 matmul runs ~100x slower than fp32), so the GPU's numerics are reproduced in fp32
with rounding placed where the GPU rounds:

- Autocast (a TorchFunctionMode, above autograd like torch.autocast itself): inside an enabled region, GEMM-class
  calls (linear, conv, matmul, bmm, scaled dot-product attention, ...) cast their floating inputs to bf16, and the
  ops CUDA autocast runs in fp32 (layer_norm, group_norm, softmax, sum, pow, exp, ...) cast bf16 inputs to fp32.
  The casts are real `.to()` calls, so autograd records them exactly as it records autocast's.
- bf16 hardware (a TorchDispatchMode, below autograd, so the backward is covered too): a GEMM-class aten op with a
  bf16 input runs on the fp32 upcast of its (bf16-rounded) inputs and rounds its outputs to bf16 once. That is what
  a tensor core does: bf16 x bf16 products are exact in fp32, accumulation is fp32, the output is rounded once; only
  the accumulation order differs. Other bf16 ops run natively on the CPU, which computes each in fp32 and rounds
  once, as CUDA's bf16 pointwise and reduction kernels do.
- TF32 (optional): fp32 GEMM inputs are rounded to TF32 (10 explicit mantissa bits, round to nearest even), as
  `torch.backends.cuda.matmul.allow_tf32` does on Ampere and newer. Attention in fp32 stays fp32.

Not emulated: flash attention's internal rounding of the probabilities to bf16 before P @ V (inputs and outputs of
attention are rounded), and fused kernels (Triton); both are GPU-side details measured on a GPU by
benchmarks/precision.py.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten

# Python-level calls CUDA autocast runs in bf16 (its "lower precision" list, restricted to what models here use).
AUTOCAST_BF16 = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                 F.conv_transpose3d, torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm, torch.bmm,
                 Tensor.bmm, torch.addmm, torch.baddbmm, torch.einsum, F.scaled_dot_product_attention}
# ... and the calls it runs in fp32 whatever their input dtype (its "fp32" list, same restriction).
AUTOCAST_FP32 = {F.layer_norm, F.group_norm, F.softmax, torch.softmax, Tensor.softmax, F.log_softmax,
                 torch.log_softmax, Tensor.log_softmax, torch.exp, Tensor.exp, torch.log, Tensor.log, torch.pow,
                 Tensor.pow, Tensor.__pow__, torch.sum, Tensor.sum, torch.rsqrt, Tensor.rsqrt, torch.cumsum,
                 Tensor.cumsum, torch.norm, Tensor.norm, F.softplus, F.mse_loss, torch.logsumexp, Tensor.logsumexp}

# aten ops a GPU runs on tensor cores; the value lists which outputs a bf16 run rounds to bf16 (None = all floating).
GEMM_OPS = {aten.mm.default: None, aten.addmm.default: None, aten.bmm.default: None, aten.baddbmm.default: None,
            aten.convolution.default: None, aten.convolution_backward.default: None,
            aten._scaled_dot_product_flash_attention_for_cpu.default: (0,),  # (out, logsumexp): lse stays fp32
            aten._scaled_dot_product_flash_attention_for_cpu_backward.default: None}
ATTENTION_OPS = {aten._scaled_dot_product_flash_attention_for_cpu.default,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward.default}


def round_bf16(x: Tensor) -> Tensor:
    """fp32 -> the nearest bf16 value (round to nearest even), kept in fp32."""
    return x.to(torch.bfloat16).to(x.dtype)


def round_tf32(x: Tensor) -> Tensor:
    """fp32 -> the nearest TF32 value (10 explicit mantissa bits, round to nearest even), kept in fp32."""
    if x.dtype != torch.float32:
        return x
    bits = x.view(torch.int32)
    lsb = (bits >> 13) & 1
    rounded = (bits + 0x0FFF + lsb) & ~0x1FFF
    finite = torch.isfinite(x)
    return torch.where(finite, rounded.view(torch.float32), x)


def gemm_flops(func, args: tuple, out) -> int:
    """FLOPs (2 per multiply-accumulate) of one GEMM-class aten op, for the bf16 share of a step. Attention of any
    backend (CPU or CUDA kernels) is counted as self-attention from its first [B, H, T, Dh] tensor."""
    name = func.__name__
    if "scaled_dot_product" in name or "attention" in name:
        q = next(a for a in args if isinstance(a, Tensor) and a.dim() == 4)
        per = 2 * 2 * q.shape[0] * q.shape[1] * q.shape[2] ** 2 * q.shape[3]  # QK^T and PV
        return 2 * per if "backward" in name else per
    if func in (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default):
        a, b = (args[0], args[1]) if func in (aten.mm.default, aten.bmm.default) else (args[1], args[2])
        return 2 * a.numel() * b.shape[-1]
    if func == aten.convolution.default:
        w = args[1]
        return 2 * out.numel() * w[0].numel()
    if func == aten.convolution_backward.default:
        grad, w = args[0], args[2]
        return 2 * 2 * grad.numel() * w[0].numel()  # input and weight gradients
    return 0


class FlopTally:
    """GEMM-class FLOPs of the ops seen, by whether they ran in bf16."""

    def __init__(self):
        self.flops = {"bf16": 0, "fp32": 0}

    def count(self, flops: int, bf16: bool) -> None:
        self.flops["bf16" if bf16 else "fp32"] += flops

    @property
    def bf16_fraction(self) -> float:
        total = self.flops["bf16"] + self.flops["fp32"]
        return self.flops["bf16"] / total if total else 0.0


class GemmCounter(FlopTally, TorchDispatchMode):
    """Counts GEMM-class FLOPs without changing any computation: for a GPU, where the rounding is real (under the
    emulator, BF16Emulator counts the same way)."""

    def __init__(self):
        FlopTally.__init__(self)
        TorchDispatchMode.__init__(self)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        bf16 = any(isinstance(a, Tensor) and a.dtype == torch.bfloat16 for a in args)
        self.count(gemm_flops(func, args, out[0] if isinstance(out, (tuple, list)) else out), bf16)
        return out


class _State(threading.local):
    autocast: bool = False
    emulator: Optional["BF16Emulator"] = None


_state = _State()


class _Autocast(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Python backward functions (custom ops) run without autocast, as backward does on CUDA.
        if _state.autocast and torch._C._current_autograd_node() is None:
            if func in AUTOCAST_BF16:
                args, kwargs = tree_map(_to(torch.float32, torch.bfloat16), (args, kwargs))
            elif func in AUTOCAST_FP32:
                args, kwargs = tree_map(_to(torch.bfloat16, torch.float32), (args, kwargs))
        return func(*args, **kwargs)


def _to(src: torch.dtype, dst: torch.dtype):
    return lambda a: a.to(dst) if isinstance(a, Tensor) and a.dtype == src else a


class _Hardware(TorchDispatchMode):
    def __init__(self, owner: "BF16Emulator"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in GEMM_OPS:
            return func(*args, **kwargs)
        tensors = [a for a in args if isinstance(a, Tensor) and a.is_floating_point()]
        bf16 = any(a.dtype == torch.bfloat16 for a in tensors)
        if bf16:
            up = tree_map(lambda a: a.to(torch.bfloat16).float()
                          if isinstance(a, Tensor) and a.is_floating_point() else a, (args, kwargs))
            out = _round_outputs(func(*up[0], **up[1]), GEMM_OPS[func])
        elif self.owner.tf32 and func not in ATTENTION_OPS and all(a.dtype == torch.float32 for a in tensors):
            up = tree_map(lambda a: round_tf32(a) if isinstance(a, Tensor) and a.is_floating_point() else a,
                          (args, kwargs))
            out = func(*up[0], **up[1])
        else:
            out = func(*args, **kwargs)
        first = out[0] if isinstance(out, (tuple, list)) else out
        self.owner.count(gemm_flops(func, args, first), bf16)
        return out


def _round_outputs(out, keep: Optional[tuple[int, ...]]):
    if isinstance(out, Tensor):
        return out.to(torch.bfloat16)
    return type(out)(o.to(torch.bfloat16) if isinstance(o, Tensor) and o.is_floating_point()
                     and (keep is None or i in keep) else o for i, o in enumerate(out))


class BF16Emulator(FlopTally):
    """Context manager: run PyTorch code on the CPU with a CUDA GPU's bf16-autocast / TF32 rounding.

    `tf32`: fp32 GEMMs round their inputs to TF32 (the fp32 mode's `allow_tf32`). Autocast regions are opened with
    `autocast()` below (what soflow_fast.precision does when an emulator is active). `flops` counts GEMM FLOPs by
    the precision they ran in.
    """

    def __init__(self, tf32: bool = True):
        super().__init__()
        self.tf32 = tf32
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "BF16Emulator":
        if _state.emulator is not None:
            raise RuntimeError("BF16Emulator: already inside an emulator")
        _state.emulator = self
        self._stack.enter_context(_Hardware(self))
        self._stack.enter_context(_Autocast())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        _state.emulator = None


def active() -> Optional[BF16Emulator]:
    """The emulator this thread runs under, or None."""
    return _state.emulator


@contextlib.contextmanager
def autocast(enabled: bool) -> Iterator[None]:
    """An emulated CUDA bf16 autocast region (or, enabled=False, an fp32 region inside one)."""
    if _state.emulator is None:
        raise RuntimeError("emulate.autocast: no BF16Emulator is active")
    before, _state.autocast = _state.autocast, enabled
    try:
        yield
    finally:
        _state.autocast = before
