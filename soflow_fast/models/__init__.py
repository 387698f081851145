"""Networks F(x, t, s, y). build_model is the one way to make one from a size name; model_from_config rebuilds one
from the architecture stored in a checkpoint."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..kernel_ops import resolve_kernels
from .dit import DIT_SIZES, AttentionFn, DiT, DiTConfig, canonical_size
from .unet import UNET_SIZES, SongUNet, UNetConfig, build_unet


def build_model(size: str, *, input_size: int, in_channels: int, num_classes: int, null_class: bool = True,
                kernels: str = "eager", device: torch.device | str = "cpu",
                attention: AttentionFn = F.scaled_dot_product_attention, **overrides) -> DiT:
    """A DiT of a named size ('DiT-XL/2', 'DiT-B-4', ...); overrides (hidden_size, depth, ...) replace table entries.

    kernels: 'auto' | 'triton' | 'eager' ('auto' = per op, what kernels/choices.py measured faster on this device).
    attention: the DiT's implementation, resolved by soflow_fast.attention.resolve_attention (the U-Net's is chosen
    per call: ops.attention).
    """
    if size in UNET_SIZES:
        if num_classes:
            raise ValueError(f"model_type {size}: the U-Net is unconditional; num_classes must be 0, got {num_classes}")
        return build_unet(size, kernels=kernels, device=device, img_resolution=input_size, in_channels=in_channels,
                          out_channels=in_channels, **overrides)
    cfg = DiTConfig.from_size(size, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                              null_class=null_class, kernels=resolve_kernels(kernels, device), **overrides)
    return DiT(cfg, attention, torch.device(device).type).to(device)


KINDS = {"dit": (DiT, DiTConfig), "unet": (SongUNet, UNetConfig)}


def describe(model: nn.Module) -> dict:
    """{'kind', 'config'}: what model_from_config needs to rebuild the network (kernels left out)."""
    kind = next(k for k, (cls, _) in KINDS.items() if isinstance(model, cls))
    return {"kind": kind, "config": {k: v for k, v in dataclasses.asdict(model.cfg).items() if k != "kernels"}}


def model_from_config(description: dict, kernels: str = "eager", device: torch.device | str = "cpu",
                      attention: AttentionFn = F.scaled_dot_product_attention) -> nn.Module:
    """The inverse of describe() (attention: as build_model's, for a DiT)."""
    kind, config = description.get("kind"), description.get("config", {})
    if kind not in KINDS:
        raise ValueError(f"model description: unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    cls, cfg_cls = KINDS[kind]
    cfg = cfg_cls(**config, kernels=resolve_kernels(kernels, device))
    return (DiT(cfg, attention, torch.device(device).type) if cls is DiT else cls(cfg)).to(device)


def is_model_type(name: str) -> bool:
    try:
        canonical_size(name)
        return True
    except ValueError:
        return name in UNET_SIZES


__all__ = ["DIT_SIZES", "UNET_SIZES", "DiT", "DiTConfig", "SongUNet", "UNetConfig", "build_model", "build_unet",
           "canonical_size", "describe", "model_from_config", "is_model_type"]
