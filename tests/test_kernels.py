"""Parity of the fused Triton kernels (kernels/) with their eager twins: forward, backward, registration.

On a machine without CUDA the kernels run under the Triton interpreter: TRITON_INTERPRET=1 must be set before the
first import of soflow_fast.kernels (set here, or for the whole run by .ci/run). Shapes are small so that the
interpreter (numpy, one program at a time) keeps the file well under a minute on two cores.

Tolerances, per dtype, and why:
  fp32: atol = rtol = 1e-5. Same arithmetic in fp32; only the order of the row/column sums differs from torch's.
  bf16/fp16 (adaLN): elementwise outputs are rounded exactly like torch (the kernels emulate its rounding of
    gate * y, of the residual and of the outputs), so forward outputs differ by at most one unit in the last place
    where a sum order flips a rounding. Gradients differ more: eager autograd rounds products to bf16 before its
    sums over T (dgate, dshift, dscale) and between the LN backward and the residual's gradient, the kernels keep
    fp32 throughout. So low-precision tensors are compared by relative L2 error, < 1e-2 (bf16 has 8 mantissa bits,
    2^-8 = 4e-3 per rounding; a handful of roundings), NaN never passes.
  losses: every reduction is fp32 whatever the input dtype, so fp32 tolerances (1e-5) hold for bf16 inputs too.
"""
from types import SimpleNamespace

import torch
import pytest

pytest.importorskip("triton")

from soflow_fast import loss as L
from soflow_fast import ops
from soflow_fast.flow import Flow
from soflow_fast.kernels import _common, adaln, soflow_loss

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LOW = (torch.bfloat16, torch.float16)


def close(a, b, dtype, name=""):
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    if dtype in LOW:
        rel = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        assert rel < 1e-2, f"{name}: relative L2 error {rel:.2e}"
    else:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def rand(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, device=DEV, dtype=dtype).requires_grad_(grad)


def check_fwd_bwd(fast, eager, args, dtype, names):
    """Forward outputs and every input's gradient under a random cotangent."""
    out_f, out_e = fast(*args), eager(*args)
    out_f = out_f if isinstance(out_f, tuple) else (out_f,)
    out_e = out_e if isinstance(out_e, tuple) else (out_e,)
    cot = [torch.randn_like(o) for o in out_e]
    for i, (a, b) in enumerate(zip(out_f, out_e)):
        close(a, b, dtype, f"output {i}")
    g_f = torch.autograd.grad(out_f, args, cot)
    g_e = torch.autograd.grad(out_e, args, cot)
    for name, a, b in zip(names, g_f, g_e):
        close(a, b, dtype, f"d{name}")


def test_kernels_really_run():
    """Guard: the parity tests below must exercise Triton, not the eager fallback."""
    assert _common.use_triton(torch.zeros(1, device=DEV)), (
        "soflow_fast.kernels was imported before TRITON_INTERPRET=1 was set: export it for the whole test run")


SHAPES = [(2, 13, 72), (1, 5, 1152), (3, 16, 64)]  # D not a power of two, T not a multiple of the block, B = 1
CASES = [(s, torch.float32) for s in SHAPES] + [(SHAPES[0], torch.bfloat16), (SHAPES[2], torch.float16)]


@pytest.mark.parametrize("shape,dtype", CASES)
def test_layernorm_modulate(shape, dtype):
    B, T, D = shape
    args = (rand(B, T, D, dtype=dtype) * 3 + 1, rand(B, D, dtype=dtype), rand(B, D, dtype=dtype))
    args = tuple(a.detach().requires_grad_() for a in args)
    check_fwd_bwd(adaln.layernorm_modulate, ops.layernorm_modulate_eager, args, dtype, ["x", "shift", "scale"])


@pytest.mark.parametrize("shape,dtype", CASES)
def test_gated_residual(shape, dtype):
    B, T, D = shape
    args = (rand(B, T, D, dtype=dtype), rand(B, D, dtype=dtype), rand(B, T, D, dtype=dtype))
    check_fwd_bwd(adaln.gated_residual, ops.gated_residual_eager, args, dtype, ["x", "gate", "y"])


@pytest.mark.parametrize("shape,dtype", CASES)
def test_gated_residual_layernorm_modulate(shape, dtype):
    B, T, D = shape
    args = (rand(B, T, D, dtype=dtype), rand(B, D, dtype=dtype), rand(B, T, D, dtype=dtype), rand(B, D, dtype=dtype),
            rand(B, D, dtype=dtype))
    check_fwd_bwd(adaln.gated_residual_layernorm_modulate, ops.gated_residual_layernorm_modulate_eager, args, dtype,
                  ["x", "gate", "y", "shift", "scale"])


def test_low_precision_forward_is_torch_rounding():
    """bf16 elementwise forward: bit-identical to torch (the kernels round intermediates as torch does)."""
    bf16 = torch.bfloat16
    x, g, y = rand(2, 7, 72, dtype=bf16), rand(2, 72, dtype=bf16), rand(2, 7, 72, dtype=bf16)
    assert torch.equal(adaln.gated_residual(x, g, y), ops.gated_residual_eager(x, g, y))


def test_mixed_dtypes():
    """Autocast's mix: an fp32 residual stream with bf16 branch output, gate, shift and scale."""
    B, T, D = 2, 9, 72
    args = (rand(B, T, D), rand(B, D, dtype=torch.bfloat16), rand(B, T, D, dtype=torch.bfloat16),
            rand(B, D, dtype=torch.bfloat16), rand(B, D, dtype=torch.bfloat16))
    check_fwd_bwd(adaln.gated_residual_layernorm_modulate, ops.gated_residual_layernorm_modulate_eager, args,
                  torch.bfloat16, ["x", "gate", "y", "shift", "scale"])


def test_non_contiguous_inputs():
    B, T, D = 2, 6, 72
    x = rand(B, D, T).transpose(1, 2)  # [B, T, D], not contiguous
    shift, scale = rand(D, B).t(), rand(D, B).t()
    torch.testing.assert_close(adaln.layernorm_modulate(x, shift, scale), ops.layernorm_modulate_eager(x, shift, scale),
                               atol=1e-5, rtol=1e-5)


def test_shape_errors_name_the_tensor():
    x = rand(2, 5, 72)
    with pytest.raises(ValueError, match="scale"):
        adaln.layernorm_modulate(x, rand(2, 72), rand(2, 71))
    with pytest.raises(ValueError, match="y"):
        adaln.gated_residual(x, rand(2, 72), rand(2, 4, 72))
    with pytest.raises(ValueError, match="v_t"):
        soflow_loss.fm_loss(Flow(), rand(2, 8), rand(2, 8), rand(2, 9), torch.rand(2, device=DEV), p=1.0, eps=0.01)


def test_gradcheck_eager_references():
    """The references themselves: fp64 autograd vs finite differences."""
    kw = dict(dtype=torch.float64, device=DEV, requires_grad=True)
    B, T, D = 2, 3, 5
    x, y = torch.randn(B, T, D, **kw), torch.randn(B, T, D, **kw)
    g, sh, sc = (torch.randn(B, D, **kw) for _ in range(3))
    assert torch.autograd.gradcheck(ops.layernorm_modulate_eager, (x, sh, sc))
    assert torch.autograd.gradcheck(ops.gated_residual_eager, (x, g, y))
    assert torch.autograd.gradcheck(ops.gated_residual_layernorm_modulate_eager, (x, g, y, sh, sc))
    # FM loss with p = 0 and mix = 1: the weight is the constant 1/|db/ds| and the target carries no stop-gradient,
    # so the loss is an ordinary function of F_pred and finite differences apply.
    F_unc, v, t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64), torch.rand(4)
    mask = torch.tensor([True, False, False, True])
    for coef in ("euler", "trig"):
        flow = Flow("linear", coef)
        fn = lambda F: L.fm_loss(flow, F, v, v, t, p=0.0, eps=0.01, F_unc=F_unc, mask=mask, cfg_scale=3.0,  # noqa
                                 cfg_decay_time=0.5).loss
        assert torch.autograd.gradcheck(fn, (torch.randn(4, 6, **kw).cpu().detach().requires_grad_(),))


# -- the SoFlow losses ----------------------------------------------------------------------------
GUIDANCE = {
    "none": {},
    "guided": dict(cfg_scale=3.0, mix_ratio=0.25, cfg_decay_time=0.8, mask=True),
    "guided_nomask_mix1": dict(cfg_scale=2.0, mix_ratio=1.0, cfg_decay_time=1.0),
}


def loss_inputs(B, shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEV)  # noqa: E731
    t = torch.rand(B, generator=gen).to(DEV).clamp(0.05, 0.95)
    t[0] = 0.9  # above tau: the decayed guidance branch
    s = t * torch.rand(B, generator=gen).to(DEV)
    l = t + (s - t) * 0.3
    return dict(F=r(B, *shape).to(dtype), x=r(B, *shape), v=r(B, *shape), u=r(B, *shape),
                F_unc=r(B, *shape).to(dtype), F_l=r(B, *shape).to(dtype), t=t, s=s, l=l,
                mask=torch.arange(B, device=DEV) % 3 == 1)


@pytest.mark.parametrize("noising", ["linear", "trig"])
@pytest.mark.parametrize("coef", ["euler", "trig"])
@pytest.mark.parametrize("guidance", list(GUIDANCE))
def test_fm_loss(noising, coef, guidance):
    flow, kw = Flow(noising, coef), dict(GUIDANCE[guidance])
    d = loss_inputs(5, (2, 4, 4), torch.float32, seed=hash((noising, coef, guidance)) % 1000)
    if kw:
        kw["F_unc"] = d["F_unc"]
        kw["mask"] = d["mask"] if kw.pop("mask", False) else None
    _check_fm(flow, d, kw, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 7), (3, 40, 40)])  # odd row length; 4800 > one block: two passes
def test_fm_loss_dtypes_and_long_rows(dtype, shape):
    d = loss_inputs(3, shape, dtype, seed=1)
    _check_fm(Flow("trig", "trig"), d, dict(F_unc=d["F_unc"], mask=d["mask"], cfg_scale=3.0, mix_ratio=0.25,
                                           cfg_decay_time=0.8), dtype)


def _check_fm(flow, d, kw, dtype):
    F = d["F"].detach().requires_grad_()
    fast = soflow_loss.fm_loss(flow, F, d["x"], d["v"], d["t"], p=0.75, eps=0.01, **kw)
    ref = L.fm_loss(flow, F, d["x"], d["v"], d["t"], p=0.75, eps=0.01, **kw)
    for name, a, b in zip(fast._fields, fast, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert not fast.mse.requires_grad and not fast.weight.requires_grad
    (g_fast,) = torch.autograd.grad(fast.loss * 0.75, F)  # a grad_output != 1, as in the step's n_fm / B
    (g_ref,) = torch.autograd.grad(ref.loss * 0.75, F)
    close(g_fast, g_ref, dtype, "dF_pred")


@pytest.mark.parametrize("coef", ["euler", "trig"])
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (2, 4, 4)), (torch.bfloat16, (3, 5, 7)),
                                         (torch.float32, (3, 40, 40))])
def test_consistency_loss(coef, dtype, shape):
    flow = Flow("linear", coef)
    d = loss_inputs(4, shape, dtype, seed=2)
    F = d["F"].detach().requires_grad_()
    args = (d["x"], d["u"], d["t"], d["s"], d["l"], d["F_l"])
    fast = soflow_loss.consistency_loss(flow, F, *args, p=1.0, eps=0.01)
    ref = L.consistency_loss(flow, F, *args, p=1.0, eps=0.01)
    for name, a, b in zip(fast._fields, fast, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    (g_fast,) = torch.autograd.grad(fast.loss * 0.25, F)
    (g_ref,) = torch.autograd.grad(ref.loss * 0.25, F)
    close(g_fast, g_ref, dtype, "dF_t")


def test_consistency_gradient_is_the_stated_surrogate():
    """docs/algorithm.md section 5: dloss/dF_t = d/dF_t of mean_i w_i mean_j (f_t - sg f_l)^2 / (2 |b(t,s)| (t - l)),
    in fp64."""
    flow = Flow("trig", "trig")
    d = loss_inputs(4, (3, 4, 4), torch.float32, seed=3)
    F = d["F"].detach().requires_grad_()
    fast = soflow_loss.consistency_loss(flow, F, d["x"], d["u"], d["t"], d["s"], d["l"], d["F_l"], p=0.5, eps=0.01)
    (g_fast,) = torch.autograd.grad(fast.loss, F)
    dd = {k: v.double() for k, v in d.items() if k != "mask"}
    F64 = dd["F"].detach().requires_grad_()
    x_l = dd["x"] + dd["u"] * (dd["l"] - dd["t"]).view(-1, 1, 1, 1)
    bc = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    f_t = bc(flow.a(dd["t"], dd["s"])) * dd["x"] + bc(flow.b(dd["t"], dd["s"])) * F64
    f_l = bc(flow.a(dd["l"], dd["s"])) * x_l + bc(flow.b(dd["l"], dd["s"])) * dd["F_l"]
    q = (f_t - f_l) / bc(dd["t"] - dd["l"])
    w = 1 / (q.detach().pow(2).flatten(1).mean(1) + 0.01) ** 0.5
    sur = (w * ((f_t - f_l) ** 2).flatten(1).mean(1) / (2 * flow.b(dd["t"], dd["s"]).abs() * (dd["t"] - dd["l"])))
    (g_sur,) = torch.autograd.grad(sur.mean(), F64)
    torch.testing.assert_close(g_fast.double(), g_sur, atol=1e-6, rtol=1e-4)


# -- registration ---------------------------------------------------------------------------------
def _opcheck_cases():
    B, T, D = 2, 5, 72
    r = lambda *s, g=True: torch.randn(*s, device=DEV, requires_grad=g)  # noqa: E731
    d = loss_inputs(3, (2, 4, 4), torch.float32, seed=4)
    Fr = d["F"].detach().requires_grad_()
    return [
        (torch.ops.soflow.layernorm_modulate, (r(B, T, D), r(B, D), r(B, D))),
        (torch.ops.soflow.layernorm_modulate_backward, (r(B, T, D, g=False), r(B, T, D, g=False), r(B, D, g=False))),
        (torch.ops.soflow.gated_residual, (r(B, T, D), r(B, D), r(B, T, D))),
        (torch.ops.soflow.gated_residual_backward, (r(B, T, D, g=False), r(B, D, g=False), r(B, T, D, g=False))),
        (torch.ops.soflow.gated_residual_layernorm_modulate, (r(B, T, D), r(B, D), r(B, T, D), r(B, D), r(B, D))),
        (torch.ops.soflow.gated_residual_layernorm_modulate_backward,
         tuple(r(*s, g=False) for s in [(B, T, D), (B, T, D), (B, T, D), (B, D), (B, T, D), (B, D)])),
        (torch.ops.soflow.fm_loss, (Fr, d["v"], d["t"], d["F_unc"], d["mask"], True, 0.75, 0.01, 3.0, 0.25, 0.8)),
        (torch.ops.soflow.fm_loss, (Fr, d["v"], d["t"], None, None, False, 1.0, 0.01, 1.0, 1.0, 1.0)),
        (torch.ops.soflow.consistency_loss, (Fr, d["x"], d["u"], d["t"], d["s"], d["l"], d["F_l"], True, 1.0, 0.01)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


class OpsCalled(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the namespaces of the soflow ops dispatched inside."""

    def __init__(self):
        super().__init__()
        self.namespaces = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace.startswith("soflow"):
            self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))


def _registration_cases():
    B, T, D = 2, 7, 72
    d = loss_inputs(3, (2, 4, 4), torch.float32, seed=5)
    flow = Flow("trig", "trig")
    return {
        "layernorm_modulate": (lambda f: f.layernorm_modulate, [(B, T, D), (B, D), (B, D)]),
        "gated_residual": (lambda f: f.gated_residual, [(B, T, D), (B, D), (B, T, D)]),
        "gated_residual_layernorm_modulate": (lambda f: f.gated_residual_layernorm_modulate,
                                              [(B, T, D), (B, D), (B, T, D), (B, D), (B, D)]),
        "layernorm_modulate_linear": (lambda f: f.layernorm_modulate_linear,
                                      [(B, T, D), (B, D), (B, D), (40, D), (40,)]),
        "linear_gated_residual": (lambda f: f.linear_gated_residual, [(B, T, 40), (B, 40), (B, T, D), (40, D), (40,)]),
        "fm_loss": (lambda f: lambda F: tuple(f.fm_loss(flow, F, d["x"], d["v"], d["t"], p=0.75, eps=0.01,
                                                          F_unc=d["F_unc"], mask=d["mask"], cfg_scale=3.0,
                                                          mix_ratio=0.25, cfg_decay_time=0.8))[:1], [(3, 2, 4, 4)]),
        "consistency_loss": (lambda f: lambda F: tuple(f.consistency_loss(flow, F, d["x"], d["u"], d["t"], d["s"],
                                                                          d["l"], d["F_l"], p=1.0, eps=0.01))[:1],
                             [(3, 2, 4, 4)]),
    }


@pytest.mark.parametrize("op", list(_registration_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_op_registration_is_the_custom_op_bitwise(op, dtype):
    """The CUDA registration (triton_op + wrap_triton), run eagerly on this device, gives the custom_op
    registration's outputs and gradients bit for bit: the two share their launchers. Its torch.compile path needs
    CUDA (benchmarks/gpu_suite.py checks it there)."""
    pick, shapes = _registration_cases()[op]
    from soflow_fast.kernels import adaln_linear
    registered = {ns: {**adaln.functions(dev)._asdict(), **soflow_loss.functions(dev)._asdict(),
                       **adaln_linear.functions(dev)._asdict()} for ns, dev in (("soflow", "cpu"),
                                                                               ("soflow_triton", "cuda"))}
    args = [torch.randn(*s, device=DEV).to(dtype) for s in shapes]
    results = {}
    for ns, functions in registered.items():
        fn = pick(SimpleNamespace(**functions))
        leaves = [x.clone().requires_grad_() for x in args]
        with OpsCalled() as seen:
            out = fn(*leaves)
            out = out if isinstance(out, tuple) else (out,)
            cot = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o) for i, o in enumerate(out)]
            grads = torch.autograd.grad(out, leaves, cot)
        assert seen.namespaces == {ns}, (ns, seen.namespaces)
        results[ns] = (out, grads)
    for a, b in zip(*(sum(results[ns], ()) for ns in registered)):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target,chunks", [(1, 1), (8, 3)])
def test_backward_reductions_in_the_parameters_dtype(monkeypatch, dtype, target, chunks):
    """The sums over T (dshift, dscale, dgate) come out in the parameters' dtype by both routes: written by the
    backward kernel when one chunk of rows per sample suffices, else by the chunk-sum kernel. Tolerances: close()."""
    launches = []

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(adaln, "programs_target", lambda t: target * t.shape[0])
    monkeypatch.setattr(adaln, "_sum_chunks_kernel", Counting(adaln._sum_chunks_kernel))
    monkeypatch.setattr(adaln, "row_tile", lambda D: (4, 128, 4))  # tiles of 4 rows: T = 11 at 8 programs per
    B, T, D = 2, 11, 72                                              # sample is 3 chunks of 4 rows
    args = (rand(B, T, D, dtype=dtype), rand(B, D, dtype=dtype), rand(B, T, D, dtype=dtype), rand(B, D, dtype=dtype),
            rand(B, D, dtype=dtype))
    check_fwd_bwd(adaln.gated_residual_layernorm_modulate, ops.gated_residual_layernorm_modulate_eager, args, dtype,
                  ["x", "gate", "y", "shift", "scale"])
    assert len(launches) == (chunks > 1) and (not launches or launches[0] == (B, 1))


# -- adaLN fused into the neighbouring GEMM (kernels/adaln_linear.py) -----------------------------
# Tolerances as close() states: fp32 1e-5 (the GEMM sums over K in another order than torch's); bf16 by relative
# L2 error < 1e-2 (forward measured bit-identical at these sizes; gradients round differently, as above).
LINEAR_CASES = [((2, 13, 72, 40), torch.float32), ((1, 5, 40, 24), torch.float32), ((2, 13, 72, 40), torch.bfloat16)]


@pytest.mark.parametrize("shape,dtype", LINEAR_CASES)  # (B, T, K, N): K, N not tile multiples, T odd
def test_layernorm_modulate_linear(shape, dtype):
    from soflow_fast.kernels import adaln_linear
    B, T, K, N = shape
    args = (rand(B, T, K, dtype=dtype) * 3 + 1, rand(B, K, dtype=dtype), rand(B, K, dtype=dtype),
            rand(N, K, dtype=dtype) * 0.2, rand(N, dtype=dtype))
    args = tuple(a.detach().requires_grad_() for a in args)
    check_fwd_bwd(adaln_linear.layernorm_modulate_linear, ops.layernorm_modulate_linear_eager, args, dtype,
                  ["x", "shift", "scale", "weight", "bias"])


@pytest.mark.parametrize("shape,dtype", LINEAR_CASES)
def test_linear_gated_residual(shape, dtype):
    from soflow_fast.kernels import adaln_linear
    B, T, K, N = shape
    args = (rand(B, T, N, dtype=dtype), rand(B, N, dtype=dtype), rand(B, T, K, dtype=dtype),
            (rand(N, K, dtype=dtype) * 0.2).detach().requires_grad_(), rand(N, dtype=dtype))
    check_fwd_bwd(adaln_linear.linear_gated_residual, ops.linear_gated_residual_eager, args, dtype,
                  ["x", "gate", "a", "weight", "bias"])


def test_linear_ops_mixed_dtypes_and_checks():
    """An fp32 residual stream with a bf16 GEMM (weights and branch input bf16, as autocast casts them), and shape
    errors that name the tensor."""
    from soflow_fast.kernels import adaln_linear
    bf16 = torch.bfloat16
    B, T, K, N = 2, 5, 40, 24
    args = (rand(B, T, N), rand(B, N, dtype=bf16), rand(B, T, K, dtype=bf16), rand(N, K, dtype=bf16),
            rand(N, dtype=bf16))
    check_fwd_bwd(adaln_linear.linear_gated_residual, ops.linear_gated_residual_eager, args, bf16,
                  ["x", "gate", "a", "weight", "bias"])
    with pytest.raises(ValueError, match="bias"):
        adaln_linear.layernorm_modulate_linear(rand(B, T, K), rand(B, K), rand(B, K), rand(N, K), rand(N + 1))
    with pytest.raises(ValueError, match="weight"):
        adaln_linear.linear_gated_residual(rand(B, T, N), rand(B, N), rand(B, T, K), rand(N, K + 1), rand(N))
