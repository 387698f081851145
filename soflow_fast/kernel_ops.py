"""The op implementations a model runs, chosen once when it is built.

`kernels: auto | triton | eager` resolves, for a device, to one implementation per op (a string that checkpoints
and configs carry), and that string to a KernelOps: the functions themselves, which the DiT and the training step
call without deciding anything per call. The eager twins (soflow_fast.ops, soflow_fast.loss) are the math; the
Triton versions (soflow_fast.kernels, which import those twins and nothing of this module) must match them.

The device type a model is built for also picks how the Triton ops are registered (soflow_fast.kernels._common
.Registration): on CUDA with torch.library.triton_op, so that torch.compile traces into them and inductor sees the
Triton launches; elsewhere with torch.library.custom_op (the CPU's interpreter path, opaque to compile). Only the
CPU side is tested here; benchmarks/gpu_suite.py checks the CUDA registration under torch.compile on the day.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import loss, ops
from .kernels import choices

KERNEL_MODES = ("auto", "triton", "eager")
IMPLS = ("eager", "triton")
OP_NAMES = ("layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate", "fm_loss",
            "consistency_loss", "layernorm_modulate_linear", "linear_gated_residual")


@dataclass(frozen=True)
class KernelOps:
    """One implementation per op; `name` is the resolved string it was built from."""
    name: str
    layernorm_modulate: Callable
    gated_residual: Callable
    gated_residual_layernorm_modulate: Callable
    fm_loss: Callable
    consistency_loss: Callable
    layernorm_modulate_linear: Callable  # eager: this KernelOps' layernorm_modulate, then F.linear
    linear_gated_residual: Callable      # eager: F.linear, then this KernelOps' gated_residual

    def describe(self) -> str:
        """'op impl, op impl, ...' for the start-up log."""
        return ", ".join(f"{op} {impl}" for op, impl in parse_kernels(self.name).items())


def device_class(device: torch.device | str) -> Optional[str]:
    """The key of kernels/choices.AUTO that names this device, or None (not CUDA, or not measured)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((key for key in choices.AUTO if key in name), None)


def resolve_kernels(mode: str, device: torch.device | str) -> str:
    """The resolved string for `kernels: mode` on device: 'eager', 'triton', or 'op=impl,...' when auto mixes."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels: unknown value {mode!r}; expected one of {list(KERNEL_MODES)}")
    if mode != "auto":
        return mode
    table = choices.AUTO.get(device_class(device), {})
    per_op = [table[op].impl if op in table else "eager" for op in OP_NAMES]
    if len(set(per_op)) == 1:
        return per_op[0]
    return ",".join(f"{op}={impl}" for op, impl in zip(OP_NAMES, per_op))


def parse_kernels(resolved: str) -> dict[str, str]:
    """op -> 'eager' | 'triton' from a resolved string; ValueError for anything else (e.g. an unresolved 'auto')."""
    if resolved in IMPLS:
        return dict.fromkeys(OP_NAMES, resolved)
    pairs = dict(item.partition("=")[::2] for item in resolved.split(","))
    if set(pairs) != set(OP_NAMES) or not set(pairs.values()) <= set(IMPLS):
        raise ValueError(f"kernels: expected a resolved 'eager', 'triton' or 'op=impl,...' naming each of "
                         f"{list(OP_NAMES)}, got {resolved!r}")
    return {op: pairs[op] for op in OP_NAMES}


EAGER = dict(layernorm_modulate=ops.layernorm_modulate_eager, gated_residual=ops.gated_residual_eager,
             gated_residual_layernorm_modulate=ops.gated_residual_layernorm_modulate_eager,
             fm_loss=loss.fm_loss, consistency_loss=loss.consistency_loss)


def _triton(device_type: str) -> Optional[dict[str, Callable]]:
    """The Triton functions for models on device_type, or None where Triton cannot run (no triton, or a CPU
    without the interpreter: such ops take their eager implementation)."""
    # Imported only when a model asks for Triton: importing triton is slow, and the interpreter switch
    # (TRITON_INTERPRET) is read at that import.
    from .kernels import _common, adaln, adaln_linear, soflow_loss
    if not _common.triton_runs_on(device_type):
        return None
    return {**adaln.functions(device_type)._asdict(), **soflow_loss.functions(device_type)._asdict(),
            **adaln_linear.functions(device_type)._asdict()}


def _unfused(norm: Callable, residual: Callable) -> dict[str, Callable]:
    """The GEMM-fused ops' eager implementations: the linear by torch, its adaLN neighbour as chosen for that op
    (with eager neighbours these are the twins in soflow_fast.ops, bit for bit)."""
    if (norm, residual) == (ops.layernorm_modulate_eager, ops.gated_residual_eager):
        return dict(layernorm_modulate_linear=ops.layernorm_modulate_linear_eager,
                    linear_gated_residual=ops.linear_gated_residual_eager)
    return dict(layernorm_modulate_linear=lambda x, shift, scale, weight, bias: F.linear(norm(x, shift, scale),
                                                                                        weight, bias),
                linear_gated_residual=lambda x, gate, a, weight, bias: residual(x, gate, F.linear(a, weight, bias)))


@functools.cache
def kernel_ops_for(resolved: str, device_type: str = "cpu") -> KernelOps:
    """The KernelOps of a resolved string for models on device_type ('cuda': the triton_op registration; any other:
    custom_op, which also runs on CUDA tensors, opaque to torch.compile). One object per (string, device type):
    every block of a model shares it."""
    per_op = parse_kernels(resolved)
    triton = _triton(device_type) if "triton" in per_op.values() else None
    chosen = {op: triton[op] for op, impl in per_op.items() if impl == "triton" and triton is not None}
    chosen.update({op: EAGER[op] for op in EAGER if op not in chosen})
    unfused = _unfused(chosen["layernorm_modulate"], chosen["gated_residual"])
    chosen.update({op: unfused[op] for op in unfused if op not in chosen})
    return KernelOps(resolved, **chosen)

