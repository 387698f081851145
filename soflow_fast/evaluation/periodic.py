"""Evaluation of the EMA weights while a run trains: sample grids every eval_demo_steps, FID every eval_steps (with
eval_fid_reference), and the digits quality report when the run reaches total_steps (quality_report).

Each is collective: the EMA weights are gathered on every rank (FSDP shards them). Rank 0 draws the sample grids
alone; the FID samples are spread over all ranks (each samples its chunks and extracts their features, rank 0
gathers, scores and writes: fid.evaluate_model_fid), with the same numbers on any world size. Samples run as the
precision mode's teacher calls do (sampling.sample_images).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import TrainConfig
from ..flow import Flow, derived_seed
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
        self._fid_tools: Optional[tuple] = None  # (reference statistics on rank 0, Inception, VAE): the first FID

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
                                   ema_info=cfg.ema_info)

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
        """FID, sFID, IS (and precision and recall when the reference has its pool features) of eval_num_samples EMA
        samples against eval_fid_reference, drawn by all ranks; rank 0 appends the record to metrics.jsonl."""
        from ..vae import load_vae
        from .fid import evaluate_model_fid, reference_stats
        from .inception import load_inception

        ema = self.ema_module()
        cfg, device = self.cfg, self.dist.device
        if self._fid_tools is None:
            inception = load_inception(cfg.eval_inception, device)
            # rank 0 scores; a reference batch with images but no stored pool features gets them computed here, once
            ref = reference_stats(cfg.eval_fid_reference, inception, cfg.eval_batch_size) if self.dist.is_main else None
            if ref is not None and ref.pool is None:
                log.info("%s holds no pool features (nor images): no precision and recall; `soflow-fast evaluate "
                         "--save-ref-stats` stores them", cfg.eval_fid_reference)
            self._fid_tools = (ref, inception, load_vae(cfg.eval_vae, device) if cfg.eval_vae else None)
        ref, inception, vae = self._fid_tools

        def sample_fn(c: int, k: int):  # chunk c's noise from (seed, c): the same at every evaluation and world size
            g = torch.Generator(device).manual_seed(derived_seed(cfg.seed + 1, c))
            x, _ = sample_images(ema, self.flow, k, nfe=cfg.eval_NFE, generator=g, vae=vae, precision=self.precision)
            return to_uint8_nhwc(x)

        res = evaluate_model_fid(sample_fn, cfg.eval_num_samples, ref, inception, cfg.eval_batch_size, self.dist)
        if res is None:
            return None
        rec = {"step": step, **res, "eval_NFE": cfg.eval_NFE}
        self.metrics.write(rec)
        extra = "  precision %.3f recall %.3f" % (res["precision"], res["recall"]) if "precision" in res else ""
        log.info("step %d  FID %.3f%s at %d NFE (%d samples)", step, res["fid"], extra, cfg.eval_NFE,
                 res["fid_num_samples"])
        return rec
