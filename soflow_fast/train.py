"""The training loop: get batch, SoFlow loss (three network calls), backward, clip, step, EMA, log, checkpoint.

Runs as one process or under torchrun (parallel: ddp | fsdp). The global batch is the config's batch_size; each of
W ranks takes B/W rows, in micro-batches of micro_batch_size with gradient accumulation. Each micro-batch is split
into FM and consistency rows as the reference splits each GPU's batch, and its randomness is drawn from a generator
seeded by (seed, step, micro-batch index), so a run is reproducible, and resumable exactly, on any world size.

A step never waits for the device (no host read of a device value; the EDM augmentation, data/augment.py, excepted),
so the host can queue steps ahead of the GPU. A non-finite loss or gradient norm sets a device flag that makes that
step's optimizer and EMA updates no-ops; the statistics and the count of such steps are summed on the device and read
only at logging steps and saves, where on_nonfinite 'stop' raises (`_DeviceStats`, `Trainer._take_nonfinite`).
"""
from __future__ import annotations

import contextlib
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
from .attention import AttentionChoice, resolve_attention
from .config import ConfigError, TrainConfig
from .data.augment import AugmentConfig, AugmentPipe
from .data.loader import TensorLoader
from .fileio import atomic_open
from .flow import derived_seed, sample
from .images import save_grid, to_uint8_nhwc
from .kernel_ops import kernel_ops_for
from .models import DIT_SIZES, build_model, canonical_size, describe, model_from_config
from .models.reference import load_state_strict
from .optim import build_optimizer, optimizer_backends, optimizer_step, step_with_ema
from .parallel import (DistInfo, all_reduce_mean, check_cuda_graphs, compile_backend, full_tensor, init_distributed,
                       parallelize, resolve_compile, unwrap)
from .precision import emulated, numerics, region, resolve_precision
from .step import compiled_loss, draw_noise, is_stochastic, soflow_loss

log = logging.getLogger("soflow_fast")

# Dense bf16 peak TFLOP/s per device, for MFU (fp32 runs use TF32, half of it). Match on the CUDA device name.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1,
                    "A10": 125.0, "L4": 121.0}


# The last key of derived_seed for a micro-batch's dropout seed: a stream apart from its noise generator's.
DROPOUT_STREAM = 1


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient (and on_nonfinite is 'stop')."""


def dataset_for(cfg: TrainConfig, dist: DistInfo):
    """(loader of this rank's rows, in_channels, num_classes) for the config's dataset. Loaders share one interface:
    next() -> (x0, y) on the device, state_dict() / load_state_dict() with the exact position."""
    local = cfg.batch_size // dist.world_size
    if cfg.dataset_type == "Imagenet":
        from .data.latents import make_latent_loader

        if not cfg.dataset_path:
            raise ConfigError("config: dataset_path is empty; point it at a folder made by `soflow-fast "
                              "prepare-latents` or `convert-latents`")
        loader = make_latent_loader(cfg.dataset_path, local, cfg.seed, dist.rank, dist.world_size, dist.device)
        channels, size = loader.sample_shape[0], loader.sample_shape[-1]
        if size != cfg.data_size:
            raise ConfigError(f"config: data_size = {cfg.data_size} but the latents in {cfg.dataset_path} are "
                              f"{size}x{size}")
        classes = loader.num_classes if cfg.num_classes is None else cfg.num_classes
        if classes != loader.num_classes:
            raise ConfigError(f"config: num_classes = {classes} but {cfg.dataset_path} has {loader.num_classes}")
        log.info("data: %s", getattr(loader, "description", loader.backend))
        return loader, channels, classes
    if cfg.dataset_type == "ImageFolder":  # pixel-space training at data_size x data_size, one class per folder
        from .data.imagefolder import make_pixel_loader

        if not cfg.dataset_path:
            raise ConfigError("config: dataset_path is empty; point it at a folder with one sub-folder per class")
        loader = make_pixel_loader(cfg.dataset_path, cfg.data_size, local, cfg.seed, dist.rank, dist.world_size,
                                   dist.device, kind="imagefolder")
        classes = len(loader.classes) if cfg.num_classes is None else cfg.num_classes
        if classes not in (0, len(loader.classes)):
            raise ConfigError(f"config: num_classes = {classes} but {cfg.dataset_path} has {len(loader.classes)} "
                              "class folders (or 0: unconditional)")
        return (_Unlabelled(loader) if classes == 0 else loader), 3, classes
    if cfg.dataset_type == "CIFAR10":
        from .data.imagefolder import make_pixel_loader

        if not cfg.dataset_path:
            raise ConfigError("config: dataset_path is empty; point it at a local CIFAR-10 folder "
                              "(torchvision's cifar-10-batches-py layout; nothing is downloaded)")
        try:
            loader = make_pixel_loader(cfg.dataset_path, None, local, cfg.seed, dist.rank, dist.world_size,
                                       dist.device, kind="cifar10")
        except FileNotFoundError as e:
            raise ConfigError(f"config: dataset_path = {cfg.dataset_path!r}: {e}") from None
        if cfg.data_size != 32:
            raise ConfigError(f"config: data_size = {cfg.data_size}: CIFAR-10 images are 32x32")
        classes = 0 if cfg.num_classes is None else cfg.num_classes  # unconditional, as the reference
        if classes not in (0, 10):
            raise ConfigError(f"config: num_classes = {classes}: CIFAR-10 has 10 classes (or 0: unconditional)")
        return (_Unlabelled(loader) if classes == 0 else loader), 3, classes
    from .data.digits import IMAGE_SHAPE, NUM_CLASSES, load_digits_split

    if cfg.data_size != IMAGE_SHAPE[-1]:
        raise ConfigError(f"config: data_size = {cfg.data_size}: the digits are {IMAGE_SHAPE[-1]}x{IMAGE_SHAPE[-1]}")
    x, y, _, _ = load_digits_split()
    num_classes = NUM_CLASSES if cfg.num_classes is None else cfg.num_classes
    if num_classes not in (0, NUM_CLASSES):
        raise ConfigError(f"config: num_classes = {num_classes}: the digits have {NUM_CLASSES} classes (or 0)")
    loader = TensorLoader(x, y if num_classes else None, cfg.batch_size, cfg.seed, dist.device, dist.rank,
                          dist.world_size)
    return loader, IMAGE_SHAPE[0], num_classes


class _Unlabelled:
    """A loader whose labels the model does not use (unconditional training on a labelled dataset)."""

    def __init__(self, loader):
        self.loader = loader

    def next(self) -> tuple[Tensor, None]:
        return self.loader.next()[0], None

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """The EMA decay at finished step k; with ema_warmup, (1 + k) / (10 + k) caps it early in a run."""
    return min(cfg.ema_decay_rate, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay_rate


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


class _DeviceStats:
    """Step statistics summed on the device between host reads, so that a step never waits for the device.

    A step adds its statistics unless its flag `found_inf` is set; such a step is counted instead, and the first one's
    step number, (rank-averaged) loss and gradient norm kept for the message. Sums are fp64: the values are fp32.
    """

    def __init__(self, device: torch.device):
        self.keys: list[str] = []
        self.sums: Optional[Tensor] = None  # [len(keys)]: sums over the finite steps since the last take_window
        self.finite = torch.zeros((), dtype=torch.float64, device=device)
        self.bad = torch.zeros(4, dtype=torch.float64, device=device)  # count, then the first's step, loss, |g|

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
        self.bad[2:] = torch.where(first, check.double(), self.bad[2:])
        self.bad[0] += found_inf

    def take_window(self) -> tuple[dict[str, float], int]:
        """(mean of each statistic over the finite steps, averaged over ranks; their number) since the last call.
        A host read, and a collective under torchrun."""
        if self.sums is None:
            return {}, 0
        *sums, n = torch.cat([all_reduce_mean(self.sums), self.finite[None]]).tolist()
        self.sums.zero_()
        self.finite.zero_()
        return ({k: v / n for k, v in zip(self.keys, sums)} if n else {}), int(n)

    def take_nonfinite(self) -> tuple[int, int, float, float]:
        """(count, first step, its loss, its gradient norm) of the non-finite steps since the last call (a host read;
        the same on every rank: the flag is decided on all-reduced values)."""
        count, step, loss, grad_norm = self.bad.tolist()
        self.bad.zero_()
        return int(count), int(step), loss, grad_norm


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Optional[str | os.PathLike] = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.working_dir)
        self.dist = init_distributed(cfg.device)
        W = self.dist.world_size
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
        self.device = self.dist.device
        try:
            self.precision = resolve_precision(cfg.precision, self.device, secant=cfg.model_type.startswith("DiT"))
        except ValueError as e:
            raise ConfigError(f"config: {e}") from None
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere and newer, as the reference
            torch.backends.cudnn.allow_tf32 = True
        self.compile = resolve_compile(cfg.compile, self.device)
        if self.compile != "none" and emulated(self.precision, self.device):
            raise ConfigError(f"config: compile = {cfg.compile!r} with precision {self.precision.name!r} on a CPU: the "
                              "bf16 emulator runs eagerly; set compile: none (or auto), or precision: fp32")
        try:
            if cfg.cuda_graphs:
                check_cuda_graphs(self.compile, self.device, cfg.parallel)
            self.attention = _resolve_attention(cfg, self.device, self.precision)
        except ValueError as e:
            raise ConfigError(f"config: {e}") from None
        self.loader, in_ch, num_classes = dataset_for(cfg, self.dist)
        overrides = {k: getattr(cfg, k) for k in ("hidden_size", "depth", "num_heads", "patch_size")
                     if getattr(cfg, k) is not None}
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.net = build_model(cfg.model_type, input_size=cfg.data_size, in_channels=in_ch, num_classes=num_classes,
                               null_class=cfg.cfg_drop_rate > 0, kernels=cfg.kernels, device=self.device,
                               attention=self.attention.fn, **overrides)
        self.kernel_ops = kernel_ops_for(self.net.cfg.kernels, self.device.type)  # the loss functions
        # A config written for torchrun also runs as one plain process: without a process group, no wrapper.
        self.parallel = cfg.parallel if self.dist.enabled else "none"
        fsdp = self.parallel == "fsdp"
        reshard = None if cfg.reshard_after_forward == "auto" else cfg.reshard_after_forward
        try:
            self.model = parallelize(self.net, self.parallel,
                                     param_dtype=self.precision.fsdp_param_dtype if fsdp else None,
                                     activation_checkpointing=cfg.activation_checkpointing, compile=self.compile,
                                     device=self.device, reshard_after_forward=reshard, cuda_graphs=cfg.cuda_graphs)
        except ValueError as e:
            raise ConfigError(f"config: {e}") from None
        if self.compile == "step" and is_stochastic(self.net):
            raise ConfigError(f"config: compile = 'step' needs a network without dropout ({cfg.model_type} has it); "
                              "use compile: model")
        self.loss_fn = compiled_loss(compile_backend(), cfg.cuda_graphs) if self.compile == "step" else soflow_loss
        named = list(unwrap(self.model).named_parameters())
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.ema = [p.detach().clone().float() for p in self.params]  # fp32, sharded like the parameters
        self.optimizer_kind = cfg.resolved_optimizer
        if self.optimizer_kind == "fused_adamw_ema" and fsdp:
            raise ConfigError("config: optimizer = 'fused_adamw_ema' takes plain tensors, not FSDP shards; "
                              "use 'adamw' with parallel: fsdp")
        try:
            self.optimizer = build_optimizer(self.optimizer_kind, self.params, lr=cfg.learning_rate,
                                             betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                             ema_params=self.ema, ema_decay=cfg.ema_decay_rate,
                                             capturable=cfg.cuda_graphs)
        except RuntimeError as e:
            raise ConfigError(f"config: optimizer = {cfg.optimizer!r}: {e}") from None
        self.trainable = [p for p in self.params if p.requires_grad]
        self.flow, self.hp = cfg.flow, cfg.hparams
        self.step = 0
        self.skipped = 0  # non-finite steps so far, as of the last host read (`_take_nonfinite`)
        self._stats = _DeviceStats(self.device)
        macs = getattr(self.net.cfg, "forward_macs", None)  # known for the DiT (docs/algorithm.md section 8)
        self.flops_per_step = 2 * macs() * self.hp.forward_equivalents(
            self.micro, num_classes > 0 and self.hp.cfg_scale > 1) * self.accum * W if macs else None
        p = cfg.resolved_augment_p
        if p > 0 and getattr(self.net.cfg, "augment_dim", 0) == 0:
            raise ConfigError(f"config: augment_p = {p} needs a network with augment-label input (model_type UNet)")
        self.augment = AugmentPipe(AugmentConfig(p=p)) if p > 0 else None
        self.ema_every = cfg.resolved_ema_every
        self.peak = peak_flops(cfg, self.device, self.precision.any_bf16)
        self._resume()

    # -- checkpoints --------------------------------------------------------------------------------
    def _dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "ema": dict(zip(self.param_names, self.ema))}

    def _meta(self) -> dict:
        return {"step": self.step, "skipped": self.skipped, "data": self.loader.state_dict(),
                "config": self.cfg.to_dict(), "model_config": describe(self.net), "world_size": self.dist.world_size,
                "flow": {"noising": self.flow.noising, "coefficient": self.flow.coefficient}}

    def save(self) -> Path:
        """Collective: a DCP checkpoint of this step (every rank writes its shards)."""
        self._take_nonfinite()  # the meta's skipped count; a sync point anyway
        path = ckpt_io.checkpoint_dir(self.run_dir, self.step)
        ckpt_io.save_training_checkpoint(path, self._dcp_state(), self._meta(), self.dist.is_main)
        if self.dist.is_main:
            ckpt_io.prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        return path

    def _resume(self) -> None:
        path = ckpt_io.latest_checkpoint(self.run_dir)
        if path is None:
            return
        meta = ckpt_io.read_meta(path)
        ours, theirs = describe(self.net), meta["model_config"]
        diff = [k for k in ours["config"] if theirs.get("config", {}).get(k) != ours["config"][k]]
        if theirs.get("kind") != ours["kind"] or diff:
            key = diff[0] if diff else "kind"
            raise ValueError(f"checkpoint {path}: its model has {key} = "
                             f"{theirs.get('config', {}).get(key, theirs.get('kind'))!r}, the config asks for "
                             f"{ours['config'].get(key, ours['kind'])!r}")
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._dcp_state()
        ckpt_io.load_training_state(path, state)  # fills the EMA tensors in place
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.step, self.skipped = int(meta["step"]), int(meta.get("skipped", 0))
        self.loader.load_state_dict(meta["data"])
        log.info("resumed from %s at step %d (written by %d ranks)", path, self.step, meta.get("world_size", 1))

    # -- one step -----------------------------------------------------------------------------------
    def _sampling(self):
        """Sampling runs as the mode's teacher calls do (bf16 or fp32), emulated on a CPU."""
        stack = contextlib.ExitStack()
        stack.enter_context(numerics(self.precision, self.device))
        stack.enter_context(region(self.precision, self.precision.teacher_bf16, self.device.type))
        return stack

    def _sync_grads(self, last: bool):
        """Gradient all-reduce only on the last micro-batch of a step."""
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

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
            with self._sync_grads(a == self.accum - 1), numerics(self.precision, self.device):
                out = self.loss_fn(self.model, self.flow, self.hp, xm, ym, noise, self.step, self.net.null_label,
                                   kernel_ops=self.kernel_ops, augment_labels=aug, precision=self.precision)
                (out.loss / self.accum).backward()
            part = torch.stack([out.loss.detach(), *out.stats.values()]).float() / self.accum
            values = part if values is None else values + part
        grad_norm = full_tensor(self._grad_norm()).float()
        check = all_reduce_mean(torch.stack([values[0], grad_norm]))
        found_inf = torch.isfinite(check).all().logical_not().float()
        with torch.no_grad():
            self._update(found_inf)
        keys, values = ["loss", *out.stats, "grad_norm"], torch.cat([values, grad_norm[None]])
        self._stats.add(keys, values, found_inf, check, self.step + 1)
        self.step += 1
        return {**dict(zip(keys, values)), "nonfinite": found_inf}

    def _grad_norm(self) -> Tensor:
        """The gradients' total norm, after clipping them to grad_clip; without grad_clip they are left untouched
        (clipping to an infinite norm would still scale every gradient by 1)."""
        if self.cfg.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        return torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None])

    def _update(self, found_inf: Tensor) -> None:
        """The optimizer step and the EMA update, both no-ops on the device where found_inf is 1."""
        if self.ema_every == 1:
            step_with_ema(self.optimizer, self.ema, self.params, ema_decay(self.cfg, self.step), found_inf)
            return
        optimizer_step(self.optimizer, found_inf)
        if self.step % self.ema_every == 0:  # the reference's CIFAR EMA: decay^N, computed in float64
            d = ema_decay(self.cfg, self.step) ** self.ema_every
            skip = found_inf.bool()
            for e, p in zip(self.ema, self.params):
                e.copy_(torch.where(skip, e, (d * e.double() + (1 - d) * p.detach().double()).float()))

    def _take_nonfinite(self) -> None:
        """Read the non-finite steps since the last read (a host sync: at logging steps and saves) into
        self.skipped; with on_nonfinite 'stop', raise NonFiniteError. Their updates were skipped on the device, so
        they never touched the weights, the optimizer state or the EMA; finite steps after them, up to this read,
        did update them."""
        count, step, loss, grad_norm = self._stats.take_nonfinite()
        if not count:
            return
        self.skipped += count
        what = f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}"
        if self.cfg.on_nonfinite == "stop":
            raise NonFiniteError(f"{what} ({loss}); the weights were not updated by it (skipped on the device; found "
                                 f"at step {self.step}, {count} non-finite step(s) since the last check). "
                                 "Lower learning_rate, set grad_clip, or set on_nonfinite: skip")
        log.warning("%s: step skipped (%d non-finite step(s) skipped up to step %d)", what, count, self.step)

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, max_steps: Optional[int] = None, progress: bool = True) -> None:
        cfg = self.cfg
        end = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
            log.info("optimizer backends available: %s", optimizer_backends())
            log.info("attention: %s", self.attention.describe())
            log.info("device %s x %d ranks (%s), precision %s, kernels %s (%s), compile %s%s, attention %s, "
                     "optimizer %s, params %.2fM, batch %d = %d ranks x %d micro-batches x %d rows, steps %d -> %d",
                     self.device, self.dist.world_size, self.parallel,
                     self.precision.name + (" (emulated)" if emulated(self.precision, self.device) else ""),
                     cfg.kernels, self.kernel_ops.describe(), self.compile,
                     " (CUDA graphs)" if cfg.cuda_graphs else "", self.attention.name, self.optimizer_kind,
                     sum(p.numel() for p in self.params) / 1e6,
                     cfg.batch_size, self.dist.world_size, self.accum, self.micro, self.step, end)
        bar = _progress(self.step, end, progress and self.dist.is_main)
        loss, t0 = None, time.perf_counter()  # the bar shows the last logged loss: reading one per step would sync
        compiling = self.compile != "none" and self.dist.is_main  # the first step traces and compiles each call
        while self.step < end:
            x0, y = self.loader.next()
            t_step = time.perf_counter()
            self.train_step(x0, y)
            if compiling:  # tracing and compiling run on the host, so host time measures them
                log.info("compiled in %.1f s (compile %s; the first step, compiling included)", time.perf_counter()
                         - t_step, self.compile)
                compiling = False
            if self.step % cfg.logging_steps == 0 or self.step == end:
                rec = self._log_metrics(time.perf_counter() - t0)
                loss, t0 = (rec or {}).get("loss", loss), time.perf_counter()
            bar(self.step, loss)
            if cfg.eval_demo_steps and self.step % cfg.eval_demo_steps == 0:
                self.sample_grid()
            if cfg.eval_steps and cfg.eval_fid_reference and self.step % cfg.eval_steps == 0:
                self.evaluate_fid()
            if self.step % cfg.ckpt_saving_steps == 0 or self.step == end:
                self.save()
        bar(None, None)

    def _log_metrics(self, elapsed: float) -> Optional[dict]:
        """Read the statistics summed on the device since the last log and append their means to metrics.jsonl
        (collective); returns the record on the main rank."""
        self._take_nonfinite()
        means, n = self._stats.take_window()
        # every rank's peak, gathered by a sum over one-hot slots (works on gloo and NCCL alike)
        mem = torch.zeros(self.dist.world_size, device=self.device if self.device.type == "cuda" else "cpu")
        mem[self.dist.rank] = _peak_memory_gb(self.device)
        if self.dist.enabled:
            torch.distributed.all_reduce(mem)
        per_rank = [round(m, 3) for m in mem.tolist()]
        peak_mem = max(per_rank)
        if not self.dist.is_main:
            return None
        per_s = n / max(elapsed, 1e-9)
        tflops = self.flops_per_step * per_s / 1e12 if self.flops_per_step else None
        rec = {"step": self.step, **means, "images_per_s": per_s * self.cfg.batch_size,
               "images_per_s_per_device": per_s * self.cfg.batch_size / self.dist.world_size,
               "model_tflops": tflops, "mfu": tflops * 1e12 / self.dist.world_size / self.peak
               if self.peak and tflops else None,
               "skipped": self.skipped, "lr": self.optimizer.param_groups[0]["lr"], "peak_mem_gb": peak_mem,
               "peak_mem_gb_per_rank": per_rank}
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        nan = float("nan")
        log.info("step %d  loss %.4f  fm %.4f (mse %.4f w %.3f)  cons %.4f (mse %.4f w %.3f)  |g| %.3f  %.1f img/s"
                 "  %.3f TFLOP/s%s  mem %.2f GB", self.step, rec.get("loss", nan), rec.get("loss_fm", nan),
                 rec.get("mse_fm", nan), rec.get("weight_fm", nan), rec.get("loss_c", nan), rec.get("mse_c", nan),
                 rec.get("weight_c", nan), rec.get("grad_norm", nan), rec["images_per_s"], tflops or nan,
                 f" (MFU {rec['mfu']:.1%})" if rec["mfu"] else "", peak_mem)
        return rec

    def ema_module(self) -> torch.nn.Module:
        """A plain network holding the whole EMA weights (collective under FSDP: every rank must call it)."""
        full = {n: full_tensor(t) for n, t in zip(self.param_names, self.ema)}
        model = model_from_config(describe(self.net), self.net.cfg.kernels, self.device, self.attention.fn)
        state = model.state_dict()
        state.update(full)  # parameters from the EMA; buffers (the U-Net's fixed filters) as built
        load_state_strict(model, state, "EMA weights")
        return model.eval()

    @torch.no_grad()
    def sample_grid(self) -> Optional[Path]:
        """A grid of EMA samples (labels cycling through the classes) in run_dir/samples/ (collective)."""
        ema = self.ema_module()
        if not self.dist.is_main:
            return None
        rows, cols = self.cfg.eval_demo_shape
        n = rows * cols
        g = torch.Generator(self.device).manual_seed(self.cfg.seed)
        x1 = torch.randn((n, ema.cfg.in_channels, self.cfg.data_size, self.cfg.data_size), generator=g,
                         device=self.device)
        y = torch.arange(n, device=self.device) % ema.cfg.num_classes if ema.cfg.num_classes else None
        with self._sampling():
            x = sample(ema, self.flow, x1, nfe=self.cfg.eval_NFE, y=y, generator=g)
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        save_grid(to_uint8_nhwc(x), rows, cols, path, upscale=4 if self.cfg.data_size <= 16 else 1)
        return path

    @torch.no_grad()
    def evaluate_fid(self) -> Optional[dict]:
        """FID (and IS) of eval_num_samples EMA samples against eval_fid_reference, appended to metrics.jsonl
        (collective: the EMA is gathered on every rank; rank 0 samples and scores)."""
        from .evaluation.fid import evaluate_model_fid, load_reference_stats
        from .evaluation.inception import load_inception
        from .data.latents import LATENT_SCALE
        from .sampling import load_decoder

        ema = self.ema_module()
        if not self.dist.is_main:
            return None
        cfg = self.cfg
        if not hasattr(self, "_fid_tools"):  # loaded once, at the first evaluation
            self._fid_tools = (load_reference_stats(cfg.eval_fid_reference),
                               load_inception(cfg.eval_inception, self.device), load_decoder(cfg.eval_vae, self.device))
        ref, inception, vae = self._fid_tools
        g = torch.Generator(self.device).manual_seed(cfg.seed + 1)  # the same noise at every evaluation
        classes = getattr(ema.cfg, "num_classes", 0)

        def sample_fn(k: int):
            x1 = torch.randn((k, ema.cfg.in_channels, cfg.data_size, cfg.data_size), generator=g, device=self.device)
            y = torch.randint(0, classes, (k,), generator=g, device=self.device) if classes else None
            with self._sampling():
                x = sample(ema, self.flow, x1, nfe=cfg.eval_NFE, y=y, generator=g)
            if vae is not None:
                x = vae.decode(x.float() / LATENT_SCALE).sample
            return to_uint8_nhwc(x)

        res = evaluate_model_fid(sample_fn, cfg.eval_num_samples, ref, inception, cfg.eval_batch_size)
        rec = {"step": self.step, **res, "eval_NFE": cfg.eval_NFE}
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        log.info("step %d  FID %.3f at %d NFE (%d samples)", self.step, res["fid"], cfg.eval_NFE,
                 res["fid_num_samples"])
        return rec

    def _write_config(self) -> None:
        import yaml

        with atomic_open(self.run_dir / "config.yaml", "w") as fh:
            yaml.safe_dump(self.cfg.to_dict(), fh, sort_keys=False)


def _resolve_attention(cfg: TrainConfig, device: torch.device, precision) -> AttentionChoice:
    """The DiT's attention for this run (the U-Net's is chosen per call: ops.attention). flash-attn needs every call
    in bf16: the precision modes that put the teacher, FM and pair calls all in bf16."""
    if not cfg.model_type.startswith("DiT"):
        return AttentionChoice("per call", ops.attention, "the U-Net's: sdpa, or flash-attn for bf16 CUDA tensors")
    _, hidden, _, heads = DIT_SIZES[canonical_size(cfg.model_type)]
    head_dim = (cfg.hidden_size or hidden) // (cfg.num_heads or heads)
    bf16 = precision.teacher_bf16 and precision.fm_bf16 and precision.pair_bf16
    return resolve_attention(cfg.attention, device, bf16=bf16, head_dim=head_dim)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB: process peak RSS


def _progress(start: int, end: int, enabled: bool) -> Callable:
    """A one-line console progress bar (redrawn in place on a terminal, every 10% otherwise)."""
    tty = sys.stderr.isatty()
    t0, first = time.perf_counter(), start

    def update(step: Optional[int], loss: Optional[float]) -> None:
        if not enabled:
            return
        if step is None:
            if tty:
                sys.stderr.write("\n")
            return
        if not tty and step != end and step % max((end - first) // 10, 1):
            return
        frac = step / max(end, 1)
        rate = (step - first) / max(time.perf_counter() - t0, 1e-9)
        eta = (end - step) / rate if rate > 0 else float("nan")
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        shown = f" loss {loss:.4f}" if loss is not None else ""
        line = f"[{bar}] {step}/{end} {rate:.1f} it/s eta {eta:.0f}s{shown}"
        sys.stderr.write("\r" + line if tty else line + "\n")
        sys.stderr.flush()

    return update


def model_from_checkpoint(ck: dict, weights: str = "ema", kernels: str = "eager",
                          device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild the network a consolidated checkpoint describes and load its EMA (default) or raw weights."""
    model = model_from_config(ck["model_config"], kernels, device)
    load_state_strict(model, ck[weights], f"checkpoint [{weights}]")
    return model.eval()
