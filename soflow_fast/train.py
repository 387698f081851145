"""The training loop: get batch, SoFlow loss (three network calls), backward, clip, step, EMA, log, checkpoint.

Re-running on an existing run directory resumes from its latest checkpoint and continues exactly (the data
position, the step-noise generator and the global RNG states are all in the checkpoint).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from . import checkpoint as ckpt_io
from . import ops
from .config import ConfigError, TrainConfig
from .data.loader import TensorLoader
from .flow import sample
from .images import save_grid, to_uint8_nhwc
from .models import DiT, DiTConfig, build_model
from .step import SoFlowHParams, draw_noise, soflow_loss

log = logging.getLogger("soflow_fast")


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient (and on_nonfinite is 'stop')."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config: device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """None = fp32. auto: bf16 on CUDA devices that support it, fp32 elsewhere."""
    if precision == "fp32" or (precision == "auto" and not (device.type == "cuda" and torch.cuda.is_bf16_supported())):
        return None
    return torch.bfloat16


def dataset_for(cfg: TrainConfig, device: torch.device) -> tuple[TensorLoader, int, int]:
    """(loader, in_channels, num_classes) for the config's dataset."""
    if cfg.dataset_type != "digits":
        raise ConfigError(f"config: dataset_type = {cfg.dataset_type!r} is not supported by this version "
                          "(its loader has not landed yet); use 'digits'")
    from .data.digits import IMAGE_SHAPE, NUM_CLASSES, load_digits_split

    if cfg.data_size != IMAGE_SHAPE[-1]:
        raise ConfigError(f"config: data_size = {cfg.data_size}: the digits are {IMAGE_SHAPE[-1]}x{IMAGE_SHAPE[-1]}")
    x, y, _, _ = load_digits_split()
    num_classes = NUM_CLASSES if cfg.num_classes is None else cfg.num_classes
    if num_classes not in (0, NUM_CLASSES):
        raise ConfigError(f"config: num_classes = {num_classes}: the digits have {NUM_CLASSES} classes (or 0)")
    return TensorLoader(x, y if num_classes else None, cfg.batch_size, cfg.seed, device), IMAGE_SHAPE[0], num_classes


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """The EMA decay at finished step k; with ema_warmup, (1 + k) / (10 + k) caps it early in a run."""
    return min(cfg.ema_decay_rate, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay_rate


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Optional[str | os.PathLike] = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.working_dir)
        self.device = resolve_device(cfg.device)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere and newer, as the reference
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.seed)
        self.loader, in_ch, num_classes = dataset_for(cfg, self.device)
        overrides = {k: getattr(cfg, k) for k in ("hidden_size", "depth", "num_heads", "patch_size")
                     if getattr(cfg, k) is not None}
        self.model = build_model(cfg.model_type, input_size=cfg.data_size, in_channels=in_ch, num_classes=num_classes,
                                 null_class=cfg.cfg_drop_rate > 0, kernels=cfg.kernels, device=self.device, **overrides)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)
        if cfg.optimizer != "adamw":
            raise ConfigError(f"config: optimizer = {cfg.optimizer!r} is not available in this version; use 'adamw'")
        self.flow, self.hp = cfg.flow, cfg.hparams
        self.noise_gen = torch.Generator(self.device).manual_seed(cfg.seed)
        self.step = 0
        self.skipped = 0
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._resume()

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        model_cfg = {k: v for k, v in dataclasses.asdict(self.model.cfg).items() if k != "kernels"}
        rng = {"cpu": torch.get_rng_state(), "noise": self.noise_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"format": ckpt_io.FORMAT, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step, "skipped": self.skipped,
                "data": self.loader.state_dict(), "rng": rng, "config": self.cfg.to_dict(),
                "model_config": model_cfg, "flow": {"noising": self.flow.noising, "coefficient": self.flow.coefficient}}

    def save(self) -> Path:
        path = ckpt_io.checkpoint_path(self.run_dir, self.step)
        ckpt_io.atomic_save(self.state_dict(), path)
        ckpt_io.prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        return path

    def _resume(self) -> None:
        path = ckpt_io.latest_checkpoint(self.run_dir)
        if path is None:
            return
        ck = ckpt_io.load_checkpoint(path)
        from .models.reference import load_state_strict

        load_state_strict(self.model, ck["model"], f"checkpoint {path} [model]")
        load_state_strict(self.ema, ck["ema"], f"checkpoint {path} [ema]")
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise ValueError(f"checkpoint {path}: optimizer state does not fit this model ({e})") from None
        self.step, self.skipped = int(ck["step"]), int(ck.get("skipped", 0))
        self.loader.load_state_dict(ck["data"])
        torch.set_rng_state(ck["rng"]["cpu"])
        self.noise_gen.set_state(ck["rng"]["noise"])
        if "cuda" in ck["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ck["rng"]["cuda"], self.device)
        log.info("resumed from %s at step %d", path, self.step)

    # -- one step -----------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, x0: Tensor, y: Optional[Tensor]) -> Optional[dict[str, float]]:
        """One optimizer step; returns the step's statistics, or None when on_nonfinite='skip' skipped it."""
        self.model.train()
        guided = y is not None and self.hp.cfg_scale > 1.0
        noise = draw_noise(self.hp, x0, guided, self.noise_gen)
        with self._autocast():
            out = soflow_loss(self.model, self.flow, self.hp, x0, y, noise, self.step, self.model.null_label,
                              loss_impl=self.model.cfg.kernels)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if not (torch.isfinite(out.loss) and torch.isfinite(grad_norm)):
            what = f"step {self.step + 1}: non-finite {'loss' if not torch.isfinite(out.loss) else 'gradient norm'}"
            if self.cfg.on_nonfinite == "stop":
                raise NonFiniteError(f"{what} ({out.loss.item()}); the weights were not updated. "
                                     "Lower learning_rate, set grad_clip, or set on_nonfinite: skip")
            log.warning("%s: step skipped", what)
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.step += 1
            return None
        self.optimizer.step()
        with torch.no_grad():
            ema_p = list(self.ema.parameters())
            torch._foreach_lerp_(ema_p, list(self.model.parameters()), 1.0 - ema_decay(self.cfg, self.step))
        self.step += 1
        stats = {k: v.item() for k, v in out.stats.items()}
        stats.update(loss=out.loss.item(), grad_norm=grad_norm.item())
        return stats

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, max_steps: Optional[int] = None, progress: bool = True) -> None:
        cfg = self.cfg
        end = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        log.info("device %s, precision %s, kernels %s, attention %s, params %.2fM, steps %d -> %d",
                 self.device, self.amp_dtype or "fp32", self.model.cfg.kernels, self._attention_backend(),
                 sum(p.numel() for p in self.params) / 1e6, self.step, end)
        bar = _progress(self.step, end, progress)
        acc: dict[str, float] = {}
        n_acc, t0 = 0, time.perf_counter()
        while self.step < end:
            x0, y = self.loader.next()
            stats = self.train_step(x0, y)
            if stats is not None:
                for k, v in stats.items():
                    acc[k] = acc.get(k, 0.0) + v
                n_acc += 1
            bar(self.step, stats)
            if self.step % cfg.logging_steps == 0 or self.step == end:
                elapsed = time.perf_counter() - t0
                self._log_metrics(acc, n_acc, elapsed)
                acc, n_acc, t0 = {}, 0, time.perf_counter()
            if cfg.eval_demo_steps and self.step % cfg.eval_demo_steps == 0:
                self.sample_grid()
            if self.step % cfg.ckpt_saving_steps == 0 or self.step == end:
                self.save()
        bar(None, None)

    def _log_metrics(self, acc: dict[str, float], n: int, elapsed: float) -> None:
        steps = max(n, 1)
        rec = {"step": self.step, **{k: v / steps for k, v in acc.items()},
               "images_per_s": n * self.cfg.batch_size / max(elapsed, 1e-9), "skipped": self.skipped,
               "lr": self.optimizer.param_groups[0]["lr"], "peak_mem_gb": _peak_memory_gb(self.device)}
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        log.info("step %d  loss %.4f  fm %.4f (mse %.4f w %.3f)  cons %.4f (mse %.4f w %.3f)  |g| %.3f  %.1f img/s",
                 self.step, rec.get("loss", float("nan")), rec.get("loss_fm", float("nan")),
                 rec.get("mse_fm", float("nan")), rec.get("weight_fm", float("nan")), rec.get("loss_c", float("nan")),
                 rec.get("mse_c", float("nan")), rec.get("weight_c", float("nan")), rec.get("grad_norm", float("nan")),
                 rec["images_per_s"])

    @torch.no_grad()
    def sample_grid(self) -> Path:
        """A grid of 1-NFE EMA samples (labels cycling through the classes) in run_dir/samples/."""
        rows, cols = self.cfg.eval_demo_shape
        n = rows * cols
        g = torch.Generator(self.device).manual_seed(self.cfg.seed)
        x1 = torch.randn((n, self.model.cfg.in_channels, self.cfg.data_size, self.cfg.data_size), generator=g,
                         device=self.device)
        y = torch.arange(n, device=self.device) % self.model.cfg.num_classes if self.model.cfg.num_classes else None
        with self._autocast():
            x = sample(self.ema, self.flow, x1, nfe=self.cfg.eval_NFE, y=y, generator=g)
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        save_grid(to_uint8_nhwc(x), rows, cols, path, upscale=4 if self.cfg.data_size <= 16 else 1)
        return path

    def _write_config(self) -> None:
        import yaml

        path = self.run_dir / "config.yaml"
        tmp = path.with_name("config.yaml.tmp")
        tmp.write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        os.replace(tmp, path)

    def _attention_backend(self) -> str:
        probe = torch.empty(1, 1, 1, self.model.cfg.hidden_size // self.model.cfg.num_heads, device=self.device,
                            dtype=self.amp_dtype or torch.float32)
        return ops.attention_backend(probe)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB: process peak RSS


def _progress(start: int, end: int, enabled: bool) -> Callable:
    """A one-line console progress bar (redrawn in place on a terminal, every 10% otherwise)."""
    tty = sys.stderr.isatty()
    t0, first = time.perf_counter(), start

    def update(step: Optional[int], stats: Optional[dict]) -> None:
        if not enabled:
            return
        if step is None:
            if tty:
                sys.stderr.write("\n")
            return
        frac = step / max(end, 1)
        if not tty and step != end and step % max((end - first) // 10, 1):
            return
        rate = (step - first) / max(time.perf_counter() - t0, 1e-9)
        eta = (end - step) / rate if rate > 0 else float("nan")
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        loss = f" loss {stats['loss']:.4f}" if stats else ""
        line = f"[{bar}] {step}/{end} {rate:.1f} it/s eta {eta:.0f}s{loss}"
        sys.stderr.write("\r" + line if tty else line + "\n")
        sys.stderr.flush()

    return update


def model_from_checkpoint(ck: dict, weights: str = "ema", kernels: str = "eager",
                          device: torch.device | str = "cpu") -> DiT:
    """Rebuild the network a checkpoint describes and load its EMA (default) or raw weights."""
    from .models.reference import load_state_strict

    impl = ops.resolve_kernels(kernels, device)
    model = DiT(DiTConfig(**ck["model_config"], kernels=impl))
    load_state_strict(model, ck[weights], f"checkpoint [{weights}]")
    return model.to(device).eval()
