"""Precision modes, the bf16 emulator, and the secant pair (docs/precision.md).

Tolerances:
- emulator vs real CPU bf16 ops: both multiply exactly and accumulate in fp32, rounding the output once; only the
  accumulation order differs, which can move an output across a rounding boundary. So per element at most one bf16
  ulp (2^-8 relative to the element's binade), and most elements identical (>= 90% at K <= 64).
- a whole network: rounding differences compound, so the check is statistical: the emulator's output is at least 2x
  closer to real bf16 than fp32's is (measured 2.8x on the model below).
- the secant pair in fp64: identical math to two calls, rearranged; 1e-10 relative (fp64 rounding through a few
  dozen ops, amplified at most by 1 / r = 500 in q).
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import soflow_fast as sf
from soflow_fast import emulate, precision
from soflow_fast.config import ConfigError, TrainConfig
from soflow_fast.emulate import BF16Emulator, round_tf32
from soflow_fast.precision import MODES, Precision, region, resolve_precision
from soflow_fast.step import SoFlowHParams, draw_noise, soflow_loss

ROOT = Path(__file__).resolve().parents[1]


def ulp_bf16(x):
    """One bf16 ulp at each element of x (2^(exponent - 7))."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.abs().clamp_min(1e-30))[1] - 8)


# -- the emulator ---------------------------------------------------------------------------------
def test_round_tf32_ties_to_even():
    one = 1.0
    x = torch.tensor([one + 2**-11, one + 3 * 2**-11, one + 2**-11 + 2**-20, -(one + 3 * 2**-11), 3.0, float("inf")])
    want = torch.tensor([one, one + 2**-9, one + 2**-10, -(one + 2**-9), 3.0, float("inf")])
    assert torch.equal(round_tf32(x), want)


@pytest.mark.parametrize("op", ["linear", "conv2d", "bmm"])
def test_emulated_gemm_matches_real_bf16(op):
    g = torch.Generator().manual_seed(0)
    if op == "linear":
        args = (torch.randn(64, 48, generator=g), torch.randn(40, 48, generator=g), torch.randn(40, generator=g))
        fn = F.linear
    elif op == "conv2d":
        args = (torch.randn(4, 6, 9, 9, generator=g), torch.randn(8, 6, 2, 2, generator=g), torch.randn(8, generator=g))
        fn = lambda x, w, b: F.conv2d(x, w, b, stride=2)  # noqa: E731
    else:
        args = (torch.randn(3, 20, 32, generator=g), torch.randn(3, 32, 24, generator=g))
        fn = torch.bmm
    leaves = [a.clone().requires_grad_() for a in args]
    real_leaves = [a.clone().requires_grad_() for a in args]
    with BF16Emulator(tf32=False), emulate.autocast(True):
        out = fn(*leaves)
        assert out.dtype == torch.bfloat16
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        out.backward(grad_out)
    real = fn(*[a.to(torch.bfloat16) for a in real_leaves])
    real.backward(grad_out)
    pairs = [(out, real)] + [(a.grad, b.grad) for a, b in zip(leaves, real_leaves)]
    for emu, ref in pairs:
        emu, ref = emu.float(), ref.float()
        assert ((emu - ref).abs() <= ulp_bf16(ref)).all()
        assert (emu == ref).float().mean() >= 0.9
    # the check can fail: the unrounded fp32 result is not within that
    exact = fn(*args)
    assert (exact != real.float()).float().mean() > 0.5


def test_emulated_dit_is_closer_to_real_bf16_than_fp32_is():
    torch.manual_seed(0)
    model = sf.build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.2)
    x, t, y = torch.randn(16, 1, 8, 8), torch.rand(16), torch.randint(0, 10, (16,))
    with torch.no_grad():
        fp32 = model(x, t, t / 2, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the DiT's GEMM-class ops are on CPU's list too
            real = model(x, t, t / 2, y).float()
        with BF16Emulator(tf32=False), emulate.autocast(True):
            emu = model(x, t, t / 2, y).float()
    assert (emu - real).norm() < 0.5 * (fp32 - real).norm()


def test_emulated_autocast_casts_like_cuda_autocast():
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    with BF16Emulator() as em:
        with emulate.autocast(True):
            h = F.linear(x, w)
            assert h.dtype == torch.bfloat16
            assert F.layer_norm(h, (3,)).dtype == torch.float32  # on CUDA autocast's fp32 list
            assert (h * 2).dtype == torch.bfloat16              # pointwise: as it comes
            with emulate.autocast(False):
                assert F.linear(x, w).dtype == torch.float32
        h.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert em.flops["bf16"] == 3 * 2 * 4 * 8 * 3  # forward and two backward GEMMs, all bf16
    assert em.flops["fp32"] == 2 * 4 * 8 * 3


# -- modes ----------------------------------------------------------------------------------------
def test_auto_is_fp32_on_cpu_and_the_chosen_mode_on_cuda(monkeypatch):
    assert resolve_precision("auto", "cpu") == MODES["fp32"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", "cuda") == MODES[precision.AUTO_CUDA] == MODES["bf16-secant"]
    assert resolve_precision("auto", "cuda", secant=False) == MODES["bf16-split"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("auto", "cuda")
    with pytest.raises(ValueError, match="precision: unknown value 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_config_checks_precision():
    for name in precision.PRECISIONS:
        TrainConfig.from_dict({"precision": name})
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig.from_dict({"precision": "bf16-secant", "model_type": "UNet-T", "dataset_type": "CIFAR10"})


def test_cuda_regions_disable_the_autocast_weight_cache(monkeypatch):
    """With the cache, a no-grad call and a gradient call in one region share casts without grad history (the weights
    then get no gradient: pytorch/pytorch#112583); every CUDA region must be opened with cache_enabled=False."""
    seen = []
    monkeypatch.setattr(torch, "autocast", lambda *a, **kw: seen.append((a, kw)) or _Null())
    with region(MODES["bf16-secant"], True, "cuda"):
        with precision.skeleton("cuda"):
            pass
    assert seen and all(kw.get("cache_enabled") is False for _, kw in seen)
    assert [kw["enabled"] for _, kw in seen] == [True, False]  # the skeleton opens an fp32 region inside


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_bf16_region_on_cpu_needs_the_emulator():
    with pytest.raises(RuntimeError, match="emulator"):
        with region(MODES["bf16"], True, "cpu"):
            pass


# -- the secant pair ------------------------------------------------------------------------------
def _random_dit(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = sf.build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10).to(dtype)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("r", [0.1, 0.01, 0.002])
def test_secant_pair_equals_two_calls_in_fp64(r):
    model = _random_dit()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    t, s = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64), torch.tensor([0.1, 0.0, 0.2], dtype=torch.float64)
    y = torch.tensor([1, 2, 10])
    l = t + (s - t) * r
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64) * r
    F_t, dF = model(x, t, s, y, pair=(dx, l - t))
    assert torch.equal(F_t, model(x, t, s, y))
    two_call = model(x + dx, l, s, y) - F_t
    assert (dF - two_call).abs().max() <= 1e-10 * two_call.abs().max()


@pytest.mark.parametrize("noising,coefficient", [("Linear", "Euler"), ("Trig", "Trig")])
def test_secant_step_equals_two_call_step_in_fp64(noising, coefficient):
    """The whole step: loss, every statistic and every parameter gradient, secant vs step.py's two-call form."""
    flow = sf.Flow(noising, coefficient)
    hp = SoFlowHParams(cfg_scale=2.0, mix_ratio=0.5, cfg_drop_rate=0.3, cfg_decay_time=0.8, l_init_ratio=0.01,
                       l_end_ratio=0.002, total_steps=10)
    x0 = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(8) % 10
    noise = draw_noise(hp, x0, True, torch.Generator().manual_seed(3))
    noise.x1, noise.t_fm, noise.s_draw, noise.t_draw = (v.double() for v in (noise.x1, noise.t_fm, noise.s_draw,
                                                                               noise.t_draw))
    results = []
    for mode in (MODES["fp32"], Precision("fp64-secant", secant=True)):
        model = _random_dit()
        out = soflow_loss(model, flow, hp, x0, y, noise, step=4, null_label=model.null_label, precision=mode)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-10, atol=0)
    for k in a.stats:
        torch.testing.assert_close(b.stats[k], a.stats[k], rtol=1e-10, atol=1e-14, msg=k)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-9, atol=1e-12, msg=k)


# -- the benchmark's findings, at a size CI runs in seconds ------------------------------------------
def test_precision_benchmark_orders_the_modes(tmp_path):
    """Emulated on a random digits-sized DiT: naive bf16 is worse than TF32 at every r, by a growing factor; the
    secant's error does not grow as r shrinks and beats TF32's by 10x at r = 0.002; split stays near TF32."""
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "precision.py"), "--xl-depth", "0", "--rows", "16",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| digits (random) | bf16-secant |" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    err = {(x["mode"], x["r"]): x["q_rel_error"] for x in rows}
    frac = {x["mode"]: x["bf16_gemm_fraction"] for x in rows if "bf16_gemm_fraction" in x}
    for ratio in (0.1, 0.027, 0.01, 0.002):
        assert err[("bf16", ratio)] > 3 * err[("fp32", ratio)]
        assert err[("fp32 (IEEE)", ratio)] < err[("fp32", ratio)]
        assert err[("bf16-split", ratio)] < 1.5 * err[("fp32", ratio)]
    assert err[("bf16-secant", 0.002)] < 2 * err[("bf16-secant", 0.1)]
    assert err[("bf16-secant", 0.002)] < 0.1 * err[("fp32", 0.002)]
    assert frac["fp32"] == 0 and frac["bf16"] == 1
    assert frac["bf16-secant"] > 0.9 and 0.6 < frac["bf16-split"] < 0.9


# -- FSDP2 keeps the network's inputs in fp32 --------------------------------------------------------
FSDP_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    import soflow_fast as sf
    from soflow_fast.parallel import init_distributed, parallelize
    from soflow_fast.precision import MODES, numerics, region
    dist = init_distributed("cpu")
    model = sf.build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    seen = {}
    model.x_embedder.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", str(a[0].dtype)))
    model.t_embedder.register_forward_pre_hook(lambda m, a: seen.__setitem__("t", str(a[0].dtype)))
    model.s_embedder.register_forward_pre_hook(lambda m, a: seen.__setitem__("t - s", str(a[0].dtype)))
    model = parallelize(model, "fsdp", param_dtype=torch.bfloat16, activation_checkpointing=False,
                        compile="none", device=torch.device("cpu"))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.7, 0.69])
    mode = MODES["bf16"]  # the mode that gathers bf16 parameters; on a CPU it runs under the emulator
    with torch.no_grad(), numerics(mode, "cpu"), region(mode, True, "cpu"):
        model(x, t, t * 0, torch.tensor([1, 2]))
    if dist.rank == 0:
        print(json.dumps(seen), flush=True)
    torch.distributed.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where torch.distributed's threads intermittently abort
""")


def test_fsdp_bf16_parameters_keep_x_t_s_in_fp32(torchrun):
    seen = torchrun(FSDP_SCRIPT)
    assert seen == {"x": "torch.float32", "t": "torch.float32", "t - s": "torch.float32"}

