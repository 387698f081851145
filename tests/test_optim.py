"""The fused AdamW + EMA step (csrc/, soflow_fast._fused_optim) against torch.optim.AdamW + ema_update_.

Tolerances: params, moments and EMA are fp32 on both sides and the fused kernel does the same
operations in a different order (b1*m + (1-b1)*g where torch uses lerp, one fused expression where
torch does separate foreach passes), so each step differs by a few fp32 roundings: ~1e-7 absolute on
O(1) weights, ~1e-6 relative on the moments. Over 5 steps we allow rtol=1e-5 (about 80 ulp), atol=1e-7
on weights and EMA; on the moments rtol=1e-5 plus atol=1e-6 of the tensor's largest entry, since
m = b1*m + (1-b1)*g can cancel to near 0 where relative error means nothing. 16-bit grads are upcast
exactly on read and the reference is given the same upcast values, so they get the same tolerances.
A wrong kernel is off by ~lr (1e-2) or by a fixed fraction: one tensor's grads are ~1e-6 so that eps
(1e-8 against sqrt(v)~1e-6) matters at the 1% level there.
"""
import io

import pytest
import torch

from soflow_fast import optim
from soflow_fast.optim import FusedAdamWEMA, build_optimizer, ema_update_, optimizer_backends, step_with_ema

needs_ext = pytest.mark.skipif(optim._fused_optim is None, reason=optim.BUILD_HINT)
HAS_CUDA_KERNEL = torch.cuda.is_available() and optimizer_backends()["fused_adamw_ema_cuda"]
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA_KERNEL else [])
SHAPES = [(1,), (3,), (17,), (33, 7), (1023,), (5, 3, 129), (70001,), (2 * 65536 + 5,)]
LR, EPS, EMA_DECAY, STEPS = 1e-2, 1e-8, 0.9, 5
TOL = dict(rtol=1e-5, atol=1e-7)
MOMENT_RTOL = 1e-5  # plus an atol of 1e-6 of the tensor's largest moment (m can cancel to ~0)


def _params(device, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).to(device) for s in shapes]
    ps.append(torch.randn(1001, generator=gen).to(device)[1:])  # contiguous view, not 16-byte aligned
    return ps


def _grads(params, step, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    scales = [1e-6 if i == 2 else 1.0 for i in range(len(params))]  # tensor 2: eps matters
    return [(s * torch.randn(p.shape, generator=gen)).to(p.device, dtype) for p, s in zip(params, scales)]


def _reference(params, grads_per_step, betas, weight_decay):
    """torch.optim.AdamW (foreach) + fp32 EMA, the documented math."""
    ref = [p.clone().requires_grad_() for p in params]
    ema = [p.clone() for p in params]
    opt = torch.optim.AdamW(ref, lr=LR, betas=betas, eps=EPS, weight_decay=weight_decay, foreach=True)
    for grads in grads_per_step:
        for p, g in zip(ref, grads):
            p.grad = g.float()
        opt.step()
        ema_update_(ema, ref, EMA_DECAY)
    state = [opt.state[p] for p in ref]
    return ([p.detach() for p in ref], [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state], ema)


def _assert_states(got, want):
    for name, g_list, w_list in zip(("param", "exp_avg", "exp_avg_sq", "ema"), got, want):
        for i, (g, w) in enumerate(zip(g_list, w_list)):
            moment = name.startswith("exp_avg")
            tol = dict(rtol=MOMENT_RTOL, atol=1e-6 * w.abs().max().item()) if moment else TOL
            torch.testing.assert_close(g, w, **tol, msg=lambda m, i=i, n=name: f"{n}[{i}]: {m}")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.9, 0.999)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_kernel_matches_adamw_plus_ema(device, grad_dtype, betas, weight_decay):
    params = _params(device)
    grads_per_step = [_grads(params, k, grad_dtype) for k in range(STEPS)]
    want = _reference(params, grads_per_step, betas, weight_decay)

    p = [x.clone() for x in params]
    m, v, e = [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p], [x.clone() for x in p]
    for k, grads in enumerate(grads_per_step, start=1):
        optim._fused_optim.fused_adamw_ema_(p, grads, m, v, e, k, LR, *betas, EPS, weight_decay, EMA_DECAY)
    _assert_states((p, m, v, e), want)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_many_tensors(device):
    # More tensors and chunks than one CUDA launch takes (36 tensors, 320 chunks of 65536).
    big = 330 * 65536 + 3 if device == "cuda" else 70001  # the launch splitting is CUDA-only
    params = _params(device, shapes=[(i % 7 + 1, 129) for i in range(80)] + [(big,)])
    grads_per_step = [_grads(params, k, torch.float32) for k in range(2)]
    want = _reference(params, grads_per_step, (0.9, 0.999), 0.05)
    p = [x.clone() for x in params]
    m, v, e = [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p], [x.clone() for x in p]
    for k, grads in enumerate(grads_per_step, start=1):
        optim._fused_optim.fused_adamw_ema_(p, grads, m, v, e, k, LR, 0.9, 0.999, EPS, 0.05, EMA_DECAY)
    _assert_states((p, m, v, e), want)


def _run_optimizer(params, grads_per_step, opt, ema):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return ([p.detach() for p in params], [opt.state[p]["exp_avg"] for p in params],
            [opt.state[p]["exp_avg_sq"] for p in params], ema)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_optimizer_matches_adamw_plus_ema(device, weight_decay):
    params = [p.requires_grad_() for p in _params(device)]
    grads_per_step = [_grads(params, k, torch.float32) for k in range(STEPS)]
    want = _reference([p.detach() for p in params], grads_per_step, (0.9, 0.99), weight_decay)
    ema = [p.detach().clone() for p in params]  # an EMA model's weights, updated in place
    opt = build_optimizer("fused_adamw_ema", params, lr=LR, betas=(0.9, 0.99), eps=EPS,
                          weight_decay=weight_decay, ema_params=ema, ema_decay=EMA_DECAY)
    got = _run_optimizer(params, grads_per_step, opt, ema)
    _assert_states(got, want)
    assert all(a is b for a, b in zip(opt.ema_tensors(), ema))
    assert all(int(opt.state[p]["step"]) == STEPS for p in params)


@needs_ext
def test_state_dict_round_trip_equals_uninterrupted():
    def fresh(params):
        ema = [p.detach().clone() for p in params]
        return FusedAdamWEMA(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.05, ema_decay=EMA_DECAY,
                             ema_params=ema), ema

    init = _params("cpu")
    grads_per_step = [_grads(init, k, torch.float32) for k in range(STEPS)]
    params = [p.clone().requires_grad_() for p in init]
    opt, ema = fresh(params)
    want = _run_optimizer(params, grads_per_step, opt, ema)

    params = [p.clone().requires_grad_() for p in init]
    opt, ema = fresh(params)
    _run_optimizer(params, grads_per_step[:2], opt, ema)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    params = [p.clone().requires_grad_() for p in saved["params"]]
    opt, ema = fresh(params)  # its EMA starts as a copy of params: the load must overwrite it
    opt.load_state_dict(saved["opt"])
    assert all(a is b for a, b in zip(opt.ema_tensors(), ema))
    got = _run_optimizer(params, grads_per_step[2:], opt, ema)
    for g_list, w_list in zip(got, want):
        assert all(torch.equal(g, w) for g, w in zip(g_list, w_list))


@needs_ext
def test_param_without_grad_only_moves_ema():
    p = torch.randn(10, requires_grad=True)
    before = p.detach().clone()
    opt = FusedAdamWEMA([p], lr=LR, ema_decay=0.5)
    opt.state[p]["ema"].zero_()
    opt.step()
    assert torch.equal(p.detach(), before)
    torch.testing.assert_close(opt.ema_tensors()[0], 0.5 * before)


def test_build_optimizer_adamw_and_errors(monkeypatch):
    p = torch.nn.Parameter(torch.randn(4))
    opt = build_optimizer("adamw", [p], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["foreach"]
    with pytest.raises(ValueError, match="unknown optimizer kind"):
        build_optimizer("sgd", [p], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    if not optimizer_backends()["apex_fused_adam"]:
        with pytest.raises(RuntimeError, match="NVIDIA apex"):
            build_optimizer("apex", [p], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    monkeypatch.setattr(optim, "_fused_optim", None)
    with pytest.raises(RuntimeError, match="--no-build-isolation"):
        build_optimizer("fused_adamw_ema", [p], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    assert set(optimizer_backends()) >= {"fused_adamw_ema_cpu", "fused_adamw_ema_cuda", "apex_fused_adam"}


def test_ema_update_is_fp32_lerp():
    ema, p = [torch.zeros(5)], [torch.ones(5, dtype=torch.bfloat16)]
    ema_update_(ema, p, 0.75)
    torch.testing.assert_close(ema[0], torch.full((5,), 0.25))


def _guarded_optimizer(kind, params, ema):
    if kind == "torch_fused_adamw":  # the CUDA 'adamw' (fused), here on the CPU: it takes found_inf itself
        return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.99), weight_decay=0.05, fused=True)
    return build_optimizer(kind, params, lr=LR, betas=(0.9, 0.99), weight_decay=0.05, ema_params=ema,
                           ema_decay=EMA_DECAY)


def _tensors(params, opt, ema):
    """(params and EMA, the optimizer's tensor state by (param index, key)), cloned."""
    state = {(i, k): v.clone() for i, p in enumerate(params) for k, v in opt.state[p].items() if torch.is_tensor(v)}
    return [p.detach().clone() for p in params] + [e.clone() for e in ema], state


@pytest.mark.parametrize("kind", ["adamw", "radam", "torch_fused_adamw",
                                  pytest.param("fused_adamw_ema", marks=needs_ext)])
def test_found_inf_makes_the_step_a_noop_on_the_device(kind):
    """step_with_ema(found_inf=1) with NaN gradients leaves params, optimizer state and EMA as they were, also on a
    first step (state it creates is zero, its starting value); found_inf=0 changes nothing against no flag. So a run
    with NaN steps skipped equals one without them (FusedAdamWEMA's host step count excepted: it counts them)."""
    init = _params("cpu")
    grads_per_step = [_grads(init, k, torch.float32) for k in range(4)]
    nan = [torch.full_like(g, float("nan")) for g in grads_per_step[0]]
    plain = [(g, None) for g in grads_per_step]
    with_skips = [(nan, 1.0), (grads_per_step[0], 0.0), (grads_per_step[1], 0.0), (nan, 1.0),
                  (grads_per_step[2], 0.0), (grads_per_step[3], 0.0)]
    runs = []
    for schedule in (plain, with_skips):
        params = [p.clone().requires_grad_() for p in init]
        ema = [p.clone() for p in init]
        opt = _guarded_optimizer(kind, params, ema)
        for grads, flag in schedule:
            before, state_before = _tensors(params, opt, ema)
            for p, g in zip(params, grads):
                p.grad = g
            step_with_ema(opt, ema, params, EMA_DECAY, None if flag is None else torch.tensor(flag))
            if flag == 1.0:
                after, state_after = _tensors(params, opt, ema)
                assert all(torch.equal(a, b) for a, b in zip(before, after))
                assert state_after.keys() >= state_before.keys() and len(state_after) > 0
                for slot, t in state_after.items():  # state a first step created holds its starting value, zero
                    assert torch.equal(t, state_before[slot]) if slot in state_before else not t.any()
        runs.append(_tensors(params, opt, ema))
        if kind == "fused_adamw_ema":  # its step count is a host int: the skipped steps count
            assert {opt.state[p]["step"] for p in params} == {len(schedule)}
    if kind != "fused_adamw_ema":
        (params_a, state_a), (params_b, state_b) = runs
        assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
        assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_lr_schedule_values():
    """optim.lr_at against docs/algorithm.md section 9, at points where the three shapes differ (exact floats: the
    same few operations)."""
    from soflow_fast.optim import lr_at

    base, W, K = 1e-3, 4, 104
    assert [lr_at(k, base, "cosine", W, K) for k in range(W)] == [base * (k + 1) / W for k in range(W)]
    assert lr_at(W, base, "linear", W, K) == base and lr_at(W, base, "cosine", W, K) == base
    quarter = W + (K - W) // 4  # p = 1/4: linear 3/4, cosine (1 + cos(pi/4)) / 2 ~ 0.854
    assert lr_at(quarter, base, "linear", W, K, 0.1) == pytest.approx(base * (0.1 + 0.9 * 0.75), rel=1e-12)
    assert lr_at(quarter, base, "cosine", W, K, 0.1) == pytest.approx(base * (0.1 + 0.9 * 0.8535533905932737),
                                                                       rel=1e-12)
    assert lr_at(K - 1, base, "linear", W, K) == pytest.approx(base / (K - W), rel=1e-12)  # the last step's
    assert all(lr_at(k, base, "constant", 0, K) == base for k in (0, K // 2, K - 1))
    with pytest.raises(ValueError, match="step"):
        lr_at(0, base, "step")
