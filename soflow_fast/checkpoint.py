"""Single-file training checkpoints: written to a temporary name and renamed, read with weights_only=True.

A checkpoint is a dict of tensors and plain values: model, ema, optimizer, step, data position, RNG states, the
run's config and the model's architecture (so `sample` can rebuild the network from the file alone).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from .models.reference import read_checkpoint

FORMAT = "soflow_fast/1"
_NAME = re.compile(r"^step_(\d{8})\.pt$")
REQUIRED = ("format", "model", "ema", "step", "model_config", "flow")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to path + '.tmp', fsync, then rename: a crash never leaves a half-written file under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "ckpts" / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files are ignored)."""
    folder = Path(run_dir) / "ckpts"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A soflow_fast checkpoint, validated; errors name the file."""
    ckpt = read_checkpoint(path)
    if ckpt.get("format") != FORMAT:
        hint = " (a reference checkpoint? convert it with `soflow-fast import-checkpoint`)" if "ema_model" in ckpt else ""
        raise ValueError(f"checkpoint {path}: not a {FORMAT} checkpoint{hint}")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path}: missing entry {missing[0]!r}")
    return ckpt


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink()


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None
