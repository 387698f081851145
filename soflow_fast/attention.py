"""The DiT's attention implementation, chosen once when the model is built (config key `attention`).

- sdpa: PyTorch's scaled_dot_product_attention with its own dispatch.
- cudnn | flash | efficient | math: SDPA with that backend forced (torch.nn.attention.sdpa_kernel inside the call).
- flash-attn: the flash-attn package (CUDA, bf16, head dim <= 256).
- auto: the backend measured fastest on this device class (ATTENTION_TABLE, filled from a GPU run of
  benchmarks/gpu_suite.py's attention stage at XL/2's head dim 72 by benchmarks/attention_table.py); without a
  measurement, flash-attn when installed and usable, else sdpa.

The resolved callable is stored on each Attention module, so no call decides or imports anything.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .models import DIT_SIZES, canonical_size
from .precision import Precision

ATTENTION_MODES = ("auto", "sdpa", "flash-attn", "cudnn", "flash", "efficient", "math")
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}  # names in torch.nn.attention.SDPBackend
TABLE_PATH = Path(__file__).with_name("attention_table.json")
TABLE_HEAD_DIM = 72  # DiT-XL/2's head dim: the one the table's measurements are taken at
# Device classes, matched in this order against torch.cuda.get_device_name ("A10" after "A100": a substring of it).
DEVICE_CLASSES = ("H200", "H100", "H800", "A100", "A800", "L40S", "A10", "L4")

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class AttentionChoice:
    name: str  # one of ATTENTION_MODES except auto
    fn: AttentionFn
    why: str

    def describe(self) -> str:
        return f"{self.name} ({self.why})"


def _forced_sdpa(backend, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from torch.nn.attention import sdpa_kernel  # a module import, resolved before any compiled graph runs

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def attention_fn(name: str) -> AttentionFn:
    """The callable for a resolved name (no checks: see resolve_attention)."""
    if name == "sdpa":
        return F.scaled_dot_product_attention
    if name == "flash-attn":
        return ops.flash_attention
    from torch.nn.attention import SDPBackend

    return functools.partial(_forced_sdpa, getattr(SDPBackend, SDPA_BACKENDS[name]))


def device_class(device_name: str) -> Optional[str]:
    return next((c for c in DEVICE_CLASSES if c in device_name), None)


def load_table(path: Path = TABLE_PATH) -> dict[str, dict]:
    """{device class: {"backend": name, "measured": provenance}}; empty until a GPU run fills it."""
    return json.loads(path.read_text()) if path.exists() else {}


def flash_attn_problem(device: torch.device, bf16: bool, head_dim: int) -> Optional[str]:
    """Why flash-attn cannot run this model's attention, or None when it can."""
    if ops._flash_attn_func() is None:
        return "the flash-attn package is not installed"
    if device.type != "cuda":
        return f"flash-attn needs a CUDA device, not {device.type}"
    if not bf16:
        return "flash-attn needs every network call in bf16 (precision bf16 or bf16-secant)"
    if head_dim > 256:
        return f"flash-attn supports head dims up to 256, not {head_dim}"
    return None


def resolve_attention(mode: str, device: torch.device | str, *, bf16: bool, head_dim: int,
                      table: Optional[dict[str, dict]] = None) -> AttentionChoice:
    """The implementation for `mode` (ATTENTION_MODES). bf16: whether every attention call of the model runs in bf16;
    table: the measurements (default: load_table()). Raises ValueError naming `attention` for an impossible mode."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention: unknown value {mode!r}; expected one of {list(ATTENTION_MODES)}")
    device = torch.device(device)
    if mode == "flash-attn":
        problem = flash_attn_problem(device, bf16, head_dim)
        if problem:
            raise ValueError(f"attention: 'flash-attn': {problem}; use auto or sdpa")
    if mode != "auto":
        return AttentionChoice(mode, attention_fn(mode), "asked")
    if device.type != "cuda":
        return AttentionChoice("sdpa", attention_fn("sdpa"), f"auto on {device.type}")
    cls = device_class(torch.cuda.get_device_name(device))
    measured = (load_table() if table is None else table).get(cls or "", {}).get("backend")
    if measured and not (measured == "flash-attn" and flash_attn_problem(device, bf16, head_dim)):
        return AttentionChoice(measured, attention_fn(measured), f"measured fastest on {cls} at head dim "
                                                                 f"{TABLE_HEAD_DIM}")
    name = "sdpa" if flash_attn_problem(device, bf16, head_dim) else "flash-attn"
    return AttentionChoice(name, attention_fn(name), "no measurement for this device; default")


# gpu_suite's attention-stage labels -> config names
SUITE_LABELS = {"sdpa (its own choice)": "sdpa", "sdpa cuDNN": "cudnn", "sdpa flash": "flash",
                "sdpa efficient": "efficient", "sdpa math": "math", "flash-attn": "flash-attn"}


def fastest_from_suite(doc: dict) -> tuple[str, dict]:
    """(device class, table entry) from gpu_suite's attention.json: the implementation with the least time for a
    step's attention (the no-grad calls' forward plus the gradient call's forward + backward), among those timed
    for every call. Raises ValueError when the document cannot fill the table."""
    result = doc.get("result", {})
    if result.get("head_dim") != TABLE_HEAD_DIM:
        raise ValueError(f"attention.json: head dim {result.get('head_dim')}, the table is for {TABLE_HEAD_DIM} "
                         "(run gpu_suite without --tiny)")
    cls = device_class(str(doc.get("device", "")))
    if cls is None:
        raise ValueError(f"attention.json: device {doc.get('device')!r} is none of {list(DEVICE_CLASSES)}")
    totals: dict[str, float] = {}
    calls = {r["call"] for r in result["rows"]}
    for impl in SUITE_LABELS:
        rows = [r for r in result["rows"] if r["impl"] == impl]
        times = [r.get("fwd_bwd_ms" if r["call"] == "gradient" else "fwd_ms") for r in rows]
        if len(rows) == len(calls) and None not in times:
            totals[impl] = sum(times)
    if not totals:
        raise ValueError("attention.json: no implementation was timed for every call")
    best = min(totals, key=totals.get)
    return cls, {"backend": SUITE_LABELS[best], "measured": f"{doc.get('device')}, torch {doc.get('torch')}, "
                                                            f"batch {result.get('batch')}: {totals[best]:.3f} ms"}


def attention_for_model(mode: str, model_type: str, device: torch.device, precision: Precision,
                        hidden_size: Optional[int] = None, num_heads: Optional[int] = None) -> AttentionChoice:
    """The attention of a run's network (config keys attention, model_type, hidden_size, num_heads; None: the size
    table's). The U-Net's is chosen per call (ops.attention). flash-attn needs every call in bf16: the precision
    modes that put the teacher, FM and pair calls all in bf16."""
    if not model_type.startswith("DiT"):
        return AttentionChoice("per call", ops.attention, "the U-Net's: sdpa, or flash-attn for bf16 CUDA tensors")
    _, hidden, _, heads = DIT_SIZES[canonical_size(model_type)]
    bf16 = precision.teacher_bf16 and precision.fm_bf16 and precision.pair_bf16
    return resolve_attention(mode, device, bf16=bf16, head_dim=(hidden_size or hidden) // (num_heads or heads))
