"""Networks F(x, t, s, y). build_model is the one way to make one from a size name."""
from __future__ import annotations

import torch

from .. import ops
from .dit import DIT_SIZES, DiT, DiTConfig, canonical_size


def build_model(size: str, *, input_size: int, in_channels: int, num_classes: int, null_class: bool = True,
                kernels: str = "eager", device: torch.device | str = "cpu", **overrides) -> DiT:
    """A DiT of a named size ('DiT-XL/2', 'DiT-B-4', ...); overrides (hidden_size, depth, ...) replace table entries.

    kernels: 'auto' | 'triton' | 'eager' ('auto' = Triton on CUDA).
    """
    impl = ops.resolve_kernels(kernels, device)
    fields = dict(zip(("patch_size", "hidden_size", "depth", "num_heads"), DIT_SIZES[canonical_size(size)]))
    fields.update(overrides)
    cfg = DiTConfig(input_size=input_size, in_channels=in_channels, num_classes=num_classes, null_class=null_class,
                    kernels=impl, **fields)
    return DiT(cfg).to(device)


__all__ = ["DIT_SIZES", "DiT", "DiTConfig", "build_model", "canonical_size"]
