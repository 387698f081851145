"""Checkpoints.

Training checkpoints are torch.distributed.checkpoint directories (sharded under FSDP, resumable on another world
size): ckpts/step_XXXXXXXX/ holds the DCP files (model, optimizer, EMA), meta.pt (step, data position, config,
architecture) and CHECKSUMS.json (integrity.py: verified before any load). They are written under step_XXXXXXXX.tmp/
and renamed when complete, so a killed run never leaves a half-written checkpoint under a final name. A consolidated
checkpoint is one .pt file (model, ema, architecture), made by `soflow-fast export` or `import-checkpoint`, and read
by `sample`. All loads are weights_only.

`Checkpointer` is the trainer's side: it assembles the DCP state (model, optimizer, EMA), saves it with the meta,
prunes old checkpoints (sparing the newest clean one), and on resume refuses a checkpoint whose model differs from the
configured one, naming the first differing field. `read_checkpoint` and `load_state_strict` are the one reader and
the one strict loader of .pt files and state dicts (models/reference.py imports them too).
"""
from __future__ import annotations

import os
import re
import shutil
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from .fileio import atomic_open

log = logging.getLogger("soflow_fast")

FORMAT = "soflow_fast/1"
META = "meta.pt"
_NAME = re.compile(r"^step_(\d{8})$")
CONSOLIDATED_KEYS = ("format", "model", "ema", "step", "model_config", "flow")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) of a dict, with errors that name the file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path}: no such file") from None
    except Exception as e:  # truncated zip, pickle of foreign objects, ...
        raise ValueError(f"checkpoint {path}: cannot be read as a weights-only torch checkpoint ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path}: expected a dict, got {type(obj).__name__}")
    return obj


def load_state_strict(model: torch.nn.Module, state: dict[str, Tensor], source: str = "state dict") -> None:
    """load_state_dict that names the first missing key, unknown key or shape mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unknown = sorted(set(state) - set(own))
    if missing:
        raise KeyError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing)")
    if unknown:
        raise KeyError(f"{source}: unknown key {unknown[0]!r} ({len(unknown)} unknown)")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{source}: key {k!r} has shape {list(v.shape)}, the model expects {list(own[k].shape)}")
    model.load_state_dict(state)


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
    """Delete all but the `keep` newest checkpoints (keep 0: none), sparing the newest clean one (its meta 'clean':
    no step skipped as non-finite since the checkpoint before it), so that a run diverging while on_nonfinite
    skips never prunes the last weights from before its trouble."""
    found = list_checkpoints(run_dir)
    if keep <= 0 or len(found) <= keep:
        return
    clean = next((p for p in reversed(found) if read_meta(p).get("clean", True)), None)
    for old in found[:-keep]:
        if old != clean:
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
        from .integrity import write_checksums

        atomic_save({"format": FORMAT, **meta}, tmp / META)
        write_checksums(tmp)
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
    """A consolidated checkpoint dict from a .pt file, a training checkpoint directory (or run directory: its latest
    checkpoint), or a `export --format safetensors` folder (export.py: its one set of weights). Reads only model and
    EMA weights, whatever world size wrote them."""
    path = Path(path)
    if path.is_file():
        return load_consolidated(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    from .export import is_safetensors_export, load_safetensors_export

    if is_safetensors_export(path):
        return load_safetensors_export(path)
    if not (path / META).exists():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"checkpoint {path}: neither a checkpoint directory nor a run with checkpoints")
        path = latest
    from .integrity import verify_or_warn
    from .models import model_from_config

    verify_or_warn(path)
    meta = read_meta(path)
    model = model_from_config(meta["model_config"])
    params = {k for k, _ in model.named_parameters()}
    state = {"model": {k: torch.empty_like(v) for k, v in model.state_dict().items()},
             "ema": {k: torch.empty_like(v) for k, v in model.state_dict().items() if k in params}}
    load_training_state(path, state)
    ema = {k: state["ema"].get(k, v) for k, v in state["model"].items()}  # the EMA has no buffers: the model's
    return {"format": FORMAT, "model": state["model"], "ema": ema, "step": meta["step"],
            "model_config": meta["model_config"], "flow": meta["flow"], "config": meta.get("config")}


def check_same_model(source: str, theirs: dict, ours: dict) -> None:
    """ValueError naming the first field in which the model `theirs` (models.describe) differs from `ours`."""
    diff = [k for k in ours["config"] if theirs.get("config", {}).get(k) != ours["config"][k]]
    if theirs.get("kind") != ours["kind"] or diff:
        key = diff[0] if diff else "kind"
        raise ValueError(f"{source}: its model has {key} = {theirs.get('config', {}).get(key, theirs.get('kind'))!r}, "
                         f"the config asks for {ours['config'].get(key, ours['kind'])!r}")


def model_from_checkpoint(ck: dict, weights: str = "ema", kernels: str = "eager",
                          device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild the network a consolidated checkpoint describes and load its EMA (default) or raw weights."""
    from .models import model_from_config

    if weights not in ck:  # a safetensors export holds one set
        raise ValueError(f"checkpoint: holds no {weights!r} weights, only {[k for k in ('ema', 'model') if k in ck]}")
    model = model_from_config(ck["model_config"], kernels, device)
    load_state_strict(model, ck[weights], f"checkpoint [{weights}]")
    return model.eval()


class Checkpointer:
    """Training checkpoints of one run directory: save (collective), prune to `keep`, resume.

    The state is model and optimizer (torch.distributed.checkpoint's get_state_dict: sharded under FSDP, plain
    otherwise) and the EMA tensors, filled in place on resume, so any world size can resume any other's checkpoint.
    """

    def __init__(self, run_dir: str | os.PathLike, keep: int, is_main: bool):
        self.run_dir, self.keep, self.is_main = Path(run_dir), keep, is_main

    @staticmethod
    def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, Tensor]) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optim": optim_sd, "ema": ema}

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, Tensor],
             meta: dict) -> Path:
        """Collective: ckpts/step_<step>/ with every rank's shards and rank 0's meta (`meta` must hold 'step',
        'model_config' and 'flow' for consolidate)."""
        path = checkpoint_dir(self.run_dir, step)
        save_training_checkpoint(path, self._state(model, optimizer, ema), meta, self.is_main)
        if self.is_main:
            prune_checkpoints(self.run_dir, self.keep)
        return path

    def resume(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, Tensor],
               model_config: dict) -> dict:
        """Collective: load the checkpoint `path` (resume.choose_checkpoint) into model, optimizer and ema (in place)
        and return its meta. A checkpoint of another model (model_config: models.describe) is refused."""
        meta = read_meta(path)
        check_same_model(f"checkpoint {path}", meta["model_config"], model_config)
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state(model, optimizer, ema)
        load_training_state(path, state)  # fills the EMA tensors in place
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        log.info("resumed from %s at step %d (written by %d ranks)", path, meta["step"], meta.get("world_size", 1))
        return meta
