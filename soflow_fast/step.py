"""One SoFlow training step's loss in three network calls (docs/algorithm.md sections 6 and 8).

1. one batched no-gradient teacher call at x_t: FM unconditional, consistency unconditional and (mix != 1)
   consistency conditional;
2. the no-gradient call at x_l, which needs the teacher's target velocity u;
3. the gradient call on all rows (FM at (t, t), consistency at (t, s)).
The math is identical to the reference's six calls (tests/test_step.py checks loss terms, statistics and every
parameter gradient against a transcription of them). All randomness comes in through `StepNoise`.

The precision mode (soflow_fast.precision) says which calls run under bf16 autocast. A mode whose consistency pair
differs from its FM rows splits call 3 into an FM call and a consistency call; the secant mode computes F_l inside
the consistency call as F_t + dF (docs/precision.md section 5), so call 2 disappears.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .flow import Flow, bcast, consistency_times, l_ratio, logit_normal
from .kernel_ops import KernelOps, kernel_ops_for
from .loss import at_least_fp32, consistency_loss, consistency_point, consistency_velocity
from .precision import MODES, Precision, region


@dataclass(frozen=True)
class SoFlowHParams:
    """The loss hyper-parameters, with the reference configs' names (docs/algorithm.md section 6)."""

    velocity_loss_ratio: float = 0.75
    p: float = 1.0
    eps: float = 0.01
    time_mean: tuple[float, float, float] = (-0.2, -1.0, 0.2)
    time_std: tuple[float, float, float] = (1.0, 0.8, 0.8)
    cfg_scale: float = 1.0
    mix_ratio: float = 1.0
    cfg_drop_rate: float = 0.0
    cfg_decay_time: float = 1.0
    l_schedule: str = "exponent"
    l_init_ratio: float = 0.1
    l_end_ratio: float = 0.002
    total_steps: int = 400000

    def split(self, batch: int) -> tuple[int, int]:
        n_fm = int(math.floor(self.velocity_loss_ratio * batch))
        return n_fm, batch - n_fm

    def forward_equivalents(self, batch: int, guided: bool) -> float:
        """Network forward costs of one step per docs/algorithm.md section 8: backward counts as two forwards."""
        n_fm, n_c = self.split(batch)
        teacher = (n_fm + n_c * (2 if self.mix_ratio != 1.0 else 1)) if guided else 0
        return 3 * batch + teacher + n_c


@dataclass
class StepNoise:
    """Every random draw of one step. x1 [B, ...]; t_fm [n_fm]; s_draw, t_draw [n_c] (before the clamps);
    cfg_mask [B] bool (first n_fm rows FM); dropout_seed seeds the shared stream of the F_t and F_l calls."""

    x1: Tensor
    t_fm: Tensor
    s_draw: Tensor
    t_draw: Tensor
    cfg_mask: Tensor
    dropout_seed: int = 0


def draw_noise(hp: SoFlowHParams, x0: Tensor, guided: bool, generator: Optional[torch.Generator] = None,
               dropout_seed: int = 0) -> StepNoise:
    """Draw one step's randomness from `generator` (on x0's device). `dropout_seed` is a host int (the trainer derives
    one per step and micro-batch), not a draw: reading a draw back to the host would wait for the device."""
    B, dev = x0.shape[0], x0.device
    n_fm, n_c = hp.split(B)
    x1 = torch.randn(x0.shape, generator=generator, device=dev, dtype=torch.float32)
    t_fm = logit_normal(n_fm, hp.time_mean[0], hp.time_std[0], generator=generator, device=dev)
    s_draw = logit_normal(n_c, hp.time_mean[1], hp.time_std[1], generator=generator, device=dev)
    t_draw = logit_normal(n_c, hp.time_mean[2], hp.time_std[2], generator=generator, device=dev)
    u = torch.rand(B, generator=generator, device=dev)
    mask = (u < hp.cfg_drop_rate) if guided else torch.zeros(B, dtype=torch.bool, device=dev)
    return StepNoise(x1, t_fm, s_draw, t_draw, mask, dropout_seed)


def is_stochastic(net: nn.Module) -> bool:
    """True when the network draws random numbers in its forward (dropout in train mode)."""
    return net.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in net.modules())


@contextlib.contextmanager
def _rng_stream(noise: StepNoise, offset: int, device: torch.device, enabled: bool):
    """Run a call on a stream seeded with noise.dropout_seed + offset (CPU and the CUDA device alike), restoring the
    global state after. The seed is read only when enabled: a compiled step would otherwise guard on its value."""
    if not enabled:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(noise.dropout_seed + offset)
        yield


@dataclass
class StepOutput:
    loss: Tensor          # the total loss to backpropagate
    stats: dict[str, Tensor]  # detached scalars: loss_fm, loss_c, mse_fm, weight_fm, mse_c, weight_c


def soflow_loss(net: Callable, flow: Flow, hp: SoFlowHParams, x0: Tensor, y: Optional[Tensor], noise: StepNoise,
                step: int, null_label: Optional[int], kernel_ops: KernelOps = kernel_ops_for("eager"),
                augment_labels: Optional[Tensor] = None, precision: Precision = MODES["fp32"]) -> StepOutput:
    """The loss of one step on batch (x0, y); `step` is the finished step count k (0 at the first step).
    augment_labels [B, D] (EDM augmentation) go with their rows to every network call."""
    ratio = l_ratio(hp.l_schedule, step, hp.total_steps, hp.l_init_ratio, hp.l_end_ratio)
    return _loss_at(net, flow, hp, x0, y, noise, ratio, null_label, kernel_ops, augment_labels, precision)


def compiled_loss(backend: str, cuda_graphs: bool = False) -> Callable[..., StepOutput]:
    """soflow_loss as one compiled graph per call shape (compile: step): the three network calls, the loss math
    and, through AOTAutograd, the whole backward, with no per-call or per-op host work between them.

    The l ratio enters as a 0-dim float64 device tensor filled on the device (no host-to-device copy), so the graph
    is reused at every step; the float64 value is rounded to the rows' dtype where it multiplies, as the Python float
    is in soflow_loss, so both compute the same numbers. A network that draws random numbers (dropout) is refused:
    its calls need the forked random streams of _rng_stream, which a single graph cannot hold.
    """
    graph = torch.compile(_loss_at, backend=backend, dynamic=False, fullgraph=True,
                          mode="reduce-overhead" if cuda_graphs else None)

    def loss(net: Callable, flow: Flow, hp: SoFlowHParams, x0: Tensor, y: Optional[Tensor], noise: StepNoise,
             step: int, null_label: Optional[int], kernel_ops: KernelOps = kernel_ops_for("eager"),
             augment_labels: Optional[Tensor] = None, precision: Precision = MODES["fp32"]) -> StepOutput:
        if isinstance(net, nn.Module) and is_stochastic(net):
            raise ValueError("compile 'step' needs a network without dropout; use compile 'model'")
        ratio = torch.full((), l_ratio(hp.l_schedule, step, hp.total_steps, hp.l_init_ratio, hp.l_end_ratio),
                           dtype=torch.float64, device=x0.device)
        return graph(net, flow, hp, x0, y, noise, ratio, null_label, kernel_ops, augment_labels, precision)

    return loss


def _loss_at(net: Callable, flow: Flow, hp: SoFlowHParams, x0: Tensor, y: Optional[Tensor], noise: StepNoise,
             ratio: float | Tensor, null_label: Optional[int], kernel_ops: KernelOps,
             augment_labels: Optional[Tensor], precision: Precision) -> StepOutput:
    """soflow_loss with the step's l ratio given (a float, or a 0-dim tensor in a compiled step)."""
    B = x0.shape[0]
    n_fm, n_c = hp.split(B)
    guided = y is not None and hp.cfg_scale > 1.0
    if guided and null_label is None:
        raise ValueError("cfg_scale > 1 needs a model with a null label (cfg_drop_rate > 0)")
    x0 = at_least_fp32(x0)
    dev = x0.device
    stochastic = isinstance(net, nn.Module) and is_stochastic(net)
    if precision.secant and (stochastic or augment_labels is not None):
        raise ValueError(f"precision {precision.name!r} needs a deterministic DiT (no dropout, no augment labels)")

    def bf16(on: bool):
        return region(precision, on, dev.type)

    xt_fm, vt_fm = flow.interpolate(x0[:n_fm], noise.x1[:n_fm], noise.t_fm)
    t_c, s_c, l_c = consistency_times(noise.s_draw, noise.t_draw, ratio)
    xt_c, vt_c = flow.interpolate(x0[n_fm:], noise.x1[n_fm:], t_c)
    y_m = torch.where(noise.cfg_mask, null_label, y) if guided else y

    def labels(rows: slice, which: Optional[Tensor]) -> Optional[Tensor]:
        return None if which is None else which[rows]

    def call(x: Tensor, t: Tensor, s: Tensor, y: Optional[Tensor], rows: slice | list[slice], **kw) -> Tensor:
        """net(x, t, s, y), plus the augment labels of `rows` for networks that take them."""
        if augment_labels is None:
            return net(x, t, s, y, **kw)
        rows = rows if isinstance(rows, list) else [rows]
        return net(x, t, s, y, torch.cat([augment_labels[r] for r in rows]))

    FM, C = slice(0, n_fm), slice(n_fm, B)

    # Call 1: the batched teacher (no gradient).
    F_unc_fm = F_unc_c = F_cond_c = None
    if guided:
        parts = [(xt_fm, noise.t_fm, torch.full((n_fm,), null_label, device=dev), FM),
                 (xt_c, t_c, torch.full((n_c,), null_label, device=dev), C)]
        if hp.mix_ratio != 1.0:
            parts.append((xt_c, t_c, y[n_fm:], C))
        with torch.no_grad(), bf16(precision.teacher_bf16):
            tt = torch.cat([p[1] for p in parts])
            F_teach = call(torch.cat([p[0] for p in parts]), tt, tt, torch.cat([p[2] for p in parts]),
                           [p[3] for p in parts])
        F_unc_fm, F_unc_c = F_teach[:n_fm], F_teach[n_fm:n_fm + n_c]
        F_cond_c = F_teach[n_fm + n_c:] if hp.mix_ratio != 1.0 else None

    # Call 2: the consistency point x_l (no gradient); the secant mode gets F_l from call 3 instead.
    mask_c = noise.cfg_mask[n_fm:]
    u = consistency_velocity(flow, xt_c, vt_c, t_c, F_unc=F_unc_c, F_cond=F_cond_c, mask=mask_c,
                             cfg_scale=hp.cfg_scale, mix_ratio=hp.mix_ratio, cfg_decay_time=hp.cfg_decay_time)
    F_l = dF = None
    if n_c and not precision.secant:
        x_l = consistency_point(xt_c, u, t_c, l_c)
        with torch.no_grad(), _rng_stream(noise, 0, dev, stochastic), bf16(precision.pair_bf16):
            F_l = call(x_l, l_c, s_c, labels(C, y_m), C)

    # Call 3: the gradient call. A stochastic network gets its consistency rows in a call of their own, so that F_t
    # sees exactly the random stream F_l saw; so does a mode that runs them in another precision than the FM rows.
    if stochastic or precision.secant or precision.fm_bf16 != precision.pair_bf16:
        with _rng_stream(noise, 1, dev, stochastic), bf16(precision.fm_bf16):
            F_fm = call(xt_fm, noise.t_fm, noise.t_fm, labels(FM, y_m), FM) if n_fm else xt_fm[:0]
        with _rng_stream(noise, 0, dev, stochastic), bf16(precision.pair_bf16):
            if not n_c:
                F_c = xt_c[:0]
            elif precision.secant:  # dF = F(x_l, l, s) - F(x_t, t, s), with x_l - x_t = u (l - t)
                F_c, dF = call(xt_c, t_c, s_c, labels(C, y_m), C, pair=(u * bcast(l_c - t_c, u), l_c - t_c))
            else:
                F_c = call(xt_c, t_c, s_c, labels(C, y_m), C)
    else:
        with bf16(precision.fm_bf16):
            F_all = call(torch.cat([xt_fm, xt_c]), torch.cat([noise.t_fm, t_c]), torch.cat([noise.t_fm, s_c]), y_m,
                         slice(0, B))
        F_fm, F_c = F_all[:n_fm], F_all[n_fm:]

    zero = x0.new_zeros(())
    loss_fm = mse_fm = w_fm = loss_c = mse_c = w_c = zero
    if n_fm:
        loss_fm, mse_fm, w_fm = kernel_ops.fm_loss(flow, F_fm, xt_fm, vt_fm, noise.t_fm, p=hp.p, eps=hp.eps,
                                                   F_unc=F_unc_fm, mask=noise.cfg_mask[:n_fm] if guided else None,
                                                   cfg_scale=hp.cfg_scale, mix_ratio=hp.mix_ratio,
                                                   cfg_decay_time=hp.cfg_decay_time)
    if n_c:
        if dF is None:
            loss_c, mse_c, w_c = kernel_ops.consistency_loss(flow, F_c, xt_c, u, t_c, s_c, l_c, F_l, p=hp.p, eps=hp.eps)
        else:  # the secant quotient (F_l = F_t + dF) has no fused version
            loss_c, mse_c, w_c = consistency_loss(flow, F_c, xt_c, u, t_c, s_c, l_c, F_l, p=hp.p, eps=hp.eps, dF=dF)
    total = loss_fm * (n_fm / B) + loss_c * (n_c / B)
    stats = dict(loss_fm=loss_fm.detach(), loss_c=loss_c.detach(), mse_fm=mse_fm, weight_fm=w_fm, mse_c=mse_c,
                 weight_c=w_c)
    return StepOutput(total, stats)
