"""Evaluation of the EMA weights while a run trains: sample grids every eval_demo_steps, FID every eval_steps (with
eval_fid_reference), and the digits quality report when the run reaches total_steps (quality_report).

Each is collective: the EMA weights are gathered on every rank (FSDP shards them); rank 0 samples, scores and
writes. Samples run as the precision mode's teacher calls do (sampling.sample_images).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import TrainConfig
from ..flow import Flow
from ..images import save_grid, to_uint8_nhwc
from ..metrics import MetricsLogger
from ..parallel import DistInfo
from ..precision import Precision
from ..sampling import sample_images

log = logging.getLogger("soflow_fast")


class Evaluator:
    def __init__(self, cfg: TrainConfig, run_dir: Path, dist: DistInfo, flow: Flow, precision: Precision,
                 ema_module: Callable[[], torch.nn.Module], metrics: MetricsLogger):
        """ema_module() -> a plain network holding the whole EMA weights (collective)."""
        self.cfg, self.run_dir, self.dist, self.flow, self.precision = cfg, Path(run_dir), dist, flow, precision
        self.ema_module, self.metrics = ema_module, metrics
        self._fid_tools: Optional[tuple] = None  # (reference statistics, Inception, VAE), loaded at the first FID

    def after_step(self, step: int) -> None:
        cfg = self.cfg
        if cfg.eval_demo_steps and step % cfg.eval_demo_steps == 0:
            self.sample_grid(step)
        if cfg.eval_steps and cfg.eval_fid_reference and step % cfg.eval_steps == 0:
            self.evaluate_fid(step)

    def at_end(self, step: int) -> None:
        """The digits quality report, once the run has reached total_steps."""
        cfg = self.cfg
        if cfg.dataset_type == "digits" and cfg.quality_report and step >= cfg.total_steps:
            from .digits_quality import run_quality_report

            ema = self.ema_module()
            if self.dist.is_main:
                run_quality_report(ema, self.flow, self.run_dir, seed=cfg.seed, step=step,
                                   ema_info={"ema_decay_rate": cfg.ema_decay_rate, "ema_warmup": cfg.ema_warmup})

    def sample_grid(self, step: int) -> Optional[Path]:
        """A grid of EMA samples (labels cycling through the classes) in run_dir/samples/."""
        ema = self.ema_module()
        if not self.dist.is_main:
            return None
        rows, cols = self.cfg.eval_demo_shape
        n = rows * cols
        device = self.dist.device
        classes = getattr(ema.cfg, "num_classes", 0)
        labels = torch.arange(n, device=device) % classes if classes else None
        g = torch.Generator(device).manual_seed(self.cfg.seed)
        x, _ = sample_images(ema, self.flow, n, nfe=self.cfg.eval_NFE, generator=g, labels=labels,
                             precision=self.precision)
        path = self.run_dir / "samples" / f"step_{step:08d}.png"
        save_grid(to_uint8_nhwc(x), rows, cols, path, upscale=4 if self.cfg.data_size <= 16 else 1)
        return path

    def evaluate_fid(self, step: int) -> Optional[dict]:
        """FID (and IS) of eval_num_samples EMA samples against eval_fid_reference, appended to metrics.jsonl."""
        from ..vae import load_vae
        from .fid import evaluate_model_fid, load_reference_stats
        from .inception import load_inception

        ema = self.ema_module()
        if not self.dist.is_main:
            return None
        cfg, device = self.cfg, self.dist.device
        if self._fid_tools is None:
            self._fid_tools = (load_reference_stats(cfg.eval_fid_reference), load_inception(cfg.eval_inception, device),
                               load_vae(cfg.eval_vae, device) if cfg.eval_vae else None)
        ref, inception, vae = self._fid_tools
        g = torch.Generator(device).manual_seed(cfg.seed + 1)  # the same noise at every evaluation

        def sample_fn(k: int):
            x, _ = sample_images(ema, self.flow, k, nfe=cfg.eval_NFE, generator=g, vae=vae, precision=self.precision)
            return to_uint8_nhwc(x)

        res = evaluate_model_fid(sample_fn, cfg.eval_num_samples, ref, inception, cfg.eval_batch_size)
        rec = {"step": step, **res, "eval_NFE": cfg.eval_NFE}
        self.metrics.write(rec)
        log.info("step %d  FID %.3f at %d NFE (%d samples)", step, res["fid"], cfg.eval_NFE, res["fid_num_samples"])
        return rec
