"""The fused kernels inside the model and the training step: kernels='triton' must equal kernels='eager'.

Runs the Triton kernels on CUDA, or on CPU under the Triton interpreter (TRITON_INTERPRET=1, set here when unset;
see tests/test_kernels.py). fp32 throughout: the two paths differ only in the order of fp32 sums, so outputs,
loss terms and every parameter gradient agree to atol = rtol = 1e-5 (gradients 1e-4 rtol: they pass through two
blocks and the backward of attention, which amplify the 1e-7 differences of the adaLN sums).
"""

import torch
import pytest

pytest.importorskip("triton")

import soflow_fast
from soflow_fast.flow import Flow
from soflow_fast.kernels import _common
from soflow_fast.step import SoFlowHParams, draw_noise, soflow_loss

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def twin_models():
    """A tiny DiT with kernels='triton' and its kernels='eager' twin with the same (random, non-zero) weights."""
    torch.manual_seed(0)
    kw = dict(input_size=8, in_channels=1, num_classes=10, device=DEV)
    fast = soflow_fast.build_model("DiT-T/2", kernels="triton", **kw)
    with torch.no_grad():  # DiT zero-initializes adaLN and the final layer: randomize so every path carries signal
        for p in fast.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    ref = soflow_fast.build_model("DiT-T/2", kernels="eager", **kw)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def inputs(B=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 1, 8, 8, generator=g).to(DEV)
    t = torch.rand(B, generator=g).to(DEV)
    return x, t, t * 0.5, torch.randint(0, 10, (B,), generator=g).to(DEV)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(fast, ref):
    gf, gr = grads(fast), grads(ref)
    assert gf.keys() == gr.keys() and len(gf) > 10
    for name in gr:
        torch.testing.assert_close(gf[name], gr[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def assert_matches_reference(net, fast, ref):
    """net (fast, or a compiled fast) gives ref's outputs, and backprop leaves fast with ref's gradients."""
    x, t, s, y = inputs()
    out_n, out_r = net(x, t, s, y), ref(x, t, s, y)
    torch.testing.assert_close(out_n, out_r, atol=1e-5, rtol=1e-5)
    cot = torch.randn_like(out_r)
    (out_n * cot).sum().backward()
    (out_r * cot).sum().backward()
    assert_same_grads(fast, ref)


def test_kernels_really_run():
    assert _common.use_triton(torch.zeros(1, device=DEV)), "export TRITON_INTERPRET=1 for the whole test run"


def test_dit_outputs_and_gradients():
    fast, ref = twin_models()
    assert_matches_reference(fast, fast, ref)


def test_training_step():
    """soflow_loss with guidance (mask, mix != 1, tau < 1): loss terms, statistics and all gradients."""
    fast, ref = twin_models()
    hp = SoFlowHParams(cfg_scale=3.0, mix_ratio=0.25, cfg_drop_rate=0.5, cfg_decay_time=0.8, total_steps=100)
    flow = Flow("linear", "euler")
    x0, _, _, y = inputs(B=8)
    noise = draw_noise(hp, x0, guided=True, generator=torch.Generator(DEV).manual_seed(2))
    out_f = soflow_loss(fast, flow, hp, x0, y, noise, step=3, null_label=fast.null_label, kernel_ops=fast.kernel_ops)
    out_r = soflow_loss(ref, flow, hp, x0, y, noise, step=3, null_label=ref.null_label, kernel_ops=ref.kernel_ops)
    torch.testing.assert_close(out_f.loss, out_r.loss, atol=1e-5, rtol=1e-5)
    for k in out_r.stats:
        torch.testing.assert_close(out_f.stats[k], out_r.stats[k], atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    out_f.loss.backward()
    out_r.loss.backward()
    assert_same_grads(fast, ref)


def test_torch_compile_fullgraph():
    """The registered ops trace: no graph break, same outputs and gradients (aot_eager on CPU, inductor on CUDA)."""
    torch._dynamo.reset()
    fast, ref = twin_models()
    compiled = torch.compile(fast, fullgraph=True, backend="inductor" if DEV == "cuda" else "aot_eager")
    assert_matches_reference(compiled, fast, ref)


def test_trainer_first_steps_match_eager(tmp_path):
    """The digits trainer with kernels=triton (interpreter on CPU) logs the same first steps as kernels=eager.
    fp32 tolerance as above: the kernels sum in another order, a few ulps per op over three steps."""
    import json

    from soflow_fast.config import TrainConfig
    from soflow_fast.train import Trainer

    logs = {}
    for impl in ("triton", "eager"):
        cfg = TrainConfig.from_dict(dict(
            model_type="DiT-S/2", hidden_size=32, depth=1, num_heads=2, dataset_type="digits", data_size=8,
            batch_size=16, total_steps=3, cfg_scale=2.0, cfg_drop_rate=0.2, mix_ratio=0.5, cfg_decay_time=0.8,
            logging_steps=1, ckpt_saving_steps=3, eval_demo_steps=0, quality_report=False, device=DEV,
            kernels=impl, seed=5))
        tr = Trainer(cfg, tmp_path / impl)
        assert tr.net.cfg.kernels == impl
        tr.fit(progress=False)
        logs[impl] = [json.loads(l) for l in (tmp_path / impl / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(logs["triton"], logs["eager"]):
        for key in ("loss", "loss_fm", "loss_c", "mse_fm", "mse_c", "weight_fm", "weight_c", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
