"""Training configuration: YAML (safe_load) validated once into a typed TrainConfig.

Keys carry the reference implementation's names and meanings (imagenet.yaml / cifar.yaml), so a reference config
runs unchanged where this trainer supports its dataset; the keys below the reference block are ours. Unknown keys,
wrong types and impossible values are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .attention import ATTENTION_MODES
from .flow import L_SCHEDULES, Flow
from .models import is_model_type
from .kernel_ops import KERNEL_MODES
from .parallel import COMPILE_MODES
from .precision import PRECISIONS
from .step import SoFlowHParams

DATASETS = ("digits", "Imagenet", "CIFAR10", "ImageFolder")


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or impossible; the message names the key."""


@dataclass
class TrainConfig:
    # --- the reference implementation's keys -----------------------------------------------------
    working_dir: str = "./runs/soflow"
    noising_type: str = "Linear"            # Linear | Trig (alias Triangular)
    coefficient_type: str = "Euler"         # Euler | Trig (alias Triangular)
    model_type: str = "DiT-B-4"             # a DiT size name: DiT-XL/2 or DiT-XL-2, ...
    dataset_type: str = "digits"            # digits (embedded) | Imagenet (latent shards) | CIFAR10 | ImageFolder
    data_size: int = 8                      # image / latent side length
    dataset_path: str = ""
    velocity_loss_ratio: float = 0.75       # fraction of each batch given to the FM loss
    p: float = 1.0                          # adaptive-weight power
    eps: float = 0.01                       # adaptive-weight epsilon
    time_mean: list = field(default_factory=lambda: [-0.2, -1.0, 0.2])  # logit-normal [FM t, cons. s, cons. t]
    time_std: list = field(default_factory=lambda: [1.0, 0.8, 0.8])
    cfg_scale: float = 1.0                  # training guidance scale w (> 1 enables guided targets)
    mix_ratio: float = 1.0                  # m: guided target mixed with the model's own prediction
    cfg_drop_rate: float = 0.0              # fraction of rows training the unconditional model
    cfg_decay_time: float = 1.0             # tau: guidance decays for t > tau
    l_schedule: str = "Exponent"            # Const | Linear | Cosine | Exponent
    l_init_ratio: float = 0.1
    l_end_ratio: float = 0.002
    total_steps: int = 400000
    ema_decay_rate: float = 0.9999
    learning_rate: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    batch_size: int = 256                   # global batch
    num_workers: int = 0
    prefetch_factor: int = 2
    eval_steps: int = 0                     # periodic FID evaluation every N steps (0 = off; needs the eval_* paths)
    eval_batch_size: int = 125
    eval_NFE: int = 1
    eval_demo_steps: int = 1000             # sample grid PNG every N steps (0 = off)
    eval_demo_shape: list = field(default_factory=lambda: [4, 8])
    logging_steps: int = 100
    ckpt_saving_steps: int = 25000
    seed: int = 42
    # --- ours ------------------------------------------------------------------------------------
    eval_num_samples: int = 10000           # samples per periodic FID
    eval_fid_reference: str = ""            # .npz with mu/sigma (an ADM reference batch or `evaluate --save-ref-stats`)
    eval_inception: str = ""                # LOCAL Inception-v3 FID weights (pt_inception-2015-12-05-6726825d.pth)
    eval_vae: str = ""                      # LOCAL AutoencoderKL folder to decode latents for the FID
    num_classes: Optional[int] = None       # default: from the dataset (digits 10, Imagenet 1000, CIFAR10 0)
    hidden_size: Optional[int] = None       # overrides of the size table (small custom models)
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    kernels: str = "eager"                  # eager | triton | auto (= per op, what kernels/choices.py measured faster
    #                                         on this device); eager by default: measured faster end to end on an
    #                                         H100 (README, "Measured")
    precision: str = "auto"                 # auto (= bf16-secant on CUDA, fp32 elsewhere) | fp32 (+TF32 on GPUs)
    #                                         | bf16 (all calls) | bf16-split | bf16-secant: soflow_fast/precision.py;
    #                                         a bf16 mode on a CPU runs the exact bf16 emulator
    optimizer: str = "auto"                 # auto (radam for CIFAR10, as the reference; else adamw) | adamw | radam
    #                                         | fused_adamw_ema (csrc extension) | apex
    ema_every: int = 0                      # EMA every N steps with decay^N in float64 (0 = auto: 16 for CIFAR10)
    augment_p: Optional[float] = None       # EDM augmentation probability (None = auto: 0.12 for CIFAR10, else 0)
    grad_clip: float = 0.0                  # max grad norm (0 = no clipping; the norm is logged either way)
    ema_warmup: bool = False                # decay min(ema_decay_rate, (1 + k) / (10 + k)): for short runs
    on_nonfinite: str = "stop"              # stop | skip: a non-finite loss or gradient's update is skipped on the
    #                                         device; stop raises at the next logging step or checkpoint
    keep_checkpoints: int = 3               # most recent checkpoints kept (0 = all)
    quality_report: bool = True             # digits: the classifier-based report at the end
    device: str = "auto"                    # auto | cpu | cuda
    parallel: str = "none"                  # none | ddp | fsdp (FSDP2: bf16 params/compute, fp32 reduction)
    micro_batch_size: int = 0               # rows per forward on a rank (0 = batch_size / world); the rest accumulates
    activation_checkpointing: bool = False  # recompute each DiT block in the backward
    compile: str = "auto"                   # auto (= model on CUDA, none elsewhere) | none | blocks (torch.compile
    #                                         each DiT block) | model (the whole network; per block under FSDP)
    reshard_after_forward: bool | str = "auto"  # FSDP2 blocks free their gathered weights after each forward:
    #                                         auto (= false on one node, <= 8 ranks; true beyond) | true | false
    peak_tflops: float = 0.0                # per-device peak for MFU (0 = from the table of known devices)
    attention: str = "auto"                 # the DiT's attention, chosen once at build: auto (= the measured fastest
    #                                         for this GPU, soflow_fast/attention_table.json; without a measurement
    #                                         flash-attn when usable, else sdpa) | sdpa (PyTorch's dispatch) |
    #                                         flash-attn | cudnn | flash | efficient | math (that SDPA backend forced)
    cuda_graphs: bool = False               # UNTESTED ON A GPU: torch.compile(mode="reduce-overhead") of the network
    #                                         (CUDA graph trees) with a capturable optimizer; needs compile model (or
    #                                         auto) on CUDA. Default false until a GPU run shows it correct and faster

    # ---------------------------------------------------------------------------------------------
    @property
    def flow(self) -> Flow:
        return Flow(self.noising_type, self.coefficient_type)

    @property
    def resolved_optimizer(self) -> str:
        return ("radam" if self.dataset_type == "CIFAR10" else "adamw") if self.optimizer == "auto" else self.optimizer

    @property
    def resolved_ema_every(self) -> int:
        return self.ema_every or (16 if self.dataset_type == "CIFAR10" else 1)

    @property
    def resolved_augment_p(self) -> float:
        return (0.12 if self.dataset_type == "CIFAR10" else 0.0) if self.augment_p is None else self.augment_p

    @property
    def hparams(self) -> SoFlowHParams:
        return SoFlowHParams(
            velocity_loss_ratio=self.velocity_loss_ratio, p=self.p, eps=self.eps,
            time_mean=tuple(self.time_mean), time_std=tuple(self.time_std), cfg_scale=self.cfg_scale,
            mix_ratio=self.mix_ratio, cfg_drop_rate=self.cfg_drop_rate, cfg_decay_time=self.cfg_decay_time,
            l_schedule=self.l_schedule.lower(), l_init_ratio=self.l_init_ratio, l_end_ratio=self.l_end_ratio,
            total_steps=self.total_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "TrainConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(raw).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            more = f" (and {unknown[1:]})" if unknown[1:] else ""
            raise ConfigError(f"{source}: unknown key {unknown[0]!r}{more}")
        values = {k: _coerce(k, v, known[k], source) for k, v in raw.items()}
        cfg = cls(**values)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: {key} = {getattr(self, key)!r}: {why}")

        for key in ("noising_type", "coefficient_type"):
            try:
                Flow(**{key.split("_")[0]: getattr(self, key)})
            except ValueError as e:
                raise ConfigError(f"{source}: {e}") from None
        if not is_model_type(self.model_type):
            raise bad("model_type", "expected a DiT size (DiT-XL/2 or DiT-XL-2, ...) or UNet / UNet-T")
        if self.dataset_type not in DATASETS:
            raise bad("dataset_type", f"expected one of {list(DATASETS)}")
        if self.l_schedule.lower() not in L_SCHEDULES:
            raise bad("l_schedule", "expected Const, Linear, Cosine or Exponent")
        if not 0.0 <= self.velocity_loss_ratio <= 1.0:
            raise bad("velocity_loss_ratio", "must lie in [0, 1]")
        for key in ("time_mean", "time_std"):
            if len(getattr(self, key)) != 3:
                raise bad(key, "expected three numbers [FM t, consistency s, consistency t]")
        if any(v <= 0 for v in self.time_std):
            raise bad("time_std", "standard deviations must be > 0")
        if self.cfg_scale < 1.0:
            raise bad("cfg_scale", "must be >= 1")
        if self.cfg_scale > 1.0 and self.cfg_drop_rate <= 0.0:
            raise bad("cfg_drop_rate", "cfg_scale > 1 needs cfg_drop_rate > 0 (the unconditional model is its teacher)")
        if not 0.0 <= self.cfg_drop_rate < 1.0:
            raise bad("cfg_drop_rate", "must lie in [0, 1)")
        if not 0.0 <= self.mix_ratio <= 1.0:
            raise bad("mix_ratio", "must lie in [0, 1]")
        if not 0.0 < self.cfg_decay_time:
            raise bad("cfg_decay_time", "must be > 0 (>= 1 disables the decay)")
        if self.l_schedule.lower() == "exponent" and (self.l_init_ratio <= 0 or self.l_end_ratio <= 0):
            raise bad("l_end_ratio" if self.l_end_ratio <= 0 else "l_init_ratio", "Exponent needs ratios > 0")
        for key in ("l_init_ratio", "l_end_ratio"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "must lie in [0, 1]")
        for key in ("total_steps", "batch_size", "logging_steps", "ckpt_saving_steps", "data_size", "eval_NFE"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        for key in ("eps", "learning_rate"):
            if getattr(self, key) <= 0:
                raise bad(key, "must be > 0")
        if self.p < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise bad("p" if self.p < 0 else "weight_decay" if self.weight_decay < 0 else "grad_clip", "must be >= 0")
        if not 0.0 <= self.ema_decay_rate < 1.0:
            raise bad("ema_decay_rate", "must lie in [0, 1)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise bad("betas", "expected two numbers in [0, 1)")
        if len(self.eval_demo_shape) != 2 or min(self.eval_demo_shape) < 1:
            raise bad("eval_demo_shape", "expected [rows, columns], both >= 1")
        for key, allowed in (("kernels", KERNEL_MODES), ("precision", PRECISIONS),
                             ("optimizer", ("auto", "adamw", "radam", "fused_adamw_ema", "apex")),
                             ("on_nonfinite", ("stop", "skip")), ("device", ("auto", "cpu", "cuda")),
                             ("parallel", ("none", "ddp", "fsdp")), ("compile", COMPILE_MODES),
                             ("attention", ATTENTION_MODES)):
            if getattr(self, key) not in allowed:
                raise bad(key, f"expected one of {list(allowed)}")
        if not (isinstance(self.reshard_after_forward, bool) or self.reshard_after_forward == "auto"):
            raise bad("reshard_after_forward", "expected auto, true or false")
        if self.attention != "auto" and not self.model_type.startswith("DiT"):
            raise bad("attention", "the U-Net's attention is chosen per call; only auto applies to it")
        if self.compile == "blocks" and not self.model_type.startswith("DiT"):
            raise bad("compile", "'blocks' compiles each DiT block; the U-Net has none: use model")
        if bool(self.eval_fid_reference) != bool(self.eval_inception):
            raise bad("eval_inception" if self.eval_fid_reference else "eval_fid_reference",
                      "periodic FID needs both eval_fid_reference and eval_inception")
        if self.eval_fid_reference and self.dataset_type == "Imagenet" and not self.eval_vae:
            raise bad("eval_vae", "FID of latent samples needs a local VAE folder to decode them")
        if self.eval_num_samples < 2:
            raise bad("eval_num_samples", "must be >= 2")
        if self.ema_every < 0:
            raise bad("ema_every", "must be >= 0")
        if self.augment_p is not None and not 0.0 <= self.augment_p <= 1.0:
            raise bad("augment_p", "must lie in [0, 1]")
        if self.micro_batch_size < 0 or self.peak_tflops < 0:
            raise bad("micro_batch_size" if self.micro_batch_size < 0 else "peak_tflops", "must be >= 0")
        if self.resolved_optimizer == "fused_adamw_ema" and self.resolved_ema_every != 1:
            raise bad("optimizer", "fused_adamw_ema updates the EMA every step; set ema_every: 1")
        if self.num_classes is not None and self.num_classes < 0:
            raise bad("num_classes", "must be >= 0")
        if self.precision == "bf16-secant" and not self.model_type.startswith("DiT"):
            raise bad("precision", "the secant pair is built into the DiT; use bf16-split for a U-Net")
        if self.cfg_scale > 1.0 and self.num_classes == 0:
            raise bad("cfg_scale", "guidance needs class labels (num_classes > 0)")


def _coerce(key: str, value: Any, f: dataclasses.Field, source: str) -> Any:
    """Check a YAML value against the field's type; ints are accepted for floats."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kind = {"Optional[int]": int, "Optional[float]": float, "bool | str": (bool, str)}.get(str(f.type), type(default))
    if value is None and str(f.type).startswith("Optional"):
        return None
    if key == "compile" and isinstance(value, bool):  # the retired form: true compiled each block
        raise ConfigError(f"{source}: compile = {value!r}: booleans are gone; use one of {list(COMPILE_MODES)} "
                          "(true was blocks, false none)")
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
          if kind is list else isinstance(value, kind))
    if not ok:
        names = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise ConfigError(f"{source}: {key} = {value!r}: expected {names}")
    return float(value) if kind is float else list(value) if kind is list else value


def load_config(path: str | os.PathLike, overrides: Optional[dict[str, Any]] = None) -> TrainConfig:
    """Read a YAML config with yaml.safe_load; `overrides` (already parsed values) replace its keys."""
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config {path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML ({e})") from None
    raw = dict(raw or {}) if isinstance(raw, dict) or raw is None else raw
    if isinstance(raw, dict) and overrides:
        raw.update(overrides)
    return TrainConfig.from_dict(raw, source=f"config {path}")


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' with the value read as YAML (so numbers, lists and booleans work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)
