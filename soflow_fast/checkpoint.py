"""Checkpoints.

Training checkpoints are torch.distributed.checkpoint directories (sharded under FSDP, resumable on another world
size): ckpts/step_XXXXXXXX/ holds the DCP files (model, optimizer, EMA) and meta.pt (step, data position, config,
architecture). They are written under step_XXXXXXXX.tmp/ and renamed when complete, so a killed run never leaves a
half-written checkpoint under a final name. A consolidated checkpoint is one .pt file (model, ema, architecture),
made by `soflow-fast export` or `import-checkpoint`, and read by `sample`. All loads are weights_only.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from .fileio import atomic_open
from .models.reference import read_checkpoint

FORMAT = "soflow_fast/1"
META = "meta.pt"
_NAME = re.compile(r"^step_(\d{8})$")
CONSOLIDATED_KEYS = ("format", "model", "ema", "step", "model_config", "flow")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through fileio.atomic_open (temporary name, then rename)."""
    with atomic_open(path) as fh:
        torch.save(obj, fh)


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "ckpts" / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete training checkpoints of a run, oldest first (unfinished .tmp directories are ignored)."""
    folder = Path(run_dir) / "ckpts"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name) and p.is_dir())


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)


def save_training_checkpoint(directory: Path, state: dict, meta: dict, is_main: bool) -> None:
    """Collective: every rank writes its shards into directory.tmp; rank 0 adds meta.pt and renames."""
    import torch.distributed.checkpoint as dcp

    from .parallel import barrier

    tmp = directory.with_name(directory.name + ".tmp")
    if is_main and tmp.exists():
        shutil.rmtree(tmp)  # the leftovers of a run killed while saving
    barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    barrier()
    if is_main:
        atomic_save({"format": FORMAT, **meta}, tmp / META)
        os.replace(tmp, directory)
    barrier()


def read_meta(directory: str | os.PathLike) -> dict:
    meta = read_checkpoint(Path(directory) / META)
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {directory}: {META} is not a {FORMAT} file")
    return meta


def load_training_state(directory: str | os.PathLike, state: dict) -> None:
    """Collective: fill `state` (DCP layout, current sharding) in place from a checkpoint directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        dcp.load(state, checkpoint_id=str(directory))
    except (Exception, CheckpointException) as e:  # missing or damaged shard files, another model's layout, ...
        raise ValueError(f"checkpoint {directory}: cannot be loaded ({type(e).__name__}: {e})") from None


def load_consolidated(path: str | os.PathLike) -> dict:
    """A single-file soflow_fast checkpoint (export / import-checkpoint), validated; errors name the file."""
    ckpt = read_checkpoint(path)
    if ckpt.get("format") != FORMAT:
        hint = (" (a reference checkpoint? convert it with `soflow-fast import-checkpoint`)"
                if "ema_model" in ckpt else "")
        raise ValueError(f"checkpoint {path}: not a {FORMAT} checkpoint{hint}")
    missing = [k for k in CONSOLIDATED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path}: missing entry {missing[0]!r}")
    return ckpt


def consolidate(path: str | os.PathLike) -> dict:
    """A consolidated checkpoint dict from either a .pt file or a training checkpoint directory (or run directory:
    its latest checkpoint). Reads only model and EMA weights, whatever world size wrote them."""
    path = Path(path)
    if path.is_file():
        return load_consolidated(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    if not (path / META).exists():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"checkpoint {path}: neither a checkpoint directory nor a run with checkpoints")
        path = latest
    from .models import model_from_config

    meta = read_meta(path)
    model = model_from_config(meta["model_config"])
    params = {k for k, _ in model.named_parameters()}
    state = {"model": {k: torch.empty_like(v) for k, v in model.state_dict().items()},
             "ema": {k: torch.empty_like(v) for k, v in model.state_dict().items() if k in params}}
    load_training_state(path, state)
    ema = {k: state["ema"].get(k, v) for k, v in state["model"].items()}  # the EMA has no buffers: the model's
    return {"format": FORMAT, "model": state["model"], "ema": ema, "step": meta["step"],
            "model_config": meta["model_config"], "flow": meta["flow"], "config": meta.get("config")}
