"""What a run reports: step statistics summed on the device, metrics.jsonl (and TensorBoard scalars), throughput,
MFU, memory, and the run log RUN_DIR/train.log.

A step never reads a device value (README "Training"): it adds its statistics to sums kept on the device
(`DeviceStats`), and the host reads them only at logging steps, where `MetricsLogger.log` writes one record of their
means per window to run_dir/metrics.jsonl; with `tensorboard: true` every number of every record also goes to
RUN_DIR/tensorboard/ under the same name (docs/cluster.md, "TensorBoard").
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

from .config import ConfigError, TrainConfig
from .errors import RunFailed, UserError
from .fileio import atomic_open
from .parallel import DistInfo, all_reduce_mean

log = logging.getLogger("soflow_fast")

# Dense bf16 peak TFLOP/s per device, for MFU (fp32 runs use TF32, half of it). Match on the CUDA device name.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1,
                    "A10": 125.0, "L4": 121.0}


class NonFiniteError(RunFailed, RuntimeError):
    """A step produced a non-finite loss or gradient (on_nonfinite 'stop'), or max_consecutive_skips steps in a row
    did (on_nonfinite 'skip')."""


def peak_flops(cfg: TrainConfig, device: torch.device, bf16: bool) -> Optional[float]:
    """Per-device peak FLOP/s for MFU: the config's peak_tflops, else the table; None when unknown (e.g. CPU)."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12 / (1 if bf16 else 2)
    return None


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB: process peak RSS


class DeviceStats:
    """Step statistics summed on the device between host reads, so that a step never waits for the device.

    A step adds its statistics unless its flag `found_inf` is set; such a step is counted instead, and the first one's
    step number, (rank-averaged) loss and gradient norm kept for the message, with the longest run of consecutive
    skipped steps (max_consecutive_skips). Sums are fp64: the values are fp32.
    """

    def __init__(self, device: torch.device):
        self.keys: list[str] = []
        self.sums: Optional[Tensor] = None  # [len(keys)]: sums over the finite steps since the last take_window
        self.finite = torch.zeros((), dtype=torch.float64, device=device)
        # count, then the first's step, loss, |g|, then the longest run of consecutive skips ending in this window
        self.bad = torch.zeros(5, dtype=torch.float64, device=device)
        self.streak = torch.zeros((), dtype=torch.float64, device=device)  # consecutive skips up to the last step

    def add(self, keys: list[str], values: Tensor, found_inf: Tensor, check: Tensor, step: int) -> None:
        """values [len(keys)]: one step's statistics; check: [loss, grad norm] as tested for finiteness; step: the
        step's number."""
        values = values.double()
        if self.sums is None:
            self.keys, self.sums = keys, torch.zeros_like(values)
        skip = found_inf.bool()
        self.sums += torch.where(skip, 0.0, values)
        self.finite += 1 - found_inf
        first = skip & (self.bad[0] == 0)
        self.bad[1] = torch.where(first, float(step), self.bad[1])
        self.bad[2:4] = torch.where(first, check.double(), self.bad[2:4])
        self.bad[0] += found_inf
        self.streak.copy_((self.streak + 1) * found_inf)
        self.bad[4] = torch.maximum(self.bad[4], self.streak)

    def take_window(self) -> tuple[dict[str, float], int]:
        """(mean of each statistic over the finite steps, averaged over ranks; their number) since the last call.
        A host read, and a collective under torchrun."""
        if self.sums is None:
            return {}, 0
        *sums, n = torch.cat([all_reduce_mean(self.sums), self.finite[None]]).tolist()
        self.sums.zero_()
        self.finite.zero_()
        return ({k: v / n for k, v in zip(self.keys, sums)} if n else {}), int(n)

    def take_nonfinite(self) -> tuple[int, int, float, float, int]:
        """(count, first step, its loss, its gradient norm, the longest run of consecutive ones) of the non-finite
        steps since the last call (a host read; the same on every rank: the flag is decided on all-reduced values).
        A run begun before the last call counts in full."""
        count, step, loss, grad_norm, longest = self.bad.tolist()
        self.bad.zero_()
        return int(count), int(step), loss, grad_norm, int(longest)


def summary_writer_class() -> type:
    """torch's TensorBoard SummaryWriter (offline: event files only); a ConfigError naming the key when the optional
    tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("config: tensorboard = true needs the tensorboard package (pip install tensorboard, or "
                          "pip install 'soflow_fast[tensorboard]')") from None
    return SummaryWriter


class MetricsLogger:
    """metrics.jsonl of a run (written by rank 0): one record per logging window, and any other record (FID); with
    tensorboard=True also their numbers as TensorBoard scalars in run_dir/tensorboard/."""

    def __init__(self, run_dir: Path, dist: DistInfo, global_batch: int, flops_per_step: Optional[float],
                 peak: Optional[float], tensorboard: bool = False):
        self.path, self.dist, self.global_batch = Path(run_dir) / "metrics.jsonl", dist, global_batch
        self.flops_per_step, self.peak = flops_per_step, peak
        self.stats = DeviceStats(dist.device)
        self.skipped = 0  # non-finite steps so far, as of the last host read (take_nonfinite)
        self.tensorboard = None
        if tensorboard:  # checked on every rank, so that a missing package stops them alike; rank 0 writes
            writer = summary_writer_class()
            self.tensorboard = writer(str(Path(run_dir) / "tensorboard")) if dist.is_main else None

    def write(self, rec: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.tensorboard is not None:
            for key, value in rec.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, rec["step"])
            self.tensorboard.flush()  # a preempted job keeps everything logged so far

    def keep_until(self, step: int) -> None:
        """Drop the records after `step` (and a line cut short by a kill), rewriting the file atomically, and hide
        TensorBoard's: a run that starts at `step` logs the later steps again, and each step appears once. Rank 0."""
        lines = self.path.read_text().splitlines(keepends=True) if self.path.is_file() else []
        kept = [line for line in lines if _record_step(line) <= step]
        if len(kept) < len(lines):
            with atomic_open(self.path, "w") as fh:
                fh.writelines(kept)
            log.info("%s: dropped %d record(s) after step %d, where this run starts", self.path, len(lines) - len(kept),
                     step)
        if self.tensorboard is not None:  # TensorBoard's way to hide earlier runs' events after `step`
            self.tensorboard.close()
            self.tensorboard = type(self.tensorboard)(self.tensorboard.log_dir, purge_step=step + 1)

    def take_nonfinite(self, step: int, stop: bool, max_consecutive: int = 0) -> None:
        """Add the non-finite steps since the last read (a host sync) to `skipped`; with `stop`, raise NonFiniteError
        for the first, and with max_consecutive > 0 once that many consecutive steps were skipped (a diverged run).
        Their updates were skipped on the device, so they never touched the weights, the optimizer state or the EMA;
        finite steps after them, up to this read, did update them."""
        count, first, loss, grad_norm, longest = self.stats.take_nonfinite()
        if not count:
            return
        self.skipped += count
        what = f"step {first}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}"
        if stop:
            raise NonFiniteError(f"{what} ({loss}); the weights were not updated by it (skipped on the device; found "
                                 f"at step {step}, {count} non-finite step(s) since the last check). "
                                 "Lower learning_rate, set grad_clip, or set on_nonfinite: skip")
        if max_consecutive and longest >= max_consecutive:
            raise NonFiniteError(f"diverged: {longest} consecutive steps were non-finite up to step {step} "
                                 f"(max_consecutive_skips = {max_consecutive}; the first since the last check: "
                                 f"{what}). "
                                 "The newest checkpoint without skipped steps is kept: resume from it (resume_from) "
                                 "with a lower learning_rate or a grad_clip")
        log.warning("%s: step skipped (%d non-finite step(s) skipped up to step %d)", what, count, step)

    def log(self, step: int, elapsed: float, lr: float) -> Optional[dict]:
        """Read the statistics summed since the last log (collective) and append their means, throughput, MFU,
        skipped steps, the learning rate and every rank's peak memory to metrics.jsonl; returns the record on the
        main rank. Call take_nonfinite first."""
        means, n = self.stats.take_window()
        device = self.dist.device
        # every rank's peak, gathered by a sum over one-hot slots (works on gloo and NCCL alike)
        mem = torch.zeros(self.dist.world_size, device=device if device.type == "cuda" else "cpu")
        mem[self.dist.rank] = peak_memory_gb(device)
        if self.dist.enabled:
            torch.distributed.all_reduce(mem)
        per_rank = [round(m, 3) for m in mem.tolist()]
        peak_mem = max(per_rank)
        if not self.dist.is_main:
            return None
        per_s = n / max(elapsed, 1e-9)
        tflops = self.flops_per_step * per_s / 1e12 if self.flops_per_step else None
        world = self.dist.world_size
        rec = {"step": step, **means, "images_per_s": per_s * self.global_batch,
               "images_per_s_per_device": per_s * self.global_batch / world,
               "model_tflops": tflops, "mfu": tflops * 1e12 / world / self.peak if self.peak and tflops else None,
               "skipped": self.skipped, "lr": lr, "peak_mem_gb": peak_mem, "peak_mem_gb_per_rank": per_rank}
        self.write(rec)
        nan = float("nan")
        log.info("step %d  loss %.4f  fm %.4f (mse %.4f w %.3f)  cons %.4f (mse %.4f w %.3f)  |g| %.3f  %.1f img/s"
                 "  %.3f TFLOP/s%s  mem %.2f GB", step, rec.get("loss", nan), rec.get("loss_fm", nan),
                 rec.get("mse_fm", nan), rec.get("weight_fm", nan), rec.get("loss_c", nan), rec.get("mse_c", nan),
                 rec.get("weight_c", nan), rec.get("grad_norm", nan), rec["images_per_s"], tflops or nan,
                 f" (MFU {rec['mfu']:.1%})" if rec["mfu"] else "", peak_mem)
        return rec


def _record_step(line: str) -> float:
    """A metrics.jsonl line's step; infinite for a line that is not a whole record (cut short by a kill)."""
    try:
        return float(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


@contextlib.contextmanager
def run_log(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Copy the soflow_fast log (what the console shows, the progress bar aside) into RUN_DIR/train.log, appended to
    across resumes and requeues; the error that ends a run is written there too (its traceback when it is a bug)."""
    if not enabled:
        yield
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(run_dir) / "train.log", mode="a")
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    level = log.level
    if not log.isEnabledFor(logging.INFO):  # the log holds INFO records whatever the root logger's level
        log.setLevel(logging.INFO)
    try:
        yield
    except BaseException as e:
        trace = None if isinstance(e, (UserError, RunFailed)) else sys.exc_info()
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "stopped: %s: %s",
                                      (type(e).__name__, e), trace))
        raise
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()
