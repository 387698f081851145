"""The one attention entry point: PyTorch SDPA (and flash-attn when installed, on CUDA) against an explicit
softmax(q k^T / sqrt(d)) v. Tolerances: fp64 1e-12 (the same math in another order); fp32 2e-6 (SDPA's fused
kernel reorders the softmax sums); bf16 1e-2 relative (8 mantissa bits; the reference upcasts to fp32)."""
import pytest
import torch

from soflow_fast import ops

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (1, 6, 64, 64), (3, 16, 5, 72)])
def test_attention_matches_explicit_softmax(device, dtype, shape):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("fp64 SDPA on CUDA takes the math path; covered on CPU")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(3))
    out = ops.attention(q, k, v)
    ref = ops.attention_eager(q.double(), k.double(), v.double()).to(dtype)
    assert out.shape == shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_flash_attn_is_import_guarded_and_reported():
    q = torch.randn(1, 2, 4, 8)
    assert ops.attention_backend(q) == "sdpa"  # CPU tensors never take flash-attn
    if ops._flash_attn_func() is None:
        assert ops.attention_backend(q.bfloat16()) == "sdpa"


def test_flash_attn_layout_handling(monkeypatch):
    """The flash-attn branch transposes to [B, T, H, D] and back (checked with a stand-in for flash_attn_func)."""
    def fake_flash(q, k, v):  # flash-attn's layout: [B, T, H, D]
        assert q.shape[1] == 7 and q.shape[2] == 3
        return ops.attention_eager(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    monkeypatch.setattr(ops, "_flash_attn_func", lambda: fake_flash)
    monkeypatch.setattr(ops, "attention_backend", lambda q: "flash-attn")
    q, k, v = (torch.randn(2, 3, 7, 16) for _ in range(3))
    torch.testing.assert_close(ops.attention(q, k, v), ops.attention_eager(q, k, v))


# -- the DiT's attention, chosen once at build (soflow_fast.attention) ------------------------------------------
# DiT parity, fp32: a forced backend and the explicit softmax differ only in the order of fp32 sums; through two
# blocks and the backward, outputs (O(1)) agree to 1e-6 absolute (measured 1.8e-7; math: bitwise) and each gradient
# to 2e-6 of its tensor's largest entry (measured 4.6e-7). fp32 only: a CPU's bf16 SDPA rounds unlike a GPU's.
from soflow_fast import attention as attn  # noqa: E402
from soflow_fast.models import build_model  # noqa: E402

FORCED = ["sdpa", "math", "flash", "efficient", "cudnn"]


def runs_on_cpu(name: str) -> bool:
    try:
        attn.attention_fn(name)(*(torch.randn(1, 1, 4, 8) for _ in range(3)))
        return True
    except RuntimeError:  # "No viable backend": this SDPA backend has no CPU kernel
        return False


def dit_outputs_and_grads(attention):
    torch.manual_seed(0)
    net = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, hidden_size=32, num_heads=2,
                      attention=attention)
    with torch.no_grad():  # adaLN and the final layer start at zero: randomize so attention reaches the output
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g), torch.randint(0, 10, (4,), generator=g)
    out = net(x, t, 0.5 * t, y)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return out.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", FORCED)
def test_forced_backend_matches_explicit_softmax_in_the_dit(name):
    if not runs_on_cpu(name):
        pytest.skip(f"SDPA backend {name} has no CPU kernel")
    out, grads = dit_outputs_and_grads(attn.resolve_attention(name, "cpu", bf16=False, head_dim=16).fn)
    ref_out, ref_grads = dit_outputs_and_grads(ops.attention_eager)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for n, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[n], atol=2e-6 * ref_grads[n].abs().max().item(), rtol=0,
                                   msg=lambda m: f"{n}: {m}")


def test_cpu_runs_sdpa_and_math_at_least():
    assert runs_on_cpu("sdpa") and runs_on_cpu("math")  # so the parity test above never skips them


def test_auto_on_cpu_is_sdpa():
    choice = attn.resolve_attention("auto", "cpu", bf16=True, head_dim=72)
    assert choice.name == "sdpa" and choice.fn is torch.nn.functional.scaled_dot_product_attention
    assert choice.describe() == "sdpa (auto on cpu)"


def test_flash_attn_refused_in_one_line_naming_the_key():
    with pytest.raises(ValueError, match=r"^attention: 'flash-attn': ") as e:
        attn.resolve_attention("flash-attn", "cpu", bf16=True, head_dim=72)
    assert "\n" not in str(e.value)
    if ops._flash_attn_func() is None:
        assert "not installed" in str(e.value)
    with pytest.raises(ValueError, match=r"^attention: unknown value 'fast'"):
        attn.resolve_attention("fast", "cpu", bf16=True, head_dim=72)


def test_auto_takes_the_table_entry_for_the_device_class(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda")  # never run: resolution only reads the name
    table = {"A100": {"backend": "flash"}, "H100": {"backend": "cudnn"}}
    choice = attn.resolve_attention("auto", cuda, bf16=True, head_dim=72, table=table)
    assert choice.name == "cudnn" and choice.why == "measured fastest on H100 at head dim 72"
    other = attn.resolve_attention("auto", cuda, bf16=True, head_dim=72, table={"A100": {"backend": "flash"}})
    assert other.why == "no measurement for this device; default"
    assert other.name == ("sdpa" if ops._flash_attn_func() is None else "flash-attn")
    assert attn.load_table() == {}  # no GPU measurement yet: auto is the default everywhere


def test_suite_json_fills_the_table(tmp_path):
    """benchmarks/attention_table.py takes gpu_suite's attention.json: the least total of the no-grad forwards and
    the gradient call's forward + backward wins, among implementations timed for every call."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import attention_table

    def row(call, impl, ms):
        return {"call": call, "impl": impl, **({"fwd_bwd_ms": ms} if call == "gradient" else {"fwd_ms": ms})}

    rows = [row("teacher", "sdpa cuDNN", 1.0), row("x_l", "sdpa cuDNN", 1.0), row("gradient", "sdpa cuDNN", 3.0),
            row("teacher", "sdpa flash", 0.5), row("x_l", "sdpa flash", 0.5), row("gradient", "sdpa flash", 4.5),
            row("teacher", "sdpa math", 0.1), row("x_l", "sdpa math", 0.1),
            {"call": "gradient", "impl": "sdpa math", "error": "out of memory"}]
    doc = {"device": "NVIDIA H200", "torch": "2.13.0", "result": {"head_dim": 72, "batch": 32, "rows": rows}}
    suite, table = tmp_path / "attention.json", tmp_path / "table.json"
    suite.write_text(json.dumps(doc))
    table.write_text(json.dumps({"A100": {"backend": "flash"}}))
    assert attention_table.main([str(suite), "--table", str(table)]) == 0
    got = json.loads(table.read_text())
    assert got["A100"] == {"backend": "flash"} and got["H200"]["backend"] == "cudnn"
    doc["result"]["head_dim"] = 16
    suite.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="head dim 16"):
        attention_table.main([str(suite), "--table", str(table)])
