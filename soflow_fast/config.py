"""Training configuration: YAML validated once into a typed TrainConfig.

Keys carry the reference implementation's names and meanings (imagenet.yaml / cifar.yaml), so a reference config
runs unchanged where this trainer supports its dataset (its loader keys num_workers and prefetch_factor excepted:
see their docs); the keys below the reference block are ours. Each field declares its type (read with
typing.get_type_hints; choices as Literal[...] built from the tuple the consuming module defines), its doc (shown by
`soflow-fast train --help-config`) and its range. Unknown keys, wrong types, non-finite numbers and impossible values
are errors that name the key: "config PATH: key = value: why".
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from .attention import ATTENTION_MODES
from .errors import UserError, one_line
from .flow import L_SCHEDULES, Flow
from .kernel_ops import KERNEL_MODES
from .models import is_model_type
from .optim import KINDS as OPTIMIZERS
from .optim import LR_SCHEDULES, lr_at
from .parallel import COMPILE_MODES, DEVICES, PARALLEL_MODES
from .precision import PRECISIONS
from .step import SoFlowHParams

DATASETS = ("digits", "Imagenet", "CIFAR10", "ImageFolder")  # train.py builds one loader per name

DatasetType = Literal[DATASETS]
KernelMode = Literal[KERNEL_MODES]
PrecisionMode = Literal[PRECISIONS]
OptimizerKind = Literal[("auto", *OPTIMIZERS)]
LrSchedule = Literal[LR_SCHEDULES]
OnNonfinite = Literal["stop", "skip"]
BadImages = Literal["error", "skip"]
Device = Literal[DEVICES]
ParallelMode = Literal[PARALLEL_MODES]
CompileMode = Literal[COMPILE_MODES]
AttentionMode = Literal[ATTENTION_MODES]


class ConfigError(UserError, ValueError):
    """A config value is missing, unknown, of the wrong type or impossible; the message names the key."""


@dataclass(frozen=True)
class Check:
    """A field's range: ok(value) holds, or the config is rejected with `why`."""

    ok: Callable[[Any], bool]
    why: str


def at_least(lo: float) -> Check:
    return Check(lambda v: v >= lo, f"must be >= {lo}")


def above(lo: float, note: str = "") -> Check:
    return Check(lambda v: v > lo, f"must be > {lo}{note}")


def within(lo: float, hi: float, *, open_hi: bool = False) -> Check:
    return Check(lambda v: lo <= v < hi if open_hi else lo <= v <= hi,
                 f"must lie in [{lo}, {hi}{')' if open_hi else ']'}")


def unused(default: Any) -> Check:
    """A reference key this trainer does not use: only its default is accepted, so no setting is silently ignored."""
    return Check(lambda v: v == default, "not used: the trainer's loaders run without worker processes; remove the key")


def opt(default: Any, doc: str, *checks: Check, fixed: bool = False) -> Any:
    """A config field: its default, its doc (`soflow-fast train --help-config`) and its range checks, in order.
    fixed: a resume refuses a change of it (it defines the run's model, data, objective or randomness; resume.py)."""
    meta = {"doc": doc, "checks": checks, "fixed": fixed}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


POSITIVE, NON_NEGATIVE, UNIT, UNIT_OPEN = at_least(1), at_least(0), within(0, 1), within(0, 1, open_hi=True)
PROFILE_WINDOW = Check(lambda v: v == [] or (len(v) == 2 and 1 <= v[0] <= v[1]),
                       "expected [] or [start, end] with 1 <= start <= end (step numbers)")
THREE_TIMES = Check(lambda v: len(v) == 3, "expected three numbers [FM t, consistency s, consistency t]")


@dataclass
class TrainConfig:
    """A training run's whole configuration, validated once (from_dict); nothing deeper reads the raw YAML."""

    # --- the reference implementation's keys -----------------------------------------------------
    working_dir: str = opt("./runs/soflow", "run directory: checkpoints, metrics.jsonl, samples (--run-dir wins)")
    noising_type: str = opt("Linear", "noising path: Linear | Trig (alias Triangular), any case", fixed=True)
    coefficient_type: str = opt("Euler", "solution-function coefficients: Euler | Trig (alias Triangular), any case",
                                fixed=True)
    model_type: str = opt("DiT-B-4", "network: a DiT size (DiT-XL/2 or DiT-XL-2, ...) or UNet / UNet-T",
                          Check(is_model_type, "expected a DiT size (DiT-XL/2 or DiT-XL-2, ...) or UNet / UNet-T"),
                          fixed=True)
    dataset_type: DatasetType = opt("digits", "digits (embedded) | Imagenet (latent shards) | CIFAR10 | ImageFolder",
                                    fixed=True)
    data_size: int = opt(8, "image (or latent) side length", POSITIVE, fixed=True)
    dataset_path: str = opt("", "data folder (latent shards, CIFAR-10 python batches or an ImageFolder)")
    velocity_loss_ratio: float = opt(0.75, "fraction of each batch given to the FM loss", UNIT, fixed=True)
    p: float = opt(1.0, "adaptive-weight power", NON_NEGATIVE, fixed=True)
    eps: float = opt(0.01, "adaptive-weight epsilon", above(0), fixed=True)
    time_mean: list[float] = opt([-0.2, -1.0, 0.2], "logit-normal means of [FM t, consistency s, consistency t]",
                                 THREE_TIMES, fixed=True)
    time_std: list[float] = opt([1.0, 0.8, 0.8], "logit-normal standard deviations, same order as time_mean",
                                THREE_TIMES, Check(lambda v: min(v) > 0, "standard deviations must be > 0"), fixed=True)
    cfg_scale: float = opt(1.0, "training guidance scale w (> 1 enables guided targets)", at_least(1), fixed=True)
    mix_ratio: float = opt(1.0, "m: the guided target mixed with the model's own prediction", UNIT, fixed=True)
    cfg_drop_rate: float = opt(0.0, "fraction of rows training the unconditional model", UNIT_OPEN, fixed=True)
    cfg_decay_time: float = opt(1.0, "tau: guidance decays for t > tau", above(0, " (>= 1 disables the decay)"),
                                fixed=True)
    l_schedule: str = opt("Exponent", "schedule of the consistency gap: Const | Linear | Cosine | Exponent, any case",
                          Check(lambda v: v.lower() in L_SCHEDULES, "expected Const, Linear, Cosine or Exponent"),
                          fixed=True)
    l_init_ratio: float = opt(0.1, "the schedule's first gap ratio", UNIT, fixed=True)
    l_end_ratio: float = opt(0.002, "the schedule's last gap ratio", UNIT, fixed=True)
    total_steps: int = opt(400000, "optimizer steps of the whole run", POSITIVE, fixed=True)
    ema_decay_rate: float = opt(0.9999, "EMA decay per step", UNIT_OPEN)
    learning_rate: float = opt(1e-4, "optimizer learning rate", above(0))
    betas: list[float] = opt([0.9, 0.99], "Adam betas", Check(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                                                              "expected two numbers in [0, 1)"))
    weight_decay: float = opt(0.0, "optimizer weight decay", NON_NEGATIVE)
    batch_size: int = opt(256, "global batch (all ranks, all micro-batches)", POSITIVE, fixed=True)
    num_workers: int = opt(0, "the reference's DataLoader workers; not used here (only 0 is accepted)", unused(0))
    prefetch_factor: int = opt(2, "the reference's DataLoader prefetch; not used here (only 2 is accepted)", unused(2))
    eval_steps: int = opt(0, "periodic FID every N steps (0 = off; needs eval_fid_reference and eval_inception)")
    eval_batch_size: int = opt(125, "samples per network call in the periodic FID")
    eval_NFE: int = opt(1, "network evaluations per sample in the periodic FID", POSITIVE)
    eval_demo_steps: int = opt(1000, "sample grid PNG every N steps (0 = off)")
    eval_demo_shape: list[int] = opt([4, 8], "sample grid [rows, columns]", Check(
        lambda v: len(v) == 2 and min(v) >= 1, "expected [rows, columns], both >= 1"))
    logging_steps: int = opt(100, "a metrics.jsonl record every N steps", POSITIVE)
    # (ours, kept beside logging_steps: what a run reports besides metrics.jsonl; docs/cluster.md)
    tensorboard: bool = opt(False, "also write metrics.jsonl's scalars as TensorBoard events to RUN_DIR/tensorboard "
                                   "(needs the tensorboard package: pip install 'soflow_fast[tensorboard]')")
    profile_steps: list[int] = opt([], "[start, end]: a torch.profiler trace of steps start..end (inclusive) in "
                                       "RUN_DIR/profile/, one chrome-trace JSON per rank ([] = off)", PROFILE_WINDOW)
    memory_snapshot: bool = opt(False, "CUDA only: record allocations over profile_steps and dump a snapshot "
                                       "(pytorch.org/memory_viz) to RUN_DIR/profile/")
    bad_images: BadImages = opt("error", "an ImageFolder image that cannot be decoded: error (stop, naming the file) "
                                         "| skip (record it in RUN_DIR/bad_images.jsonl and read a substitute)")
    ckpt_saving_steps: int = opt(25000, "a checkpoint every N steps", POSITIVE)
    seed: int = opt(42, "seed of initialization, data order and noise", fixed=True)
    # --- ours ------------------------------------------------------------------------------------
    eval_num_samples: int = opt(10000, "samples per periodic FID", at_least(2))
    eval_fid_reference: str = opt("", ".npz with mu/sigma (an ADM reference batch or `evaluate --save-ref-stats`, "
                                      "whose pool features add precision and recall) or reference images")
    eval_inception: str = opt("", "LOCAL Inception-v3 FID weights (pt_inception-2015-12-05-6726825d.pth)")
    eval_vae: str = opt("", "LOCAL AutoencoderKL folder to decode latents for the FID")
    num_classes: Optional[int] = opt(None, "label classes (null = from the dataset: digits 10, Imagenet 1000, "
                                           "CIFAR10 0)", NON_NEGATIVE, fixed=True)
    hidden_size: Optional[int] = opt(None, "override of the size table's width (small custom models)", fixed=True)
    depth: Optional[int] = opt(None, "override of the size table's number of blocks", fixed=True)
    num_heads: Optional[int] = opt(None, "override of the size table's attention heads", fixed=True)
    patch_size: Optional[int] = opt(None, "override of the size table's patch size", fixed=True)
    kernels: KernelMode = opt("eager", "op implementations: eager | triton | auto (per op, what kernels/choices.py "
                                       "measured faster on this device); eager by default (README, 'Measured')")
    precision: PrecisionMode = opt("auto", "auto (bf16-secant on CUDA, fp32 elsewhere) | fp32 (+TF32 on GPUs) | bf16 "
                                           "| bf16-split | bf16-secant (soflow_fast/precision.py); a bf16 mode on a "
                                           "CPU runs the exact bf16 emulator")
    optimizer: OptimizerKind = opt("auto", "auto (radam for CIFAR10, as the reference; else adamw) | adamw | radam | "
                                           "fused_adamw_ema (csrc extension) | apex", fixed=True)
    ema_every: int = opt(0, "EMA every N steps with decay^N in float64 (0 = auto: 16 for CIFAR10, else 1)",
                         NON_NEGATIVE)
    augment_p: Optional[float] = opt(None, "EDM augmentation probability (null = auto: 0.12 for CIFAR10, else 0)",
                                     UNIT, fixed=True)
    grad_clip: float = opt(0.0, "max gradient norm (0 = no clipping; the norm is logged either way)", NON_NEGATIVE)
    lr_schedule: LrSchedule = opt("constant", "learning-rate decay after the warm-up: constant (the reference) | "
                                  "linear | cosine, down to learning_rate x lr_end_ratio at total_steps "
                                  "(docs/algorithm.md section 9)")
    lr_warmup_steps: int = opt(0, "steps of linear learning-rate warm-up from learning_rate / lr_warmup_steps",
                               NON_NEGATIVE)
    lr_end_ratio: float = opt(0.0, "linear or cosine lr_schedule: the learning rate at total_steps, as a fraction of "
                                   "learning_rate", UNIT)
    ema_warmup: bool = opt(False, "EMA decay min(ema_decay_rate, (1 + k) / (10 + k)): for short runs")
    ema_power: Optional[float] = opt(None, "the power-function EMA: decay min(ema_decay_rate, (k / (k + 1))^(ema_power "
                                           "+ 1)) at step k, so the EMA averages the run's weights in proportion to "
                                           "step^ema_power (0: the plain mean; lower: a longer average; "
                                           "docs/algorithm.md section 9); null = off", NON_NEGATIVE)
    on_nonfinite: OnNonfinite = opt("stop", "a non-finite loss or gradient's update is skipped on the device; stop "
                                            "raises at the next logging step or checkpoint, skip continues")
    max_consecutive_skips: int = opt(20, "on_nonfinite skip: stop (exit 1) once this many consecutive steps were "
                                         "skipped, found at the next logging step or checkpoint (0 = never)",
                                     NON_NEGATIVE)
    save_every_minutes: float = opt(0.0, "also save a checkpoint whenever this many minutes have passed since the "
                                         "last timed save (0 = off); SIGTERM/SIGINT/SIGUSR1 save and stop anyway",
                                    NON_NEGATIVE)
    resume_fallback: bool = opt(False, "a damaged newest checkpoint (CHECKSUMS.json): false stops naming the file; "
                                       "true resumes from the newest intact one, with a warning")
    resume_from: Union[int, str] = opt("", "resume from this step of the run, or this checkpoint directory, instead "
                                           "of the newest ('' = the newest); newer checkpoints are moved to "
                                           "ckpts/abandoned/; a requeue of the same command continues its own",
                                       Check(lambda v: not isinstance(v, int) or v >= 0, "must be a step >= 0"))
    init_from: str = opt("", "a new run starts from these weights (a consolidated .pt, e.g. from import-checkpoint, "
                             "or a training checkpoint directory): the network and its EMA from the raw weights, a "
                             "fresh optimizer, step 0; a run with checkpoints resumes from them instead", fixed=True)
    keep_checkpoints: int = opt(3, "most recent checkpoints kept (0 = all); the newest one without skipped steps "
                                   "since the checkpoint before it is kept too")
    quality_report: bool = opt(True, "digits: the classifier-based quality report at the end")
    device: Device = opt("auto", "auto (CUDA when available) | cpu | cuda")
    parallel: ParallelMode = opt("none", "none | ddp | fsdp (FSDP2: bf16 params/compute, fp32 reduction)")
    micro_batch_size: int = opt(0, "rows per forward on a rank (0 = batch_size / world); the rest accumulates",
                                NON_NEGATIVE)
    activation_checkpointing: bool = opt(False, "recompute each DiT block in the backward")
    compile: CompileMode = opt("auto", "auto (model on CUDA, none elsewhere) | none | blocks (each DiT block) | model "
                                       "(the whole network; per block under FSDP) | step (the whole loss of a step, "
                                       "its three calls and the loss math, one graph; one process, no dropout)")
    reshard_after_forward: Union[bool, Literal["auto"]] = opt(
        "auto", "FSDP2 blocks free their gathered weights after each forward: auto (false on one node, <= 8 ranks; "
                "true beyond) | true | false")
    peak_tflops: float = opt(0.0, "per-device peak for MFU (0 = from the table of known devices)", NON_NEGATIVE)
    attention: AttentionMode = opt("auto", "the DiT's attention, chosen once at build: auto (the measured fastest for "
                                           "this GPU, soflow_fast/attention_table.json; without one flash-attn when "
                                           "usable, else sdpa) | sdpa | flash-attn | cudnn | flash | efficient | math "
                                           "(that SDPA backend forced)")
    cuda_graphs: bool = opt(False, "UNTESTED ON A GPU: torch.compile(mode='reduce-overhead') of the network (or of "
                                   "the step) with a capturable optimizer; needs compile model (or auto) or step on "
                                   "CUDA")

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
    def ema_info(self) -> dict[str, Any]:
        """The EMA's settings, recorded with a quality report."""
        return {"ema_decay_rate": self.ema_decay_rate, "ema_warmup": self.ema_warmup, "ema_power": self.ema_power}

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based; optim.lr_at)."""
        return lr_at(step, self.learning_rate, self.lr_schedule, self.lr_warmup_steps, self.total_steps,
                     self.lr_end_ratio)

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
        hints = _hints()
        unknown = sorted(set(raw) - set(hints))
        if unknown:
            more = f" (and {unknown[1:]})" if unknown[1:] else ""
            raise ConfigError(f"{source}: unknown key {unknown[0]!r}{more}")
        cfg = cls(**{k: _coerce(k, v, hints[k], source) for k, v in raw.items()})
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Each field's declared range, then the rules that relate fields."""
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: {key} = {getattr(self, key)!r}: {why}")

        try:
            self.flow
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for check in f.metadata["checks"]:
                if value is not None and not check.ok(value):
                    raise bad(f.name, check.why)
        dit = self.model_type.startswith("DiT")
        if self.cfg_scale > 1.0 and self.cfg_drop_rate <= 0.0:
            raise bad("cfg_drop_rate", "cfg_scale > 1 needs cfg_drop_rate > 0 (the unconditional model is its teacher)")
        if self.cfg_scale > 1.0 and self.num_classes == 0:
            raise bad("cfg_scale", "guidance needs class labels (num_classes > 0)")
        if self.l_schedule.lower() == "exponent" and (self.l_init_ratio <= 0 or self.l_end_ratio <= 0):
            raise bad("l_end_ratio" if self.l_end_ratio <= 0 else "l_init_ratio", "Exponent needs ratios > 0")
        if self.ema_power is not None and self.ema_warmup:
            raise bad("ema_power", "ema_power and ema_warmup each set the EMA's early decay; choose one")
        if self.lr_warmup_steps >= self.total_steps:
            raise bad("lr_warmup_steps", f"the warm-up must end before total_steps ({self.total_steps})")
        if self.lr_schedule == "constant" and self.lr_end_ratio != 0.0:
            raise bad("lr_end_ratio", "applies to a decaying lr_schedule (linear or cosine), not constant")
        if self.attention != "auto" and not dit:
            raise bad("attention", "the U-Net's attention is chosen per call; only auto applies to it")
        if self.compile == "blocks" and not dit:
            raise bad("compile", "'blocks' compiles each DiT block; the U-Net has none: use model")
        if self.precision == "bf16-secant" and not dit:
            raise bad("precision", "the secant pair is built into the DiT; use bf16-split for a U-Net")
        if bool(self.eval_fid_reference) != bool(self.eval_inception):
            raise bad("eval_inception" if self.eval_fid_reference else "eval_fid_reference",
                      "periodic FID needs both eval_fid_reference and eval_inception")
        if self.eval_fid_reference and self.dataset_type == "Imagenet" and not self.eval_vae:
            raise bad("eval_vae", "FID of latent samples needs a local VAE folder to decode them")
        if self.memory_snapshot and not self.profile_steps:
            raise bad("memory_snapshot", "the snapshot covers the profile_steps window; set profile_steps too")
        if self.resolved_optimizer == "fused_adamw_ema" and self.resolved_ema_every != 1:
            raise bad("optimizer", "fused_adamw_ema updates the EMA every step; set ema_every: 1")

    def check_files(self) -> None:
        """The files and folders the run will read exist, checked at start-up (not in validate: a config may be
        written on another machine), so that a typo in a path used only at the first evaluation fails before the
        first step, naming the key. Their contents are checked where they are read. init_from is checked when a new
        run reads it (train.py): a resumed run never does."""
        def need(key: str, is_dir: bool, inner: str = "") -> None:
            path = Path(getattr(self, key))
            found = path.is_dir() if is_dir else path.is_file()
            if not found or (inner and not (path / inner).is_file()):
                what = (f"a folder without {inner}" if found else "no such folder") if is_dir else "no such file"
                raise ConfigError(f"config: {key} = {str(path)!r}: {what}")

        if self.dataset_type != "digits" and self.dataset_path:
            need("dataset_path", is_dir=True)
        if self.eval_steps and self.eval_fid_reference:  # what the periodic FID reads (evaluation/periodic.py)
            need("eval_fid_reference", is_dir=False)
            need("eval_inception", is_dir=False)
            if self.eval_vae:
                need("eval_vae", is_dir=True, inner="config.json")


@functools.cache
def _hints() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


_MISMATCH = object()


def _conform(value: Any, hint: Any) -> Any:
    """`value` as the type `hint` declares (an int is accepted for a float), or _MISMATCH."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return next((v for v in (_conform(value, arm) for arm in args) if v is not _MISMATCH), _MISMATCH)
    if origin is list:
        items = [_conform(v, args[0]) for v in value] if isinstance(value, list) else [_MISMATCH]
        return _MISMATCH if _MISMATCH in items else items
    if origin is Literal:  # the choice itself is checked after the type, with its own message
        hint = type(args[0])
    if hint is type(None):
        return None if value is None else _MISMATCH
    if hint is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _MISMATCH
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    return value if isinstance(value, hint) else _MISMATCH


def _type_name(hint: Any, choices: bool = False) -> str:
    """'float', 'list[int]', 'int or null', ...; a Literal reads as str, or as 'a | b | c' with choices=True."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arm, choices) for arm in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is Literal:
        return " | ".join(args) if choices else type(args[0]).__name__
    return "null" if hint is type(None) else hint.__name__


def _choices(hint: Any) -> tuple[str, ...]:
    """The Literal values a hint allows (directly or in a union); () when it declares none."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    return sum((_choices(arm) for arm in get_args(hint) if get_origin(hint) in (Union, types.UnionType)), ())


def _finite(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(math.isfinite(v) for v in values if isinstance(v, float))


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """`value` checked against the field's declared type and choices."""
    if key == "compile" and isinstance(value, bool):  # the retired form: true compiled each block
        raise ConfigError(f"{source}: compile = {value!r}: booleans are gone; use one of {list(COMPILE_MODES)} "
                          "(true was blocks, false none)")
    out = _conform(value, hint)
    if out is _MISMATCH:
        raise ConfigError(f"{source}: {key} = {value!r}: expected {_type_name(hint)}")
    if not _finite(out):
        raise ConfigError(f"{source}: {key} = {value!r}: expected a finite number")
    allowed = _choices(hint)
    if allowed and isinstance(out, str) and out not in allowed:
        why = (f"expected {', '.join(allowed)}, true or false" if bool in get_args(hint) else
               f"expected one of {list(allowed)}")
        raise ConfigError(f"{source}: {key} = {value!r}: {why}")
    return out


def config_help() -> str:
    """Every key with its type, default and doc: what `soflow-fast train --help-config` prints."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        lines.append(f"{f.name}: {_type_name(_hints()[f.name], choices=True)} = {json.dumps(default)}")
        doc = f.metadata["doc"] + (" [fixed for a run: a resume refuses a change]" if f.metadata["fixed"] else "")
        lines += textwrap.wrap(doc, 116, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader that also reads YAML 1.2 exponent floats without a dot or exponent sign (1e-4, 3E5):
    YAML 1.1 reads those as strings, so `learning_rate: 1e-4` would be rejected as "expected float"."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """Parse YAML as yaml.safe_load does (plain data, no object construction), with 1e-4 read as a float."""
    return yaml.load(text, Loader=_Loader)


def load_config(path: str | os.PathLike, overrides: Optional[dict[str, Any]] = None) -> TrainConfig:
    """Read a YAML config; `overrides` (already parsed values) replace its keys. An empty file is an error: it would
    otherwise train the defaults (a 130M-parameter DiT) without saying so."""
    source = f"config {path}"
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot be read ({e.strerror})") from None
    try:
        raw = read_yaml(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not a UTF-8 text file (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({one_line(e)})") from None
    if raw is None or raw == {}:
        raise ConfigError(f"{source}: no keys; a config names at least the model and the data (see configs/, "
                          "`soflow-fast train --help-config`)")
    if isinstance(raw, dict) and overrides:
        raw = {**raw, **overrides}
    return TrainConfig.from_dict(raw, source=source)


def parse_override(text: str) -> tuple[str, Any]:
    """--set 'key=value', the value read as YAML (so numbers, lists and booleans work)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value")
    try:
        return key.strip(), read_yaml(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({one_line(e)})") from None
