"""A profiler window over chosen steps, for `train` (profile_steps, memory_snapshot) and benchmarks/step.py
(--profile-steps, --memory-snapshot); docs/cluster.md, "Profiling".

Steps start..end (inclusive, numbered from 1 as the trainer counts them) run under torch.profiler, each inside a
record_function named "step N", so the trace shows where each step begins and ends; the trace is written as chrome
trace JSON (chrome://tracing, ui.perfetto.dev) by every rank. With memory_snapshot, CUDA allocations over the same
steps are recorded and dumped as a snapshot for pytorch.org/memory_viz; on a CPU that is refused (it records CUDA
allocations only), naming the key or flag. Files are written under a temporary name and renamed.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from .errors import UserError

log = logging.getLogger("soflow_fast")


class ProfileWindow:
    """begin(n) before step n, end(n, last) after it; inactive outside the window (and when window is empty)."""

    def __init__(self, window: Sequence[int], memory_snapshot: bool, out_dir: Path, device: torch.device,
                 rank: int = 0, snapshot_name: str = "memory_snapshot"):
        if memory_snapshot and device.type != "cuda":
            raise UserError(f"{snapshot_name}: the snapshot records CUDA allocations; this run is on {device.type}")
        self.low, self.high = (int(window[0]), int(window[1])) if window else (0, -1)
        self.memory_snapshot, self.out_dir, self.device, self.rank = memory_snapshot, Path(out_dir), device, rank
        self.written: list[Path] = []
        self._prof: Optional[torch.profiler.profile] = None
        self._mark: Optional[torch.profiler.record_function] = None
        self._first = 0

    def begin(self, step: int) -> None:
        if not self.low <= step <= self.high:
            return
        if self._prof is None:  # the window's first step (or the first after a resume inside it)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            if self.memory_snapshot:
                torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            self._prof, self._first = torch.profiler.profile(activities=activities), step
            self._prof.start()
        self._mark = torch.profiler.record_function(f"step {step}")
        self._mark.__enter__()

    def end(self, step: int, last: bool = False) -> None:
        """After step `step`; last: no step follows (the run stops inside the window)."""
        if self._mark is None:
            return
        self._mark.__exit__(None, None, None)
        self._mark = None
        if step < self.high and not last:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._prof.stop()
        name = f"steps{self._first}-{step}_rank{self.rank}"
        files = [self._write(f"trace_{name}.json", self._prof.export_chrome_trace)]
        if self.memory_snapshot:
            files.append(self._write(f"memory_{name}.pickle", torch.cuda.memory._dump_snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
        self._prof = None
        self.written += files
        log.info("profile of steps %d-%d: %s", self._first, step, ", ".join(map(str, files)))

    def _write(self, name: str, dump) -> Path:
        path = self.out_dir / name
        tmp = path.with_name(".tmp." + name)  # the suffix stays: export_chrome_trace gzips a name ending in .gz
        path.parent.mkdir(parents=True, exist_ok=True)
        dump(str(tmp))
        os.replace(tmp, path)
        return path
