"""The three-call step equals the reference's six-call formulation (docs/algorithm.md sections 6 and 8).

fp64: the same math up to summation order, so 1e-9 relative. fp32: batching rows into one call changes the matmul
blocking, so the results differ by fp32 rounding (~1e-7 relative per op, amplified through a few layers and the
adaptive weights): 2e-5 relative / 1e-6 absolute; a wrong term shows at the 1e-2 level.
"""
import dataclasses

import pytest
import torch

import soflow_fast as sf
from soflow_fast.step import SoFlowHParams, StepNoise, draw_noise, soflow_loss

import reference_math as R

TOLS = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=1e-6)}
CONFIGS = {
    "imagenet": SoFlowHParams(cfg_scale=3.0, mix_ratio=0.25, cfg_drop_rate=0.3, cfg_decay_time=0.8, total_steps=100),
    "mix1": SoFlowHParams(cfg_scale=2.0, mix_ratio=1.0, cfg_drop_rate=0.3, total_steps=100, l_schedule="cosine"),
    "noguide": SoFlowHParams(total_steps=100, l_schedule="linear", p=0.5),
    "fm_only": SoFlowHParams(velocity_loss_ratio=1.0, cfg_scale=3.0, mix_ratio=0.5, cfg_drop_rate=0.3,
                             total_steps=100),
    "cons_only": SoFlowHParams(velocity_loss_ratio=0.0, p=0.75, eps=0.001, cfg_scale=3.0, mix_ratio=0.25,
                               cfg_drop_rate=0.3, total_steps=100, l_schedule="const"),
}


class CallCounter(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args):
        self.calls += 1
        return self.net(*args)


def _model(dtype, num_classes=10, null=True, seed=0):
    torch.manual_seed(seed)
    m = sf.build_model("DiT-T/2", input_size=8, in_channels=2, num_classes=num_classes, null_class=null)
    with torch.no_grad():  # move off the zero init so every parameter gets a gradient
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m.to(dtype)


def _noise(hp, B, dtype, guided, seed=3):
    x0 = torch.randn(B, 2, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    nz = draw_noise(hp, x0, guided, torch.Generator().manual_seed(seed + 1))
    # guarantee both masked and unmasked rows
    mask = nz.cfg_mask.clone()
    if guided:
        mask[::3] = True
        mask[1::3] = False
    return x0, StepNoise(nz.x1.to(dtype), nz.t_fm.to(dtype), nz.s_draw.to(dtype), nz.t_draw.to(dtype), mask,
                         nz.dropout_seed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("flow_types", [("linear", "euler"), ("trig", "trig")])
def test_three_calls_equal_six_calls(dtype, name, flow_types):
    hp = CONFIGS[name]
    flow = sf.Flow(*flow_types)
    net = CallCounter(_model(dtype))
    B = 12
    guided = hp.cfg_scale > 1
    x0, noise = _noise(hp, B, dtype, guided)
    y = torch.randint(0, 10, (B,), generator=torch.Generator().manual_seed(5))
    step = 37

    out = soflow_loss(net, flow, hp, x0, y, noise, step, net.net.null_label)
    n_calls = net.calls
    grads = torch.autograd.grad(out.loss, [p for p in net.parameters() if p.requires_grad])

    net.calls = 0
    ref_total, ref_stats = R.six_call_step(net, *flow_types, hp, x0, y, noise, step, net.net.null_label)
    ref_calls = net.calls
    ref_grads = torch.autograd.grad(ref_total, [p for p in net.parameters() if p.requires_grad])

    tol = TOLS[dtype]
    torch.testing.assert_close(out.loss, ref_total, **tol)
    for k, v in ref_stats.items():
        torch.testing.assert_close(out.stats[k], v.to(out.stats[k].dtype), **tol, msg=lambda m: f"{k}: {m}")
    for (pname, _), g, rg in zip([(n, p) for n, p in net.named_parameters() if p.requires_grad], grads, ref_grads):
        torch.testing.assert_close(g, rg, **tol, msg=lambda m: f"grad {pname}: {m}")
    assert any(g.abs().sum() > 0 for g in grads)
    n_fm, n_c = hp.split(B)
    assert n_calls == (1 if guided else 0) + (1 if n_c else 0) + 1  # the batched teacher, x_l, the gradient call
    assert ref_calls == (2 if n_fm and guided else 1 if n_fm else 0) + \
        ((3 + (hp.mix_ratio != 1)) if guided else 2) * (n_c > 0)


def test_unconditional_model_step():
    hp = CONFIGS["noguide"]
    net = _model(torch.float64, num_classes=0)
    x0, noise = _noise(hp, 8, torch.float64, False)
    out = soflow_loss(net, sf.Flow(), hp, x0, None, noise, 0, net.null_label)
    ref_total, _ = R.six_call_step(net, "linear", "euler", hp, x0, None, noise, 0, None)
    torch.testing.assert_close(out.loss, ref_total, **TOLS[torch.float64])


def test_step_is_reproducible_bit_for_bit():
    hp = CONFIGS["imagenet"]
    results = []
    for _ in range(2):
        net = _model(torch.float32)
        x0 = torch.randn(10, 2, 8, 8, generator=torch.Generator().manual_seed(0))
        y = torch.randint(0, 10, (10,), generator=torch.Generator().manual_seed(1))
        noise = draw_noise(hp, x0, True, torch.Generator().manual_seed(2))
        out = soflow_loss(net, sf.Flow(), hp, x0, y, noise, 3, net.null_label)
        out.loss.backward()
        results.append([out.loss.detach()] + [p.grad.clone() for p in net.parameters() if p.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_guidance_needs_a_null_label():
    hp = CONFIGS["imagenet"]
    net = _model(torch.float32, null=False)
    x0, noise = _noise(hp, 8, torch.float32, True)
    with pytest.raises(ValueError, match="null label"):
        soflow_loss(net, sf.Flow(), hp, x0, torch.zeros(8, dtype=torch.long), noise, 0, net.null_label)


class DropoutNet(torch.nn.Module):
    """A stochastic network (dropout in train mode), like the CIFAR U-Net."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2 * 8 * 8 + 2, 2 * 8 * 8).double()
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x, t, s, y):
        h = torch.cat([x.flatten(1), t[:, None], (t - s)[:, None]], dim=1)
        return self.drop(torch.tanh(self.lin(h))).view_as(x)


def test_dropout_stream_is_shared_by_F_t_and_F_l():
    """With dropout, the step equals the straightforward formulation in which the F_t and F_l calls run on the
    same random stream (seeded identically), and it differs when they do not. The global RNG is never read."""
    hp = dataclasses.replace(CONFIGS["noguide"], velocity_loss_ratio=0.5)
    net = DropoutNet().train()
    x0, noise = _noise(hp, 8, torch.float64, False)
    torch.manual_seed(123)
    out = soflow_loss(net, sf.Flow(), hp, x0, None, noise, 0, None)
    g = torch.autograd.grad(out.loss, list(net.parameters()))

    calls = []

    def seeded(x, t, s, y):  # the reference: FM call on the global stream; F_t and F_l on the same seeded stream
        calls.append(x.shape[0])
        with torch.random.fork_rng():  # consistency rows (s != t) on the shared seed; FM rows on the next one
            torch.manual_seed(noise.dropout_seed + int(torch.equal(t, s)))
            return net(x, t, s, y)

    torch.manual_seed(999)  # a different global state: the step must not depend on it
    ref_total, _ = R.six_call_step(seeded, "linear", "euler", hp, x0, None, noise, 0, None)
    torch.testing.assert_close(out.loss, ref_total, **TOLS[torch.float64])
    for a, b in zip(g, torch.autograd.grad(ref_total, list(net.parameters()))):
        torch.testing.assert_close(a, b, **TOLS[torch.float64])

    def unseeded(x, t, s, y):  # F_t and F_l on different draws: must give a different loss
        calls.append(x.shape[0])
        with torch.random.fork_rng():
            torch.manual_seed(noise.dropout_seed + len(calls))
            return net(x, t, s, y)

    other, _ = R.six_call_step(unseeded, "linear", "euler", hp, x0, None, noise, 0, None)
    assert not torch.allclose(other, ref_total)  # the test can tell a mismatched stream apart
