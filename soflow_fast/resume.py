"""Where a run starts: the checkpoint a resume loads, what a resume may change in the config, init_from's weights.

The checkpoint (`choose_checkpoint`): the run's newest, its checksums verified (integrity.py; resume_fallback takes
the newest intact one instead of stopping), or the one resume_from names. Checkpoints newer than the chosen one are
moved to ckpts/abandoned/ (`set_aside_newer`), so that this run's saves never meet them and a later resume never
returns to them; metrics.jsonl drops its records after the chosen step (metrics.MetricsLogger.keep_until).

What a resume may change (docs/cluster.md, "What a resume may change"): the keys config.py marks fixed
(`opt(..., fixed=True)`) define the run: its model, data, objective and its schedule, batch, optimizer kind and
randomness. The checkpoint's optimizer state, data position and noise streams belong to their old values, so a
changed one is refused, naming the key (`config_changes`). Every other key may change; the change is logged
("resume: learning_rate 0.0001 -> 0.0002") and holds from the resumed step. The optimizer's hyperparameters
(learning_rate, betas, weight_decay) are saved with its state, so the trainer sets them back to the config's after
loading it (`group_settings`, `restore_group_settings`); everything else is read from the config as the run goes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .checkpoint import META, checkpoint_dir, latest_checkpoint, list_checkpoints, read_meta
from .config import ConfigError, TrainConfig
from .integrity import resume_checkpoint, verify_or_warn
from .parallel import from_main

log = logging.getLogger("soflow_fast")

ABANDONED = "abandoned"
# Why a fixed key cannot change, where the general reason would mislead.
_HINTS = {"total_steps": "it times the consistency-gap schedule (l_schedule); to stop earlier, use --max-steps",
          "init_from": "init_from only starts a new run; this run directory resumes from its own checkpoints"}


def step_of(path: Path) -> int:
    """The step of a checkpoint directory named step_XXXXXXXX (checkpoint.list_checkpoints lists only those)."""
    return int(path.name.removeprefix("step_"))


def config_changes(saved: dict[str, Any], cfg: TrainConfig, source: str) -> list[str]:
    """The keys whose value in `cfg` differs from the checkpoint's config `saved`, as 'key old -> new' (keys the
    checkpoint's version did not have are not compared); ConfigError naming the first fixed key that differs."""
    now = cfg.to_dict()
    changed = []
    for f in dataclasses.fields(TrainConfig):
        old, new = saved.get(f.name, now[f.name]), now[f.name]
        if old == new:
            continue
        if f.metadata["fixed"]:
            why = _HINTS.get(f.name, "it defines the run; start a new run directory (init_from: starts from its "
                                     "weights)")
            raise ConfigError(f"config: {f.name} = {new!r}, but {source} was trained with {old!r}; a resume cannot "
                              f"change it: {why}")
        changed.append(f"{f.name} {old!r} -> {new!r}")
    return changed


def _resume_from_path(run_dir: Path, value: Union[int, str]) -> Path:
    path = checkpoint_dir(run_dir, value) if isinstance(value, int) else Path(value)
    if not (path / META).is_file():
        steps = ", ".join(str(step_of(p)) for p in list_checkpoints(run_dir)) or "none"
        raise ConfigError(f"config: resume_from = {value!r}: {path} is not a checkpoint (this run's checkpoints: "
                          f"steps {steps})")
    return path


def _continues(newest: Optional[Path], value: Union[int, str]) -> bool:
    """Whether the run's newest checkpoint was written after resuming from `value`: the same command again (a requeue)
    continues from it rather than going back."""
    if newest is None:
        return False
    try:
        return read_meta(newest).get("config", {}).get("resume_from") == value
    except (ValueError, FileNotFoundError):  # unreadable: not known to continue; `value` is what was asked for
        return False


def choose_checkpoint(run_dir: Path, resume_from: Union[int, str], fallback: bool) -> Optional[Path]:
    """The checkpoint a run resumes from, verified; None for a new run. resume_from ('' = the newest): a step of this
    run or a checkpoint directory (its checksums must match: no fallback from a chosen checkpoint)."""
    if resume_from != "" and not _continues(latest_checkpoint(run_dir), resume_from):
        path = _resume_from_path(run_dir, resume_from)
        verify_or_warn(path)
        return path
    return resume_checkpoint(run_dir, fallback)


def plan_start(cfg: TrainConfig, run_dir: Path, is_main: bool) -> Optional[Path]:
    """Collective: rank 0 chooses the checkpoint (it alone hashes the files), every rank learns it; an error (a damaged
    checkpoint, a bad resume_from) is raised on every rank."""
    path, error = None, None
    if is_main:
        try:
            path = choose_checkpoint(run_dir, cfg.resume_from, cfg.resume_fallback)
        except (ValueError, FileNotFoundError) as e:  # ChecksumError, ConfigError, an unreadable meta.pt
            error = e
    path_text, message = from_main((path and str(path), error and str(error)))
    if message is not None:
        raise error or ValueError(message)
    return path_text and Path(path_text)


def set_aside_newer(run_dir: Path, step: int) -> None:
    """Move the run's checkpoints after `step` to ckpts/abandoned/<time>/ (rank 0): a run continuing from `step`
    writes its own, and a later resume must not return to those (a damaged one skipped by resume_fallback, or the
    ones after a resume_from)."""
    newer = [p for p in list_checkpoints(run_dir) if step_of(p) > step]
    if not newer:
        return
    dest = Path(run_dir) / "ckpts" / ABANDONED / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for p in newer:
        os.replace(p, dest / p.name)
    log.warning("moved %d checkpoint(s) after step %d (%s) to %s: the run continues from step %d", len(newer), step,
                ", ".join(p.name for p in newer), dest, step)


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings (lr, betas, weight_decay, ...) without its parameters."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def restore_group_settings(optimizer: torch.optim.Optimizer, settings: list[dict[str, Any]]) -> None:
    """Put back settings taken by group_settings (the config's) over those a loaded optimizer state brought."""
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
