"""The training loop: get batch, SoFlow loss (three network calls), backward, clip, step, EMA, log, checkpoint.

Runs as one process or under torchrun (parallel: ddp | fsdp). The global batch is the config's batch_size; each of
W ranks takes B/W rows, in micro-batches of micro_batch_size with gradient accumulation. Each micro-batch is split
into FM and consistency rows as the reference splits each GPU's batch, and its randomness is drawn from a generator
seeded by (seed, step, micro-batch index), so a run is reproducible, and resumable exactly, on any world size.

`Trainer` wires the components (docs/architecture.md): the data (data/build.py), the network and its parallelism
(models/, parallel.py), the EMA (ema.py), the optimizer (optim.py), metrics (metrics.py), evaluation
(evaluation/periodic.py), checkpoints (checkpoint.py), where a run starts (resume.py: the checkpoint, config changes,
init_from) and stop requests (signals.py); it owns only `train_step` and `fit`.

A step never waits for the device (no host read of a device value; the EDM augmentation, data/augment.py, excepted),
so the host can queue steps ahead of the GPU. A non-finite loss or gradient norm sets a device flag that makes that
step's optimizer and EMA updates no-ops; the statistics and the count of such steps are summed on the device and read
only at logging steps and saves, where on_nonfinite 'stop', or max_consecutive_skips consecutive skipped steps, raise
(metrics.py: `DeviceStats`, `NonFiniteError`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import yaml
from torch import Tensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .attention import attention_for_model
from .checkpoint import Checkpointer, check_same_model, consolidate, load_state_strict, read_meta
from .config import ConfigError, TrainConfig
from .data.augment import AugmentConfig, AugmentPipe
from .data.build import build_data
from .ema import EMA
from .evaluation.periodic import Evaluator
from .fileio import atomic_open
from .flow import derived_seed
from .kernel_ops import kernel_ops_for
from .metrics import MetricsLogger, peak_flops
from .models import build_model, describe
from .optim import build_optimizer, optimizer_backends
from .parallel import (all_reduce_mean, check_cuda_graphs, compile_backend, full_tensor, init_distributed, parallelize,
                       resolve_compile)
from .precision import emulated, numerics, resolve_precision
from .profiling import ProfileWindow
from .resume import config_changes, group_settings, plan_start, restore_group_settings, set_aside_newer
from .signals import GracefulStop
from .step import compiled_loss, draw_noise, is_stochastic, soflow_loss

log = logging.getLogger("soflow_fast")

# The last key of derived_seed for a micro-batch's dropout seed: a stream apart from its noise generator's.
DROPOUT_STREAM = 1


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Optional[str | os.PathLike] = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.working_dir)
        self.dist = init_distributed(cfg.device)
        W, self.device = self.dist.world_size, self.dist.device
        if W > 1 and cfg.parallel == "none":
            raise ConfigError(f"config: parallel = 'none' but torchrun started {W} ranks; use ddp or fsdp")
        if cfg.batch_size % W:
            raise ConfigError(f"config: batch_size = {cfg.batch_size} is not divisible by the world size {W}")
        local = cfg.batch_size // W
        self.micro = cfg.micro_batch_size or local
        if local % self.micro:
            raise ConfigError(f"config: micro_batch_size = {cfg.micro_batch_size} does not divide the per-rank "
                              f"batch {local} (batch_size {cfg.batch_size} / world size {W})")
        self.accum = local // self.micro
        cfg.check_files()  # a path read only at the first evaluation fails now, not after hours of steps
        resume_path = plan_start(cfg, self.run_dir, self.dist.is_main)
        meta = read_meta(resume_path) if resume_path else None
        changes = config_changes(meta.get("config", {}), cfg, f"checkpoint {resume_path}") if meta else []
        init = None if resume_path or not cfg.init_from else _read_init(cfg.init_from)
        try:
            self.precision = resolve_precision(cfg.precision, self.device, secant=cfg.model_type.startswith("DiT"))
            self.compile = resolve_compile(cfg.compile, self.device)
            if cfg.cuda_graphs:
                check_cuda_graphs(self.compile, self.device, cfg.parallel)
            self.attention = attention_for_model(cfg.attention, cfg.model_type, self.device, self.precision,
                                                 cfg.hidden_size, cfg.num_heads)
        except ValueError as e:
            raise ConfigError(f"config: {e}") from None
        if self.compile != "none" and emulated(self.precision, self.device):
            raise ConfigError(f"config: compile = {cfg.compile!r} with precision {self.precision.name!r} on a CPU: the "
                              "bf16 emulator runs eagerly; set compile: none (or auto), or precision: fp32")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere and newer, as the reference
            torch.backends.cudnn.allow_tf32 = True
        data = build_data(cfg, self.dist, self.run_dir)
        self.loader = data.loader
        overrides = {k: getattr(cfg, k) for k in ("hidden_size", "depth", "num_heads", "patch_size")
                     if getattr(cfg, k) is not None}
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.net = build_model(cfg.model_type, input_size=cfg.data_size, in_channels=data.in_channels,
                               num_classes=data.num_classes, null_class=cfg.cfg_drop_rate > 0, kernels=cfg.kernels,
                               device=self.device, attention=self.attention.fn, **overrides)
        self.kernel_ops = kernel_ops_for(self.net.cfg.kernels, self.device.type)  # the loss functions
        if init is not None:  # before the EMA copies the weights and the parallel wrappers shard them
            source = f"config: init_from = {cfg.init_from!r}"
            weights = "model" if "model" in init else "ema"  # a safetensors export holds one set
            try:
                check_same_model(source, init["model_config"], describe(self.net))
                load_state_strict(self.net, init[weights], source)
            except (KeyError, ValueError) as e:
                raise ConfigError(e.args[0]) from None
            log.info("init_from %s: the %s weights of step %d (the EMA starts from them; a fresh optimizer; step 0)",
                     cfg.init_from, "raw" if weights == "model" else "EMA", init["step"])
        # A config written for torchrun also runs as one plain process: without a process group, no wrapper.
        self.parallel = cfg.parallel if self.dist.enabled else "none"
        fsdp = self.parallel == "fsdp"
        try:
            self.model = parallelize(self.net, self.parallel,
                                     param_dtype=self.precision.fsdp_param_dtype if fsdp else None,
                                     activation_checkpointing=cfg.activation_checkpointing, compile=self.compile,
                                     device=self.device, cuda_graphs=cfg.cuda_graphs,
                                     reshard_after_forward=None if cfg.reshard_after_forward == "auto"
                                     else cfg.reshard_after_forward)
        except ValueError as e:
            raise ConfigError(f"config: {e}") from None
        if self.compile == "step" and is_stochastic(self.net):
            raise ConfigError(f"config: compile = 'step' needs a network without dropout ({cfg.model_type} has it); "
                              "use compile: model")
        self.loss_fn = compiled_loss(compile_backend(), cfg.cuda_graphs) if self.compile == "step" else soflow_loss
        named = list(self.model.named_parameters())  # in place under FSDP2 and replicate: the network's names
        self.params = [p for _, p in named]
        self.trainable = [p for p in self.params if p.requires_grad]
        self.ema = EMA([n for n, _ in named], self.params, cfg.ema_decay_rate, cfg.ema_warmup, cfg.resolved_ema_every,
                       cfg.ema_power)
        self.optimizer_kind = cfg.resolved_optimizer
        if self.optimizer_kind == "fused_adamw_ema" and fsdp:
            raise ConfigError("config: optimizer = 'fused_adamw_ema' takes plain tensors, not FSDP shards; "
                              "use 'adamw' with parallel: fsdp")
        try:
            self.optimizer = build_optimizer(self.optimizer_kind, self.params, lr=cfg.learning_rate,
                                             betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                             ema_params=self.ema.tensors, ema_decay=cfg.ema_decay_rate,
                                             capturable=cfg.cuda_graphs)
        except RuntimeError as e:
            raise ConfigError(f"config: optimizer = {cfg.optimizer!r}: {e}") from None
        p = cfg.resolved_augment_p
        if p > 0 and getattr(self.net.cfg, "augment_dim", 0) == 0:
            raise ConfigError(f"config: augment_p = {p} needs a network with augment-label input (model_type UNet)")
        self.augment = AugmentPipe(AugmentConfig(p=p)) if p > 0 else None
        self.flow, self.hp = cfg.flow, cfg.hparams
        macs = getattr(self.net.cfg, "forward_macs", None)  # known for the DiT (docs/algorithm.md section 8)
        guided = data.num_classes > 0 and self.hp.cfg_scale > 1
        flops = 2 * macs() * self.hp.forward_equivalents(self.micro, guided) * self.accum * W if macs else None
        self.metrics = MetricsLogger(self.run_dir, self.dist, cfg.batch_size, flops,
                                     peak_flops(cfg, self.device, self.precision.any_bf16), cfg.tensorboard)
        self.profiler = ProfileWindow(cfg.profile_steps, cfg.memory_snapshot, self.run_dir / "profile", self.device,
                                      self.dist.rank, "config: memory_snapshot = true")
        self.evaluator = Evaluator(cfg, self.run_dir, self.dist, self.flow, self.precision, self.ema_module,
                                   self.metrics)
        self.checkpointer = Checkpointer(self.run_dir, cfg.keep_checkpoints, self.dist.is_main)
        self.step = 0
        if resume_path is not None:
            self._resume(resume_path, meta, changes)
        self._skipped_at_save = self.skipped  # a checkpoint is clean when no step was skipped since the last one
        if self.dist.is_main:
            self.metrics.keep_until(self.step)  # the steps after it are logged again by this run

    def _resume(self, path: Path, meta: dict, changes: list[str]) -> None:
        """Collective: load the checkpoint `path` (resume.plan_start) and apply the config's changes (resume.py)."""
        if self.dist.is_main:
            set_aside_newer(self.run_dir, int(meta["step"]))
            for change in changes:
                log.info("resume: %s", change)
        settings = group_settings(self.optimizer)  # the config's learning rate, betas, ...
        self.checkpointer.resume(path, self.model, self.optimizer, self.ema.state_dict(), describe(self.net))
        restore_group_settings(self.optimizer, settings)  # ... over the saved ones
        self.step, self.metrics.skipped = int(meta["step"]), int(meta.get("skipped", 0))
        self.loader.load_state_dict(meta["data"])

    def ema_module(self) -> torch.nn.Module:
        """A plain network holding the whole EMA weights (collective under FSDP: every rank must call it)."""
        return self.ema.module(self.net, self.device, self.attention.fn)

    def save(self) -> Path:
        """Collective: a checkpoint of this step (every rank writes its shards)."""
        self._take_nonfinite()  # the meta's skipped count; a sync point anyway
        clean, self._skipped_at_save = self.skipped == self._skipped_at_save, self.skipped
        meta = {"step": self.step, "skipped": self.skipped, "clean": clean, "data": self.loader.state_dict(),
                "config": self.cfg.to_dict(), "model_config": describe(self.net), "world_size": self.dist.world_size,
                "flow": {"noising": self.flow.noising, "coefficient": self.flow.coefficient}}
        return self.checkpointer.save(self.step, self.model, self.optimizer, self.ema.state_dict(), meta)

    def train_step(self, x0: Tensor, y: Optional[Tensor]) -> dict[str, Tensor]:
        """One optimizer step on this rank's rows, with no host read of a device value. Returns this rank's statistics
        as 0-dim device tensors: the loss terms, grad_norm, and nonfinite (1.0 when the loss or gradient norm was not
        finite: then the optimizer and EMA updates were no-ops, and the next `_take_nonfinite` reports the step)."""
        self.model.train()
        if self.cfg.cuda_graphs:  # a new step for CUDA graph trees: last step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        guided = y is not None and self.hp.cfg_scale > 1.0
        self.optimizer.zero_grad(set_to_none=True)
        values = None
        for a in range(self.accum):
            rows = slice(a * self.micro, (a + 1) * self.micro)
            xm, ym = x0[rows], None if y is None else y[rows]
            index = self.dist.rank * self.accum + a  # the GLOBAL micro-batch index keys the randomness
            # Seeded on the host each micro-batch; with cuda_graphs the draws stay graph-safe because they run here,
            # eagerly, outside the captured graphs, which capture only the compiled network's calls.
            gen = torch.Generator(self.device).manual_seed(derived_seed(self.cfg.seed, self.step, index))
            noise = draw_noise(self.hp, xm, guided, gen,
                               dropout_seed=derived_seed(self.cfg.seed, self.step, index, DROPOUT_STREAM))
            aug = None
            if self.augment is not None:
                xm, aug = self.augment(xm, gen)
            if self.parallel != "none":  # FSDP2 and replicate: all-reduce gradients only on the last micro-batch
                self.model.set_requires_gradient_sync(a == self.accum - 1)
            with numerics(self.precision, self.device):
                out = self.loss_fn(self.model, self.flow, self.hp, xm, ym, noise, self.step, self.net.null_label,
                                   kernel_ops=self.kernel_ops, augment_labels=aug, precision=self.precision)
                (out.loss / self.accum).backward()
            part = torch.stack([out.loss.detach(), *out.stats.values()]).float() / self.accum
            values = part if values is None else values + part
        # clip to grad_clip; without it the gradients are left untouched (clipping to an infinite norm would scale)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip) if self.cfg.grad_clip > 0
                     else torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None]))
        grad_norm = full_tensor(grad_norm).float()
        check = all_reduce_mean(torch.stack([values[0], grad_norm]))
        found_inf = torch.isfinite(check).all().logical_not().float()
        lr = self.cfg.lr_at(self.step)  # the schedule's, set every step: a host float, no sync
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ema.step(self.optimizer, self.step, found_inf)
        keys, values = ["loss", *out.stats, "grad_norm"], torch.cat([values, grad_norm[None]])
        self.metrics.stats.add(keys, values, found_inf, check, self.step + 1)
        self.step += 1
        return {**dict(zip(keys, values)), "nonfinite": found_inf}

    @property
    def skipped(self) -> int:
        """Non-finite steps so far, as of the last host read (`_take_nonfinite`)."""
        return self.metrics.skipped

    def _take_nonfinite(self) -> None:
        """Read the non-finite steps since the last read (a host sync: at logging steps and saves); with
        on_nonfinite 'stop', or max_consecutive_skips reached, raise NonFiniteError (metrics.MetricsLogger)."""
        self.metrics.take_nonfinite(self.step, stop=self.cfg.on_nonfinite == "stop",
                                    max_consecutive=self.cfg.max_consecutive_skips)

    def fit(self, max_steps: Optional[int] = None, progress: bool = True) -> bool:
        """Train to total_steps (or max_steps); ends with the digits quality report once total_steps is reached.

        SIGTERM, SIGINT or SIGUSR1 (signals.py) save a checkpoint at the next step boundary the ranks agree on and
        end the loop: then it returns True (the CLI exits with signals.EXIT_STOPPED), else False. A step's checkpoint
        is written before its evaluation, so a failing evaluation loses no steps."""
        cfg = self.cfg
        end = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
        if self.dist.is_main:
            self._log_start(end)
        # the bar shows the last logged loss (reading one per step would sync); redrawn rarely into a log file
        bar = tqdm(total=end, initial=self.step, unit="step", disable=not (progress and self.dist.is_main),
                   mininterval=1 if sys.stderr.isatty() else 60, dynamic_ncols=True)
        t0 = time.perf_counter()
        compiling = self.compile != "none" and self.dist.is_main  # the first step traces and compiles each call
        with GracefulStop(save_minutes=cfg.save_every_minutes) as stop, _bar_safe_logging(bar):
            while self.step < end:
                self.profiler.begin(self.step + 1)
                x0, y = self.loader.next()
                t_step = time.perf_counter()
                self.train_step(x0, y)
                at = stop.at_step(self.step)  # collective on check steps under torchrun
                self.profiler.end(self.step, last=self.step == end or at.stop)
                if compiling:  # tracing and compiling run on the host, so host time measures them
                    log.info("compiled in %.1f s (compile %s; the first step, compiling included)",
                             time.perf_counter() - t_step, self.compile)
                    compiling = False
                if self.step % cfg.logging_steps == 0 or self.step == end or at.stop:
                    self._take_nonfinite()
                    rec = self.metrics.log(self.step, time.perf_counter() - t0, self.optimizer.param_groups[0]["lr"])
                    t0 = time.perf_counter()
                    if rec and "loss" in rec:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
                bar.update()
                if at.save or self.step % cfg.ckpt_saving_steps == 0 or self.step == end:
                    self.save()  # before this step's evaluation: an evaluation that fails loses no steps
                if at.stop:
                    bar.close()
                    log.info("stopped on request (%s) at step %d, checkpoint saved: the same command resumes it",
                             stop.received or "another rank's signal", self.step)
                    return True
                self.evaluator.after_step(self.step)
        bar.close()
        self.evaluator.at_end(self.step)
        return False

    def _log_start(self, end: int) -> None:
        """The run directory, its config.yaml, and what this run resolved to."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.run_dir / "config.yaml", "w") as fh:
            yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
        log.info("optimizer backends available: %s", optimizer_backends())
        log.info("attention: %s", self.attention.describe())
        log.info("device %s x %d ranks (%s), precision %s, kernels %s (%s), compile %s%s, attention %s, optimizer %s, "
                 "params %.2fM, batch %d = %d ranks x %d micro-batches x %d rows, steps %d -> %d",
                 self.device, self.dist.world_size, self.parallel,
                 self.precision.name + (" (emulated)" if emulated(self.precision, self.device) else ""),
                 cfg.kernels, self.kernel_ops.describe(), self.compile, " (CUDA graphs)" if cfg.cuda_graphs else "",
                 self.attention.name, self.optimizer_kind, sum(p.numel() for p in self.params) / 1e6,
                 cfg.batch_size, self.dist.world_size, self.accum, self.micro, self.step, end)


def _bar_safe_logging(bar: tqdm) -> contextlib.AbstractContextManager:
    """While the bar is up, console log lines go through tqdm.write, so they are not printed into the bar's line;
    nothing changes where the root logger prints nothing to the console (library use, tests)."""
    console = any(type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)
                  for h in logging.root.handlers)
    return logging_redirect_tqdm() if console and not bar.disable else contextlib.nullcontext()


def _read_init(path: str) -> dict:
    """init_from's consolidated weights (a .pt file or a training checkpoint directory), errors naming the key."""
    try:
        return consolidate(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config: init_from = {path!r}: {e}") from None
