"""flow.py against docs/algorithm.md sections 1, 2, 6, 7 (fp64 on CPU)."""
import math

import pytest
import torch

from soflow_fast.flow import Flow, cfg_decay, consistency_times, l_ratio, logit_normal, sample, sampling_times

import reference_math as R



@pytest.fixture(autouse=True)
def _fp64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
PAIRS = [(n, c) for n in ("linear", "trig") for c in ("euler", "trig")]


@pytest.mark.parametrize("noising,coef", PAIRS)
def test_path_and_coefficients_match_formulas(noising, coef):
    f = Flow(noising, coef)
    t, s = torch.rand(50), torch.rand(50)
    for ours, ref in ((f.alpha(t), R.alpha(noising, t)), (f.beta(t), R.beta(noising, t)),
                      (f.d_alpha(t), R.dalpha(noising, t)), (f.d_beta(t), R.dbeta(noising, t)),
                      (f.a(t, s), R.a(coef, t, s)), (f.b(t, s), R.b(coef, t, s)),
                      (f.db_ds_diag(t), R.dbds_diag(coef, t))):
        torch.testing.assert_close(ours, ref, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("noising,coef", PAIRS)
def test_derivatives_are_derivatives(noising, coef):
    """d_alpha, d_beta are the t-derivatives; da/ds, db/ds at s = t are the s-derivatives (autograd check)."""
    f = Flow(noising, coef)
    t = torch.rand(20, requires_grad=True)
    # the constant derivatives (linear path, Euler a) come back as None from autograd: materialize them as zeros
    (da,) = torch.autograd.grad(f.alpha(t).sum() + 0 * t.sum(), t)
    (db,) = torch.autograd.grad(f.beta(t).sum(), t)
    torch.testing.assert_close(da, f.d_alpha(t.detach()))
    torch.testing.assert_close(db, f.d_beta(t.detach()))
    tt = torch.rand(20)
    s = tt.clone().requires_grad_(True)
    (dads,) = torch.autograd.grad(f.a(tt, s).sum() + 0 * s.sum(), s)
    (dbds,) = torch.autograd.grad(f.b(tt, s).sum(), s)
    torch.testing.assert_close(dads, f.da_ds_diag(tt))
    torch.testing.assert_close(dbds, f.db_ds_diag(tt))


def test_boundary_values():
    for n, c in PAIRS:
        f = Flow(n, c)
        one, zero = torch.ones(1), torch.zeros(1)
        assert f.alpha(zero).item() == 1 and f.beta(zero).item() == 0
        assert abs(f.alpha(one).item()) < 1e-15 and f.beta(one).item() == 1
        # f(x, t, t) = x: the solution function is the identity at s = t
        assert f.a(one * 0.3, one * 0.3).item() == 1 and f.b(one * 0.3, one * 0.3).item() == 0


def test_type_name_aliases():
    assert Flow("Linear", "Euler") == Flow("linear", "euler")
    assert Flow("Triangular", "Triangular") == Flow("Trig", "Trig") == Flow("trig", "trig")
    with pytest.raises(ValueError, match="noising_type"):
        Flow("Cosine", "Euler")
    with pytest.raises(ValueError, match="coefficient_type"):
        Flow("Linear", "Heun")


@pytest.mark.parametrize("tau", [0.5, 0.8, 1.0, 1.5])
def test_cfg_decay(tau):
    t = torch.linspace(0, 1, 101)
    torch.testing.assert_close(cfg_decay(t, tau), R.k_decay(t, tau), rtol=1e-14, atol=1e-14)
    k = cfg_decay(t, tau)
    assert torch.all(k[t <= min(tau, 1)] == 1) and torch.all((k >= 0) & (k <= 1))
    if tau < 1:
        assert k[-1] < 1e-6  # guidance fully decayed at t = 1


@pytest.mark.parametrize("name", ["Const", "Linear", "Cosine", "Exponent"])
def test_l_schedules(name):
    for k in (0, 10, 250, 1000):
        assert l_ratio(name, k, 1000, 0.1, 0.002) == pytest.approx(R.r_schedule(name.lower(), k, 1000, 0.1, 0.002))
    if name != "Const":
        assert l_ratio(name, 0, 1000, 0.1, 0.002) == pytest.approx(0.1)
    assert l_ratio(name, 1000, 1000, 0.1, 0.002) == pytest.approx(0.002)
    with pytest.raises(ValueError, match="l_schedule"):
        l_ratio("Quadratic", 0, 10, 0.1, 0.002)


def test_consistency_times_clamps():
    s_draw = torch.tensor([0.5, 0.9, 0.2, 0.0])
    t_draw = torch.tensor([0.8, 0.3, 0.0, 1e-5])
    t, s, l = consistency_times(s_draw, t_draw, 0.1)
    torch.testing.assert_close(t, torch.tensor([0.8, 0.3, 1e-4, 1e-4]))
    torch.testing.assert_close(s, torch.tensor([0.5, 0.3 - 1e-4, 0.0, 0.0]))
    assert torch.all(s <= l) and torch.all(l <= t - 1e-4 + 1e-12)  # at t = 1e-4 the clamps make s = l = 0
    torch.testing.assert_close(l[0], torch.tensor(0.8 + (0.5 - 0.8) * 0.1))


def test_logit_normal_uses_generator():
    a = logit_normal(1000, -0.2, 1.0, generator=torch.Generator().manual_seed(3))
    b = logit_normal(1000, -0.2, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.float32
    z = torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float32) * 1.0 - 0.2
    torch.testing.assert_close(a, torch.sigmoid(z))


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_sampling_matches_section_7(nfe):
    f = Flow("trig", "trig")
    W = torch.randn(2 * 4 * 4, 2 * 4 * 4) * 0.1

    def net(x, t, s, y):  # any deterministic function of (x, t, s) will do
        return torch.tanh((x.flatten(1) @ W).view_as(x)) * (1 + t - s).view(-1, 1, 1, 1)

    x1 = torch.randn(3, 2, 4, 4)
    eps = [torch.randn(3, 2, 4, 4) for _ in range(nfe - 1)]
    T = [1 - i / nfe for i in range(nfe + 1)]
    assert sampling_times(nfe) == pytest.approx(T)
    x = x1
    ones = torch.ones(3)
    for i in range(nfe - 1):
        x0 = (R.v4(R.a("trig", T[i] * ones, 0 * ones)) * x
              + R.v4(R.b("trig", T[i] * ones, 0 * ones)) * net(x, T[i] * ones, 0 * ones, None))
        x = math.cos(math.pi * T[i + 1] / 2) * x0 + math.sin(math.pi * T[i + 1] / 2) * eps[i]
    tl = T[nfe - 1] * ones
    want = R.v4(R.a("trig", tl, 0 * ones)) * x + R.v4(R.b("trig", tl, 0 * ones)) * net(x, tl, 0 * ones, None)
    torch.testing.assert_close(sample(net, f, x1, nfe, renoise=eps), want, rtol=1e-12, atol=1e-12)


def test_fp64_sampling_uses_fp64_renoise_coefficients():
    """The re-noise coefficients alpha(T_i), beta(T_i) are computed in the sample's dtype: in fp64 the 3-NFE sample
    equals the fp64 formula to fp64 rounding (fp32 coefficients would be off by ~1e-8). The default dtype is fp32
    here, as in a user's process (this module's fixture makes it fp64 elsewhere, which would hide the defect)."""
    torch.set_default_dtype(torch.float32)
    f = Flow("trig", "trig")

    def net(x, t, s, y):
        return torch.sin(x) * (1 + t - s).view(-1, 1, 1, 1)

    x1 = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    eps = [torch.randn(2, 1, 4, 4, dtype=torch.float64) for _ in range(2)]
    ones, T = torch.ones(2, dtype=torch.float64), [1.0, 2 / 3, 1 / 3]
    x = x1
    for i in range(2):
        x0 = f.solution(net, x, T[i] * ones, 0 * ones)
        x = math.cos(math.pi * T[i + 1] / 2) * x0 + math.sin(math.pi * T[i + 1] / 2) * eps[i]
    want = f.solution(net, x, T[2] * ones, 0 * ones)
    got = sample(net, f, x1, 3, renoise=eps)
    assert got.dtype == torch.float64
    assert (got - want).abs().max() < 1e-14

