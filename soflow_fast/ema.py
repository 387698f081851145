"""The exponential moving average of the weights, the model SoFlow samples from.

One rule: after every `every`-th finished step k (k % every == 0), ema <- d ema + (1 - d) param with
d = decay(k) ** every, where decay(k) = min(rate, (1 + k) / (10 + k)) with warm-up, min(rate, (k / (k + 1))^(power + 1))
with a power (the power-function profile: the EMA after n updates averages the weights of updates 1..n about in
proportion to i^power; docs/algorithm.md section 9), else rate; a step whose flag
found_inf is set leaves it unchanged, decided on the device (optim.optimizer_step). The EMA tensors are fp32 and
sharded like the parameters. Its arithmetic follows the reference recipe: every step (the ImageNet recipe) it is an
fp32 lerp, fused into the optimizer's pass with optimizer fused_adamw_ema (optim.step_with_ema); every N steps (the
reference's CIFAR-10 recipe, decay 0.9999^16) it is computed in float64, as the reference does.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .checkpoint import load_state_strict
from .models import describe, model_from_config
from .optim import optimizer_step, step_with_ema
from .parallel import full_tensor


def ema_decay(rate: float, warmup: bool, step: int, power: Optional[float] = None) -> float:
    """The EMA decay at finished step k (0-based); with warm-up, (1 + k) / (10 + k) caps it early in a run; with a
    power, (k / (k + 1))^(power + 1) does (0 at k = 0: the first update copies the weights)."""
    if power is not None:
        return min(rate, (step / (step + 1)) ** (power + 1))
    return min(rate, (1 + step) / (10 + step)) if warmup else rate


class EMA:
    def __init__(self, names: list[str], params: list[Tensor], rate: float, warmup: bool, every: int,
                 power: Optional[float] = None):
        self.names, self.params = names, params
        self.tensors = [p.detach().clone().float() for p in params]
        self.rate, self.warmup, self.every, self.power = rate, warmup, every, power

    def state_dict(self) -> dict[str, Tensor]:
        """The EMA tensors by parameter name (a checkpoint fills them in place)."""
        return dict(zip(self.names, self.tensors))

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, step: int, found_inf: Tensor) -> None:
        """The optimizer step, then this EMA's update for finished step `step`; both no-ops where found_inf is 1."""
        decay = ema_decay(self.rate, self.warmup, step, self.power)
        if self.every == 1:
            step_with_ema(optimizer, self.tensors, self.params, decay, found_inf)
            return
        optimizer_step(optimizer, found_inf)
        if step % self.every == 0:
            d = decay ** self.every
            skip = found_inf.bool()
            for e, p in zip(self.tensors, self.params):
                e.copy_(torch.where(skip, e, (d * e.double() + (1 - d) * p.detach().double()).float()))

    def module(self, net: torch.nn.Module, device: torch.device, attention: Callable) -> torch.nn.Module:
        """A plain copy of `net` (its attention: `attention`) holding the whole EMA weights, in eval mode
        (collective under FSDP: every rank must call it). Buffers (the U-Net's fixed filters) are as built."""
        model = model_from_config(describe(net), net.cfg.kernels, device, attention)
        state = model.state_dict()
        state.update({n: full_tensor(t) for n, t in zip(self.names, self.tensors)})
        load_state_strict(model, state, "EMA weights")
        return model.eval()
