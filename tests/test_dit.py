"""The DiT of docs/algorithm.md section 3: shapes, sizes, embeddings, initialization, conditioning rules."""
import math

import numpy as np
import pytest
import torch

import soflow_fast as sf
from soflow_fast.models import DIT_SIZES, canonical_size
from soflow_fast.models.dit import sincos_pos_embed_2d, timestep_embedding


def tiny(**kw):
    args = dict(input_size=8, in_channels=3, num_classes=10)
    args.update(kw)
    return sf.build_model("DiT-T/2", **args)


def test_size_table_matches_section_3():
    want = {"DiT-S/2": (2, 384, 12, 6), "DiT-S/4": (4, 384, 12, 6), "DiT-B/4": (4, 768, 12, 12),
            "DiT-B/2": (2, 768, 12, 12), "DiT-M/2": (2, 1024, 16, 16), "DiT-L/2": (2, 1024, 24, 16),
            "DiT-XL/2": (2, 1152, 28, 16)}
    for name, sizes in want.items():
        assert DIT_SIZES[name] == sizes
        assert canonical_size(name.replace("/", "-")) == name  # the reference configs' spelling
    with pytest.raises(ValueError, match="model_type"):
        canonical_size("DiT-Q/3")


def test_b4_parameter_count_matches_dit_formula():
    """DiT-B/4 at 32x32x4 latents: count from the architecture (independent arithmetic)."""
    m = sf.build_model("DiT-B/4", input_size=32, in_channels=4, num_classes=1000)
    H, p, C, depth = 768, 4, 4, 12
    block = (3 * H * H + 3 * H) + (H * H + H) + (4 * H * H + 4 * H) + (4 * H * H + H) + (H * 6 * H + 6 * H)
    emb = 2 * (256 * H + H + H * H + H)  # two time embedders
    count = (C * p * p * H + H) + emb + 1001 * H + depth * block + (H * 2 * H + 2 * H) + (H * p * p * C + p * p * C)
    assert sum(q.numel() for q in m.parameters() if q.requires_grad) == count
    assert m.pos_embed.shape == (1, 64, H) and not m.pos_embed.requires_grad


@pytest.mark.parametrize("input_size,channels,classes", [(8, 1, 10), (16, 4, 0), (12, 3, 7)])
def test_forward_shapes(input_size, channels, classes):
    m = sf.build_model("DiT-T/2", input_size=input_size, in_channels=channels, num_classes=classes)
    x = torch.randn(3, channels, input_size, input_size)
    y = torch.randint(0, classes, (3,)) if classes else None
    assert m(x, torch.rand(3), torch.rand(3), y).shape == x.shape


def test_timestep_embedding_is_cos_first_raw_t():
    t = torch.tensor([0.0, 0.37, 1.0])
    e = timestep_embedding(t, 256)
    f = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    torch.testing.assert_close(e[:, :128], torch.cos(t[:, None] * f))
    torch.testing.assert_close(e[:, 128:], torch.sin(t[:, None] * f))


def test_pos_embed_matches_mae_formula():
    """Independent transcription: first half encodes the column (w) coordinate, second the row; sin then cos."""
    D, G = 16, 3
    pe = sincos_pos_embed_2d(D, G)
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    for r in range(G):
        for c in range(G):
            row = pe[r * G + c]
            np.testing.assert_allclose(row[: D // 4], np.sin(c * omega), rtol=1e-12)
            np.testing.assert_allclose(row[D // 4: D // 2], np.cos(c * omega), rtol=1e-12)
            np.testing.assert_allclose(row[D // 2: 3 * D // 4], np.sin(r * omega), rtol=1e-12)
            np.testing.assert_allclose(row[3 * D // 4:], np.cos(r * omega), rtol=1e-12)


def test_initialization_rules():
    torch.manual_seed(0)
    m = sf.build_model("DiT-S/2", input_size=16, in_channels=4, num_classes=1000)
    for b in m.blocks:
        assert b.adaLN_modulation[-1].weight.abs().sum() == 0 and b.adaLN_modulation[-1].bias.abs().sum() == 0
    fl = m.final_layer
    for w in (fl.adaLN_modulation[-1].weight, fl.linear.weight, fl.linear.bias):
        assert w.abs().sum() == 0
    assert abs(m.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    assert abs(m.t_embedder.mlp[2].weight.std().item() - 0.02) < 0.002
    # the t - s embedder keeps xavier-uniform: std = sqrt(2 / (fan_in + fan_out)) for 256 -> 384
    assert abs(m.s_embedder.mlp[0].weight.std().item() - math.sqrt(2 / (256 + 384))) < 0.003
    assert m.s_embedder.mlp[0].bias.abs().sum() == 0
    assert abs(m.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.002
    assert m.y_embedder.embedding_table.weight.shape[0] == 1001
    # zero-initialised output: F = 0 everywhere at init
    assert m(torch.randn(2, 4, 16, 16), torch.rand(2), torch.rand(2), torch.tensor([1, 2])).abs().max() == 0


def test_second_embedder_sees_t_minus_s():
    m = tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    t = torch.tensor([0.7, 0.4])
    a = m(x, t, t - 0.3, y)
    # hand-built conditioning through the same modules: t_embedder(t) + s_embedder(t - s) + label
    c = m.t_embedder(t) + m.s_embedder(torch.full((2,), 0.3)) + m.y_embedder(y)
    h = m.x_embedder(x) + m.pos_embed
    for blk in m.blocks:
        h = blk(h, c)
    torch.testing.assert_close(a, m.unpatchify(m.final_layer(h, c)))


def test_labels_null_and_unconditional():
    m = tiny()
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    torch.testing.assert_close(m(x, t, t, None), m(x, t, t, torch.tensor([10, 10])))  # None = the null label
    assert m.null_label == 10
    no_null = tiny(null_class=False)
    assert no_null.null_label is None and no_null.y_embedder.embedding_table.weight.shape[0] == 10
    with pytest.raises(ValueError, match="null label"):
        no_null(x, t, t, None)
    unc = tiny(num_classes=0)
    assert unc.y_embedder is None
    with pytest.raises(ValueError, match="unconditional"):
        unc(x, t, t, torch.tensor([1, 2]))


def test_bad_shapes_are_named():
    m = tiny()
    with pytest.raises(ValueError, match=r"input x: expected shape \[B, 3, 8, 8\]"):
        m(torch.randn(2, 3, 16, 16), torch.rand(2), torch.rand(2))
    with pytest.raises(ValueError, match="input s"):
        m(torch.randn(2, 3, 8, 8), torch.rand(2), torch.rand(3))
    with pytest.raises(ValueError, match="divisible"):
        sf.build_model("DiT-T/2", input_size=9, in_channels=1, num_classes=0)
    with pytest.raises(ValueError, match="kernels"):
        sf.build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=0, kernels="cuda-magic")
