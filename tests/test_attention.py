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
