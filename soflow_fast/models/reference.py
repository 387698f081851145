"""Import checkpoints of the reference implementation (zlab-princeton/SoFlow).

A reference checkpoint is {model, ema_model, optimizer, finished_steps, finished_epochs}; model and ema_model are
state dicts keyed "network.<DiT key>". Our DiT uses the same module names, so the import strips the prefix and then
checks every key and shape, naming any that does not fit.
"""
from __future__ import annotations

import os
from typing import Optional

from torch import Tensor

from ..checkpoint import load_state_strict, read_checkpoint
from .dit import DIT_SIZES, DiT, DiTConfig

PREFIX = "network."


def strip_reference_prefix(state: dict[str, Tensor], source: str = "state dict") -> dict[str, Tensor]:
    bad = [k for k in state if not k.startswith(PREFIX)]
    if bad:
        raise KeyError(f"{source}: key {bad[0]!r} lacks the reference prefix {PREFIX!r}")
    return {k[len(PREFIX):]: v for k, v in state.items()}


def infer_dit_config(state: dict[str, Tensor], num_classes: int, num_heads: Optional[int] = None) -> DiTConfig:
    """Read the architecture off a (prefix-stripped) state dict; heads come from the size table unless given."""
    try:
        w = state["x_embedder.proj.weight"]
        tokens = state["pos_embed"].shape[1]
    except KeyError as e:
        raise KeyError(f"state dict: missing key {e.args[0]!r}; not a DiT checkpoint") from None
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    grid = int(round(tokens ** 0.5))
    if num_heads is None:
        match = [h for (p, d, n, h) in DIT_SIZES.values() if (p, d, n) == (patch, hidden, depth)]
        if not match:
            raise ValueError(f"state dict: no size in the table has patch {patch}, hidden {hidden}, depth {depth}; "
                             "pass num_heads")
        num_heads = match[0]
    rows = state["y_embedder.embedding_table.weight"].shape[0] if num_classes else 0
    if num_classes and rows not in (num_classes, num_classes + 1):
        raise ValueError(f"state dict: label table has {rows} rows, which fits neither {num_classes} classes "
                         f"nor {num_classes} + 1 (null label)")
    return DiTConfig(input_size=grid * patch, in_channels=in_ch, patch_size=patch, hidden_size=hidden, depth=depth,
                     num_heads=num_heads, num_classes=num_classes, null_class=rows == num_classes + 1)


def load_reference_checkpoint(path: str | os.PathLike, *, num_classes: int = 1000, which: str = "ema_model",
                              num_heads: Optional[int] = None, kernels: str = "eager") -> DiT:
    """A DiT built and loaded from a reference checkpoint file (EMA weights by default)."""
    ckpt = read_checkpoint(path)
    if which not in ckpt:
        raise KeyError(f"checkpoint {path}: no {which!r} entry (has {sorted(ckpt)})")
    state = strip_reference_prefix(ckpt[which], f"checkpoint {path} [{which}]")
    cfg = infer_dit_config(state, num_classes, num_heads)
    model = DiT(DiTConfig(**{**cfg.__dict__, "kernels": kernels}))
    load_state_strict(model, state, f"checkpoint {path} [{which}]")
    return model
