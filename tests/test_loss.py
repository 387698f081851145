"""loss.py against docs/algorithm.md sections 4 and 5, in fp64: values, statistics and the gradient w.r.t. the network
output.

Tolerance: fp64 throughout, the same operations in a different order; 1e-10 relative is far above fp64 rounding
(~1e-16 per operation) and far below any formula error (a wrong term changes results at the 1e-2 level).
"""
import itertools

import pytest
import torch

from soflow_fast.flow import Flow
from soflow_fast.loss import consistency_loss, consistency_velocity, fm_loss

import reference_math as R

TOL = dict(rtol=1e-10, atol=1e-12)
CASES = list(itertools.product(("linear", "trig"), ("euler", "trig"),
                               [(1.0, 1.0, 1.0), (3.0, 0.25, 0.8), (2.0, 1.0, 1.0), (3.0, 0.5, 0.6)]))
NULL = 5


class TinyNet(torch.nn.Module):
    """A small smooth function of (x, t, s, y) with parameters, in fp64."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(32, 32, generator=g, dtype=torch.float64) * 0.2)
        self.emb = torch.nn.Parameter(torch.randn(NULL + 1, 32, generator=g, dtype=torch.float64) * 0.3)

    def forward(self, x, t, s, y):
        h = x.flatten(1) @ self.W + t[:, None] - 2 * s[:, None]
        if y is not None:
            h = h + self.emb[y]
        return torch.tanh(h).view_as(x)


def _inputs(B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 2, 4, 4, generator=g, dtype=torch.float64)
    x1 = torch.randn(B, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.98 + 0.01
    s = t * torch.rand(B, generator=g, dtype=torch.float64)
    l = t + (s - t) * 0.1
    y = torch.randint(0, NULL, (B,), generator=g)
    mask = torch.tensor([True, False, False, True, False, False])[:B]
    return x0, x1, t, s, l, y, mask


@pytest.mark.parametrize("noising,coef,guidance", CASES)
@pytest.mark.parametrize("p", [0.0, 0.75, 1.0])
def test_fm_loss_matches_section_4(noising, coef, guidance, p):
    w, m, tau = guidance
    net, flow = TinyNet(), Flow(noising, coef)
    x0, x1, t, _, _, y, mask = _inputs()
    ref = R.fm_reference(net, noising, coef, x0, x1, t, y, mask, w, m, tau, p, 0.01, NULL)
    ref_grads = torch.autograd.grad(ref[0], list(net.parameters()))

    x_t, v_t = flow.interpolate(x0, x1, t)
    guided = w > 1
    y_m = torch.where(mask, NULL, y) if guided else y
    F_pred = net(x_t, t, t, y_m)
    F_unc = net(x_t, t, t, torch.full_like(y, NULL)).detach() if guided else None
    ours = fm_loss(flow, F_pred, x_t, v_t, t, p=p, eps=0.01, F_unc=F_unc, mask=mask if guided else None,
                   cfg_scale=w, mix_ratio=m, cfg_decay_time=tau)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)
    grads = torch.autograd.grad(ours.loss, list(net.parameters()))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("noising,coef,guidance", CASES[:4] + CASES[-4:])
def test_fm_gradient_wrt_output_is_the_formula(noising, coef, guidance):
    """dL/dF_i = weight_i * 2 (v_pred - target)_i * db/ds(t,t) / (N B): weight, target and mix are constants."""
    w, m, tau = guidance
    flow = Flow(noising, coef)
    x0, x1, t, _, _, y, mask = _inputs()
    x_t, v_t = flow.interpolate(x0, x1, t)
    F = torch.randn_like(x_t, requires_grad=True)
    F_unc = torch.randn_like(x_t) if w > 1 else None
    out = fm_loss(flow, F, x_t, v_t, t, p=1.0, eps=0.01, F_unc=F_unc, mask=mask if w > 1 else None, cfg_scale=w,
                  mix_ratio=m, cfg_decay_time=tau)
    (grad,) = torch.autograd.grad(out.loss, F)
    dbds = R.v4(R.dbds_diag(coef, t))
    v_pred = dbds * F.detach()
    target = v_t
    if w > 1:
        g = v_t + R.v4(R.k_decay(t, tau)) * (w - 1) * (v_t - dbds * F_unc)
        target = torch.where(R.v4(mask), v_t, m * g + (1 - m) * v_pred)
    N, B = F[0].numel(), F.shape[0]
    mse = ((v_pred - target) ** 2).flatten(1).mean(1)
    weight = 1 / (dbds.flatten().abs() * (mse + 0.01))
    torch.testing.assert_close(grad, R.v4(weight) * 2 * (v_pred - target) * dbds / (N * B), **TOL)


@pytest.mark.parametrize("noising,coef,guidance", CASES)
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_consistency_loss_matches_section_5(noising, coef, guidance, p):
    w, m, tau = guidance
    net, flow = TinyNet(), Flow(noising, coef)
    x0, x1, t, s, l, y, mask = _inputs()
    ref = R.consistency_reference(net, noising, coef, x0, x1, t, s, l, y, mask, w, m, tau, p, 0.01, NULL)
    ref_grads = torch.autograd.grad(ref[0], list(net.parameters()))

    x_t, v_t = flow.interpolate(x0, x1, t)
    guided = w > 1
    with torch.no_grad():
        F_unc = net(x_t, t, t, torch.full_like(y, NULL)) if guided else None
        F_cond = net(x_t, t, t, y) if guided and m != 1 else None
    u = consistency_velocity(flow, x_t, v_t, t, F_unc=F_unc, F_cond=F_cond, mask=mask if guided else None,
                             cfg_scale=w, mix_ratio=m, cfg_decay_time=tau)
    y_m = torch.where(mask, NULL, y) if guided else y
    F_t = net(x_t, t, s, y_m)
    F_l = net(x_t + u * R.v4(l - t), l, s, y_m).detach()
    ours = consistency_loss(flow, F_t, x_t, u, t, s, l, F_l, p=p, eps=0.01)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(torch.autograd.grad(ours.loss, list(net.parameters())), ref_grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("noising,coef", [("linear", "euler"), ("trig", "trig"), ("linear", "trig")])
def test_consistency_gradient_equals_scaled_mse_gradient(noising, coef):
    """docs/algorithm.md section 5: dL_C/dF_t = d/dF_t of mean_i w_i mean_j (f_t - sg f_l)^2 / (2 |b(t,s)| (t - l))."""
    flow = Flow(noising, coef)
    x0, x1, t, s, l, _, _ = _inputs()
    x_t, v_t = flow.interpolate(x0, x1, t)
    F_t = torch.randn_like(x_t, requires_grad=True)
    F_l = torch.randn_like(x_t)
    out = consistency_loss(flow, F_t, x_t, v_t, t, s, l, F_l, p=1.0, eps=0.01)
    (g1,) = torch.autograd.grad(out.loss, F_t)

    f_t = R.v4(R.a(coef, t, s)) * x_t + R.v4(R.b(coef, t, s)) * F_t
    x_l = x_t + v_t * R.v4(l - t)
    f_l = R.v4(R.a(coef, l, s)) * x_l + R.v4(R.b(coef, l, s)) * F_l
    q = (f_t.detach() - f_l) / R.v4(t - l)
    wgt = 1 / ((q ** 2).flatten(1).mean(1) + 0.01)
    mse_form = (wgt * ((f_t - f_l) ** 2).flatten(1).mean(1) / (2 * R.b(coef, t, s).abs() * (t - l))).mean()
    (g2,) = torch.autograd.grad(mse_form, F_t)
    torch.testing.assert_close(g1, g2, **TOL)
    torch.testing.assert_close(out.mse, (q ** 2).mean(), **TOL)


def test_low_precision_inputs_are_computed_in_fp32():
    flow = Flow()
    x0, x1, t, _, _, _, _ = _inputs()
    x_t, v_t = flow.interpolate(x0.float(), x1.float(), t.float())
    F = torch.randn_like(x_t)
    lo = fm_loss(flow, F.bfloat16(), x_t.bfloat16(), v_t, t.float(), p=1.0, eps=0.01)
    assert lo.loss.dtype == torch.float32
    hi = fm_loss(flow, F.bfloat16().float(), x_t.bfloat16().float(), v_t, t.float(), p=1.0, eps=0.01)
    torch.testing.assert_close(lo.loss, hi.loss)


def test_mix_without_conditional_output_is_an_error():
    flow = Flow()
    x0, x1, t, _, _, _, mask = _inputs()
    x_t, v_t = flow.interpolate(x0, x1, t)
    with pytest.raises(ValueError, match="F_cond"):
        consistency_velocity(flow, x_t, v_t, t, F_unc=x_t, mask=mask, cfg_scale=2.0, mix_ratio=0.5)
