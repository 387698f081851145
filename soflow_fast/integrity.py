"""Checksums of training checkpoints: recorded when saving, verified before loading.

A flipped bit inside a checkpoint's tensor data loads without complaint (torch.distributed.checkpoint checks no
checksums) and surfaces steps later as a "non-finite loss", or never. So each checkpoint directory (checkpoint.py:
ckpts/step_XXXXXXXX/, the DCP files and meta.pt) carries CHECKSUMS: the size and SHA-256 of every other file in it.
It is written last, into the .tmp directory just before the rename that completes the checkpoint, through
fileio.atomic_open; so a complete checkpoint always has one, and a checkpoint written before this existed has none
(it loads unverified, with a warning).

Cost: SHA-256 runs at about 1-2 GB/s per core; the files are hashed on `workers` threads (hashlib releases the GIL), so
a DiT-XL/2 checkpoint (model, EMA and AdamW state in fp32, about 11 GB) adds seconds to a save and to a resume, not
minutes. The save cost also counts against SLURM's warning time on a signal (docs/cluster.md).

Call sites: checkpoint.save_training_checkpoint (rank 0, after meta.pt, before the rename that completes the
checkpoint: write_checksums); resume.choose_checkpoint (rank 0 chooses, then every rank learns the path:
resume_checkpoint, or verify_or_warn of a resume_from); checkpoint.consolidate (export, sample, init_from:
verify_or_warn).
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from .checkpoint import list_checkpoints
from .fileio import sha256_file
from .fileio import atomic_open

log = logging.getLogger("soflow_fast")

CHECKSUMS = "CHECKSUMS.json"
FORMAT = "soflow_fast-checksums/1"
WORKERS = 4


class ChecksumError(ValueError):
    """A checkpoint file is missing, of the wrong size, or fails its SHA-256 check; the message names the file."""


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS)


def _hash_all(directory: Path, names: list[str], workers: int) -> list[str]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda name: sha256_file(directory / name), names))


def write_checksums(directory: str | os.PathLike, workers: int = WORKERS) -> Path:
    """Record the size and SHA-256 of every file under `directory` in directory/CHECKSUMS.json (written atomically)."""
    directory = Path(directory)
    names = _files(directory)
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": digest}
             for name, digest in zip(names, _hash_all(directory, names, workers))}
    path = directory / CHECKSUMS
    with atomic_open(path, "w") as fh:
        json.dump({"format": FORMAT, "files": files}, fh, indent=1)
    return path


def verify_checksums(directory: str | os.PathLike, workers: int = WORKERS) -> bool:
    """Check every file recorded in directory/CHECKSUMS.json: True when all match, False when there is no record
    (a checkpoint written before checksums); raises ChecksumError naming the first damaged file otherwise."""
    directory = Path(directory)
    path = directory / CHECKSUMS
    if not path.exists():
        return False
    try:
        record = json.loads(path.read_text())
        files = record["files"] if record.get("format") == FORMAT else None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError):
        files = None
    if not isinstance(files, dict):
        raise ChecksumError(f"checkpoint {directory}: {CHECKSUMS} is damaged (not a {FORMAT} record)")
    for name, entry in sorted(files.items()):  # sizes first: cheap, and they catch truncation
        file = directory / name
        if not file.is_file():
            raise ChecksumError(f"checkpoint {directory}: file {name} is missing")
        if file.stat().st_size != entry["bytes"]:
            raise ChecksumError(f"checkpoint {directory}: file {name} is damaged ({file.stat().st_size} bytes, "
                                f"{entry['bytes']} when saved)")
    names = sorted(files)
    for name, digest in zip(names, _hash_all(directory, names, workers)):
        if digest != files[name]["sha256"]:
            raise ChecksumError(f"checkpoint {directory}: file {name} is damaged (its SHA-256 differs from the one "
                                "recorded when it was saved)")
    return True


def verify_or_warn(directory: str | os.PathLike) -> None:
    """verify_checksums, with a warning (not an error) for a checkpoint written before checksums existed."""
    if not verify_checksums(directory):
        log.warning("checkpoint %s has no %s (written before checksums): loading it unverified", directory, CHECKSUMS)


def resume_checkpoint(run_dir: str | os.PathLike, fallback: bool = False) -> Optional[Path]:
    """The checkpoint a run resumes from: its newest, verified; None when it has none.

    A damaged newest checkpoint raises ChecksumError naming the file; with `fallback` each damaged one is reported
    (a warning naming the file) and the next older one is tried. A run whose checkpoints are all damaged raises rather
    than silently starting over."""
    found = list_checkpoints(run_dir)
    damaged = []
    for path in reversed(found):
        try:
            verify_or_warn(path)
            return path
        except ChecksumError as e:
            if not fallback:
                older = " (an older checkpoint exists: set resume_fallback: true to resume from the newest intact one)"
                raise ChecksumError(f"{e}{older if len(found) > 1 else ''}") from None
            log.warning("%s; trying the checkpoint before it", e)
            damaged.append(path.name)
    if damaged:
        raise ChecksumError(f"run {run_dir}: every checkpoint is damaged ({', '.join(damaged)}); see the warnings "
                            "above")
    return None
