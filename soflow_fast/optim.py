"""Optimizers and the EMA of the weights.

Interchangeable backends, picked by `build_optimizer(kind, ...)`:

- 'adamw': torch.optim.AdamW (fused=True when every parameter is on CUDA, foreach otherwise); the EMA
  is a separate pass, `ema_update_`. This is the reference. 'radam': torch.optim.RAdam, the reference's
  CIFAR-10 optimizer, likewise with the separate EMA.
- 'fused_adamw_ema': `FusedAdamWEMA`, the C++/CUDA extension soflow_fast._fused_optim (csrc/), doing
  the AdamW step and the EMA update in one pass: p, g, m, v, ema are read once and p, m, v, ema written
  once, instead of AdamW's pass plus the EMA's second read of p and read/write of ema.
- 'apex': NVIDIA apex's FusedAdam (adam_w_mode) with the separate EMA, only if real NVIDIA apex is
  installed (the PyPI package called `apex` is an unrelated project).

`step_with_ema(optimizer, ema_params, params, decay)` is the one call a trainer needs for any of them (ema.EMA
makes it, with the decay schedule). Given a `found_inf` flag (a non-finite gradient), it skips the whole update on
the device, so the host never reads the flag: see `optimizer_step`.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

try:
    from . import _fused_optim
except ImportError:  # extension not built: see BUILD_HINT
    _fused_optim = None

KINDS = ("adamw", "radam", "fused_adamw_ema", "apex")
LR_SCHEDULES = ("constant", "linear", "cosine")
BUILD_HINT = (
    "soflow_fast._fused_optim is not built; rebuild the package with torch importable at build time: "
    "`pip install --no-build-isolation -e .` (a C++ compiler is needed; for its CUDA kernel, a CUDA "
    "build of torch and nvcc on the PATH / CUDA_HOME)"
)


def _apex_fused_adam():
    try:
        from apex.optimizers import FusedAdam  # NVIDIA apex, not the PyPI web toolkit named apex
    except Exception:  # noqa: BLE001 -- any import failure means "not available"
        return None
    return FusedAdam


def optimizer_backends() -> dict:
    """Which optimizer backends this process can use, for start-up logging."""
    return {
        "fused_adamw_ema_cpu": _fused_optim is not None,
        "fused_adamw_ema_cuda": _fused_optim is not None and bool(_fused_optim.has_cuda()),
        "torch_fused_adamw_cuda": torch.cuda.is_available(),
        "apex_fused_adam": _apex_fused_adam() is not None,
    }


@torch.no_grad()
def ema_update_(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float,
                skip: Optional[Tensor] = None) -> None:
    """ema = decay*ema + (1-decay)*param, in place, in fp32 (ema tensors are fp32). `skip` (a 0-dim fp32 flag on the
    device, 1.0 = skip) turns the weight 1-decay into 0 on the device: ema + 0*(param - ema) is ema exactly for
    finite values."""
    ema_params, params = list(ema_params), list(params)
    if not ema_params:
        return
    src = [p.detach().float() for p in params]  # no copy for fp32 params
    if skip is None:
        torch._foreach_lerp_(ema_params, src, 1.0 - decay)
    else:
        weight = (1.0 - skip) * (1.0 - decay)
        torch._foreach_lerp_(ema_params, src, [weight] * len(ema_params))


class FusedAdamWEMA(torch.optim.Optimizer):
    """AdamW whose step also updates an fp32 EMA of each parameter, in one fused pass.

    The math is torch.optim.AdamW's (non-amsgrad, non-maximize), then ema = d*ema + (1-d)*param with
    the updated param. The EMA lives in state['ema']; pass `ema_params` (e.g. an EMA model's parameters,
    same order as `params`) to have the step update those tensors in place. The EMA decay is the group's
    'ema_decay', overridable per step: `step(ema_decay=0.0)` copies the weights into the EMA.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 ema_decay=0.9999, ema_params: Iterable[torch.Tensor] | None = None):
        if _fused_optim is None:
            raise RuntimeError(BUILD_HINT)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, ema_decay=ema_decay)
        super().__init__(params, defaults)
        all_params = [p for group in self.param_groups for p in group["params"]]
        ema_params = list(ema_params) if ema_params is not None else None
        if ema_params is not None and len(ema_params) != len(all_params):
            raise ValueError(f"ema_params has {len(ema_params)} tensors for {len(all_params)} params")
        for i, p in enumerate(all_params):
            if p.dtype != torch.float32:
                raise TypeError(f"FusedAdamWEMA needs fp32 (master) params, got {p.dtype}")
            ema = p.detach().clone() if ema_params is None else ema_params[i]
            if ema.dtype != torch.float32 or ema.shape != p.shape or ema.device != p.device:
                raise ValueError("each EMA tensor must be fp32 with its param's shape and device")
            self.state[p]["ema"] = ema  # eager, so the EMA exists before the first step

    def ema_tensors(self) -> list[torch.Tensor]:
        return [self.state[p]["ema"] for group in self.param_groups for p in group["params"]]

    def load_state_dict(self, state_dict):
        # Loading replaces state tensors; copy into the old EMA tensors so ema_params stay aliased.
        old = self.ema_tensors()
        super().load_state_dict(state_dict)
        for ema, p in zip(old, (p for group in self.param_groups for p in group["params"])):
            loaded = self.state[p].get("ema")
            if loaded is not None and loaded is not ema:
                ema.copy_(loaded)
            self.state[p]["ema"] = ema

    @torch.no_grad()
    def step(self, closure=None, ema_decay: float | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            decay = group["ema_decay"] if ema_decay is None else ema_decay
            beta1, beta2 = group["betas"]
            # One kernel call per (device, grad dtype, step): usually exactly one.
            buckets: dict[tuple, tuple[list, ...]] = {}
            no_grad_p, no_grad_e = [], []
            for p in group["params"]:
                state, grad = self.state[p], p.grad
                if grad is None:  # AdamW leaves p alone; the EMA still moves towards it
                    no_grad_p.append(p)
                    no_grad_e.append(state["ema"])
                    continue
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                # A plain int (torch.optim.AdamW's tensor step, from a converted checkpoint, reads too):
                # a CPU tensor op per parameter would cost more host time than the kernel on a GPU.
                k = state["step"] = int(state["step"]) + 1
                key = (p.device, grad.dtype, k)
                lists = buckets.get(key)
                if lists is None:
                    lists = buckets[key] = ([], [], [], [], [])
                lists[0].append(p)
                lists[1].append(grad)
                lists[2].append(state["exp_avg"])
                lists[3].append(state["exp_avg_sq"])
                lists[4].append(state["ema"])
            for (_, _, k), lists in buckets.items():
                _fused_optim.fused_adamw_ema_(*lists, k, group["lr"], beta1, beta2, group["eps"],
                                              group["weight_decay"], decay)
            ema_update_(no_grad_e, no_grad_p, decay)
        return loss


def lr_at(step: int, base: float, schedule: str = "constant", warmup: int = 0, total: int = 1,
          end_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based) of a `total`-step run (docs/algorithm.md section 9): a
    linear warm-up base * (step + 1) / warmup over the first `warmup` steps, then `schedule` from base towards
    base * end_ratio, reached at step `total` (constant: base throughout). A function of the step alone, so a resumed
    run continues the same curve."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return base * (end_ratio + (1.0 - end_ratio) * shape)


def build_optimizer(kind: str, params, *, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
                    eps: float = 1e-8, ema_params: Iterable[torch.Tensor] | None = None,
                    ema_decay: float = 0.9999, capturable: bool = False) -> torch.optim.Optimizer:
    """The optimizer for `kind`; `ema_params` are only handed to 'fused_adamw_ema' (which updates them).
    capturable (cuda_graphs): AdamW keeps its whole state on the GPU, safe to capture in a CUDA graph (RAdam on CUDA
    always is); the host-stepped 'fused_adamw_ema' and 'apex' are unchanged."""
    params = list(params)
    tensors = [t for g in params for t in g["params"]] if params and isinstance(params[0], dict) else params
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    if kind == "adamw":
        flag = {"fused": True, "capturable": capturable} if on_cuda else {"foreach": True}
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **flag)
    if kind == "radam":  # the reference's CIFAR-10 optimizer, with its (L2-style) weight decay as the reference
        # capturable on CUDA: the step count then lives on the GPU, where a skipped step can undo it without a sync
        return torch.optim.RAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, capturable=on_cuda)
    if kind == "fused_adamw_ema":
        return FusedAdamWEMA(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             ema_decay=ema_decay, ema_params=ema_params)
    if kind == "apex":
        fused_adam = _apex_fused_adam()
        if fused_adam is None:
            raise RuntimeError("optimizer 'apex' needs NVIDIA apex (github.com/NVIDIA/apex, built with "
                               "--cuda_ext); `apex.optimizers.FusedAdam` is not importable here. The PyPI "
                               "package named apex is unrelated. Use 'adamw' or 'fused_adamw_ema'.")
        return fused_adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
    raise ValueError(f"unknown optimizer kind {kind!r}; expected one of {KINDS}")


def optimizer_step(optimizer: torch.optim.Optimizer, found_inf: Optional[Tensor] = None, **kwargs) -> None:
    """optimizer.step(**kwargs); a no-op, decided on the device, when `found_inf` (a 0-dim fp32 tensor on the
    parameters' device) is 1.0: the parameters and the optimizer's tensor state keep their values, bit for bit.

    torch's fused optimizers ('adamw' on CUDA) take the flag themselves, through the attributes GradScaler sets
    (their kernels return early and they undo their step-count increment). Any other optimizer steps on a snapshot:
    each tensor it writes goes back to its saved value where the flag is set; state tensors a first step creates go
    back to zero, their starting value in every optimizer of KINDS. The snapshot costs a copy of the parameters and
    state per step. A step count kept as a Python int (FusedAdamWEMA, apex) lives on the host and cannot wait for the
    flag without a sync: there, a skipped step still counts.
    """
    if found_inf is None:
        optimizer.step(**kwargs)
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, found_inf
        try:
            optimizer.step(**kwargs)
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    else:
        _step_or_restore(optimizer, found_inf, kwargs)


def _written(optimizer: torch.optim.Optimizer) -> dict[tuple[int, str], Tensor]:
    """The tensors a step writes, by (parameter index, state key; '' for the parameter itself)."""
    slots: dict[tuple[int, str], Tensor] = {}
    for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        slots[i, ""] = p
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                slots[i, key] = value
    return slots


@torch.no_grad()
def _step_or_restore(optimizer: torch.optim.Optimizer, found_inf: Tensor, kwargs: dict) -> None:
    saved = {slot: t.clone() for slot, t in _written(optimizer).items()}
    optimizer.step(**kwargs)
    skip = found_inf.bool()
    for slot, t in _written(optimizer).items():
        before = saved.get(slot)
        if before is None:
            t.masked_fill_(skip, 0.0)
        else:
            torch.where(skip, before, t, out=t)


def step_with_ema(optimizer: torch.optim.Optimizer, ema_params: Sequence[torch.Tensor],
                  params: Sequence[torch.Tensor], decay: float, found_inf: Optional[Tensor] = None) -> None:
    """optimizer.step() then the EMA update, fused when the optimizer is FusedAdamWEMA; with `found_inf` set (see
    `optimizer_step`) neither changes anything.

    For FusedAdamWEMA, `ema_params` must be the tensors it was built with (its own EMA otherwise).
    """
    if isinstance(optimizer, FusedAdamWEMA):
        optimizer_step(optimizer, found_inf, ema_decay=decay)  # its EMA is optimizer state: restored with the rest
    else:
        optimizer_step(optimizer, found_inf)
        ema_update_(ema_params, params, decay, skip=found_inf)
