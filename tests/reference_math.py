"""An independent transcription of docs/algorithm.md sections 1, 2, 4, 5 and 6, used only by the tests.

It re-derives every coefficient from the text (not from soflow_fast.flow) and runs the reference's six network calls
per step, so agreement with the package checks both the math and the three-call batching.
"""
import math

import torch

PI = math.pi


def alpha(kind, t):
    return 1 - t if kind == "linear" else torch.cos(PI * t / 2)


def beta(kind, t):
    return t if kind == "linear" else torch.sin(PI * t / 2)


def dalpha(kind, t):
    return -torch.ones_like(t) if kind == "linear" else -(PI / 2) * torch.sin(PI * t / 2)


def dbeta(kind, t):
    return torch.ones_like(t) if kind == "linear" else (PI / 2) * torch.cos(PI * t / 2)


def a(kind, t, s):
    return torch.ones_like(t) if kind == "euler" else torch.cos(PI * (s - t) / 2)


def b(kind, t, s):
    return s - t if kind == "euler" else torch.sin(PI * (s - t) / 2)


def dbds_diag(kind, t):
    return torch.ones_like(t) if kind == "euler" else torch.full_like(t, PI / 2)


def k_decay(t, tau):
    if tau >= 1:
        return torch.ones_like(t)
    d = ((1 - t) / (1 - tau)).clamp(0, 1 - 1e-6)
    return torch.where(t <= tau, torch.ones_like(t), 1 - torch.exp(-0.025 * d / (1 - d)))


def v4(x):
    return x.view(-1, 1, 1, 1)


def velocity(net, coef, x, t, y):
    # da/ds(t, t) = 0 for both coefficient types
    return v4(dbds_diag(coef, t)) * net(x, t, t, y)


def fm_reference(net, noising, coef, x0, x1, t, y, mask, w, m, tau, p, eps, null):
    """docs/algorithm.md section 4 with the network: returns (loss, mean mse, mean weight)."""
    xt = v4(alpha(noising, t)) * x0 + v4(beta(noising, t)) * x1
    vt = v4(dalpha(noising, t)) * x0 + v4(dbeta(noising, t)) * x1
    if y is not None and w > 1:
        y_m = torch.where(mask, torch.full_like(y, null), y)
        v_pred = velocity(net, coef, xt, t, y_m)
        with torch.no_grad():
            v_unc = velocity(net, coef, xt, t, torch.full_like(y, null))
            g = vt + v4(k_decay(t, tau)) * (w - 1) * (vt - v_unc)
            g = m * g + (1 - m) * v_pred.detach()
            target = torch.where(v4(mask), vt, g)
    else:
        v_pred = velocity(net, coef, xt, t, y)
        target = vt
    mse = ((v_pred - target) ** 2).flatten(1).mean(1)
    weight = (1 / (dbds_diag(coef, t).abs() * (mse + eps) ** p)).detach()
    return (weight * mse).mean(), mse.mean().detach(), weight.mean()


def consistency_reference(net, noising, coef, x0, x1, t, s, l, y, mask, w, m, tau, p, eps, null):
    """docs/algorithm.md section 5 with the network: returns (loss, mean q^2, mean weight)."""
    xt = v4(alpha(noising, t)) * x0 + v4(beta(noising, t)) * x1
    vt = v4(dalpha(noising, t)) * x0 + v4(dbeta(noising, t)) * x1
    if y is not None and w > 1:
        with torch.no_grad():
            v_unc = velocity(net, coef, xt, t, torch.full_like(y, null))
            g = vt + v4(k_decay(t, tau)) * (w - 1) * (vt - v_unc)
            if m != 1:
                g = m * g + (1 - m) * velocity(net, coef, xt, t, y)
            u = torch.where(v4(mask), vt, g)
        y_m = torch.where(mask, torch.full_like(y, null), y)
    else:
        u, y_m = vt, y
    F_t = net(xt, t, s, y_m)
    f_t = v4(a(coef, t, s)) * xt + v4(b(coef, t, s)) * F_t
    with torch.no_grad():
        xl = xt + u * v4(l - t)
        f_l = v4(a(coef, l, s)) * xl + v4(b(coef, l, s)) * net(xl, l, s, y_m)
        q = (f_t - f_l) / v4(t - l)
        weight = 1 / ((q ** 2).flatten(1).mean(1) + eps) ** p
    loss = (torch.sign(b(coef, t, s)) * (F_t * q).flatten(1).mean(1) * weight).mean()
    return loss, (q ** 2).mean(), weight.mean()


def r_schedule(name, k, K, r0, r1):
    return {"const": r1, "linear": r0 + (r1 - r0) * k / K,
            "cosine": r1 + (r0 - r1) * (1 + math.cos(PI * k / K)) / 2,
            "exponent": r0 * (r1 / r0) ** (k / K)}[name]


def six_call_step(net, noising, coef, hp, x0, y, noise, step, null):
    """docs/algorithm.md section 6: split, times with clamps, both losses, total = weighted by row counts."""
    B = x0.shape[0]
    n_fm = int(math.floor(hp.velocity_loss_ratio * B))
    n_c = B - n_fm
    kw = dict(w=hp.cfg_scale, m=hp.mix_ratio, tau=hp.cfg_decay_time, p=hp.p, eps=hp.eps, null=null)
    lf = mf = wf = lc = mc = wc = torch.zeros((), dtype=x0.dtype)
    ys = (lambda sl: None) if y is None else (lambda sl: y[sl])
    if n_fm:
        lf, mf, wf = fm_reference(net, noising, coef, x0[:n_fm], noise.x1[:n_fm], noise.t_fm, ys(slice(0, n_fm)),
                                  noise.cfg_mask[:n_fm], **kw)
    if n_c:
        t = noise.t_draw.clamp(min=1e-4)
        s = torch.minimum(noise.s_draw, t - 1e-4)
        r = r_schedule(hp.l_schedule, step, hp.total_steps, hp.l_init_ratio, hp.l_end_ratio)
        l = torch.minimum(t + (s - t) * r, t - 1e-4)
        lc, mc, wc = consistency_reference(net, noising, coef, x0[n_fm:], noise.x1[n_fm:], t, s, l,
                                           ys(slice(n_fm, B)), noise.cfg_mask[n_fm:], **kw)
    total = lf * n_fm / B + lc * n_c / B
    return total, dict(loss_fm=lf, loss_c=lc, mse_fm=mf, weight_fm=wf, mse_c=mc, weight_c=wc)
