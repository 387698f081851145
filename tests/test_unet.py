"""The CIFAR-10 SongUNet (docs/algorithm.md section 3): shapes, size, reference names, the t - s input, dropout
streams."""
import math

import pytest
import torch

import soflow_fast as sf
from soflow_fast.checkpoint import load_state_strict, read_checkpoint
from soflow_fast.models.reference import strip_reference_prefix
from soflow_fast.models.unet import UNetConfig, build_unet, positional_embedding
from soflow_fast.step import SoFlowHParams, draw_noise, is_stochastic, soflow_loss

# The reference's CIFAR network (its models.py: SongUNet(img_resolution=32, in/out 3, augment_dim 6,
# model_channels 128, channel_mult [2,2,2], channel_mult_emb 4, num_blocks 4, attn [16], channel_mult_noise 2,
# resample_filter [1,3,3,1])) instantiated has exactly this many parameters.
REFERENCE_CIFAR_PARAMS = 55_932_419


def reference_shapes(res=32, cin=3, cout=3, aug=6, mc=128, mult=(2, 2, 2), emb_mult=4, noise_mult=2, blocks=4,
                     attn=(16,), taps=4):
    """EDM SongUNet's state-dict keys and shapes for the reference's options (DDPM++ blocks with resample_proj,
    positional embedding, 'standard' encoder and decoder), written from its architecture, independently of ours.
    Buffers: the 'resample_filter' of every up/down convolution."""
    E, N = mc * emb_mult, mc * noise_mult
    shapes = {"map_augment.weight": (2 * N, aug), "map_layer0.weight": (E, 2 * N), "map_layer0.bias": (E,),
              "map_layer1.weight": (E, E), "map_layer1.bias": (E,)}

    def conv(name, i, o, k, resample=False):
        shapes.update({f"{name}.weight": (o, i, k, k), f"{name}.bias": (o,)})
        if resample:
            shapes[f"{name}.resample_filter"] = (1, 1, taps, taps)

    def block(name, i, o, resample=False, attention=False):
        shapes.update({f"{name}.norm0.weight": (i,), f"{name}.norm0.bias": (i,), f"{name}.norm1.weight": (o,),
                       f"{name}.norm1.bias": (o,), f"{name}.affine.weight": (o, E), f"{name}.affine.bias": (o,)})
        conv(f"{name}.conv0", i, o, 3, resample)
        conv(f"{name}.conv1", o, o, 3)
        if i != o or resample:
            conv(f"{name}.skip", i, o, 1, resample)
        if attention:
            shapes.update({f"{name}.norm2.weight": (o,), f"{name}.norm2.bias": (o,)})
            conv(f"{name}.qkv", o, 3 * o, 1)
            conv(f"{name}.proj", o, o, 1)

    skips, c = [], mc
    for level, m in enumerate(mult):
        r = res >> level
        if level == 0:
            conv(f"enc.{r}x{r}_conv", cin, mc, 3)
        else:
            block(f"enc.{r}x{r}_down", c, c, resample=True)
        skips.append(c)
        for i in range(blocks):
            block(f"enc.{r}x{r}_block{i}", c, mc * m, attention=r in attn)
            c = mc * m
            skips.append(c)
    for level in reversed(range(len(mult))):
        r = res >> level
        if level == len(mult) - 1:
            block(f"dec.{r}x{r}_in0", c, c, attention=True)
            block(f"dec.{r}x{r}_in1", c, c)
        else:
            block(f"dec.{r}x{r}_up", c, c, resample=True)
        for i in range(blocks + 1):
            block(f"dec.{r}x{r}_block{i}", c + skips.pop(), mc * mult[level],
                  attention=i == blocks and r in attn)
            c = mc * mult[level]
    shapes.update({f"dec.{res}x{res}_aux_norm.weight": (c,), f"dec.{res}x{res}_aux_norm.bias": (c,)})
    conv(f"dec.{res}x{res}_aux_conv", c, cout, 3)
    return shapes


def tiny(**kw):
    return build_unet("UNet-T", **kw)


def small(**kw):
    """UNet-T at 16 x 16 with two levels: the behavioural tests' model (keeps them fast on a loaded CPU)."""
    return tiny(img_resolution=16, channel_mult=(1, 2), attn_resolutions=(8,), **kw)


def randomized(model, seed):
    """Weights drawn at a usable scale (the zero-ish init of conv1 / proj / aux_conv makes outputs ~0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def inputs(B=3, seed=0, res=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, res, res, generator=g)
    t = torch.rand(B, generator=g)
    return x, t, t * torch.rand(B, generator=g), torch.randn(B, 6, generator=g)


@pytest.mark.parametrize("kw", [{}, dict(img_resolution=16, channel_mult=(1, 2), attn_resolutions=(8,)),
                                dict(augment_dim=0, dropout=0.0)])
def test_forward_shapes(kw):
    m = tiny(**kw)
    R = m.cfg.img_resolution
    x, t, s, aug = inputs(2, res=R)
    assert m(x, t, s).shape == x.shape
    if m.cfg.augment_dim:
        assert m(x, t, s, None, aug).shape == x.shape
    assert m.null_label is None and m.cfg.num_classes == 0


def test_state_dict_has_the_reference_names_and_shapes():
    ours = {k: tuple(v.shape) for k, v in tiny().state_dict().items()}
    assert ours == reference_shapes(mc=16, blocks=1)
    assert sum(k.endswith("resample_filter") for k in ours) == 8  # conv0 and skip of 2 down and 2 up blocks


def test_full_size_parameter_count():
    """The reference's CIFAR U-Net: ~56M parameters, from the architecture and from the built model."""
    shapes = reference_shapes()
    from_arch = sum(math.prod(s) for k, s in shapes.items() if not k.endswith("resample_filter"))
    assert from_arch == REFERENCE_CIFAR_PARAMS
    m = build_unet()  # the defaults are the reference's configuration
    assert m.cfg == UNetConfig()
    assert sum(p.numel() for p in m.parameters()) == REFERENCE_CIFAR_PARAMS
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == shapes
    f = m.enc["16x16_down"].conv0.resample_filter
    torch.testing.assert_close(f[0, 0], torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64)


def test_initialization_follows_edm():
    m = tiny()
    b = m.enc["16x16_block0"]
    for layer, gain in ((b.conv0, 1.0), (b.conv1, 1e-5), (b.qkv, math.sqrt(0.2)), (b.proj, 1e-5)):
        o, i, k, _ = layer.weight.shape
        bound = gain * math.sqrt(6 / ((i + o) * k * k))  # xavier-uniform on fan_in + fan_out = (i + o) k^2
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.8 * bound
        assert not layer.bias.any()
    assert b.norm0.num_groups == min(32, b.in_channels // 4) and b.norm0.eps == 1e-6


def test_reference_checkpoint_round_trip(tmp_path):
    """A reference-layout checkpoint ('network.<key>') of one model loads into a fresh one: same outputs."""
    src = randomized(small(), 1)
    state = {f"network.{k}": v.clone() for k, v in src.state_dict().items()}
    torch.save({"model": state, "ema_model": state, "optimizer": {}, "finished_steps": 7, "finished_epochs": 0},
               tmp_path / "ref.pt")
    dst = randomized(small(), 2)
    load_state_strict(dst, strip_reference_prefix(read_checkpoint(tmp_path / "ref.pt")["ema_model"]))
    x, t, s, aug = inputs(res=16)
    with torch.no_grad():
        assert torch.equal(src(x, t, s, None, aug), dst(x, t, s, None, aug))
    bad = {k: v for k, v in strip_reference_prefix(state).items() if "resample_filter" not in k}
    with pytest.raises(KeyError, match="resample_filter"):
        load_state_strict(small(), bad)


def test_labels_are_refused():
    m = tiny()
    x, t, s, _ = inputs(2)
    with pytest.raises(ValueError, match="unconditional"):
        m(x, t, s, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="augment_labels"):
        m(x, t, s, None, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="input t"):
        m(x, t[:, None], s)
    with pytest.raises(ValueError, match="unknown U-Net size"):
        build_unet("UNet-Q")


def test_positional_embedding_is_sin_first_with_endpoint():
    t = torch.tensor([0.0, 0.3, 1.0])
    e = positional_embedding(t, 8)
    f = torch.tensor([10000.0 ** (-i / 3) for i in range(4)])  # endpoint: the last frequency is 1 / 10000
    torch.testing.assert_close(e, torch.cat([torch.sin(t[:, None] * f), torch.cos(t[:, None] * f)], dim=1))


def test_second_time_input_is_t_minus_s():
    """The mapping network sees [PE(t), PE(t - s)] + A(augment labels), so F depends on s only through t - s."""
    m = randomized(small(), 3)
    seen = []
    m.map_layer0.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x, t, s, aug = inputs(res=16)
    with torch.no_grad():
        out = m(x, t, s, None, aug)
        N = m.cfg.noise_channels
        want = torch.cat([positional_embedding(t, N), positional_embedding(t - s, N)], 1) + aug @ m.map_augment.weight.T
        torch.testing.assert_close(seen[0], want)
        assert not torch.allclose(out, m(x, t, s + 0.1, None, aug))  # s matters ...
        m(x, t, t)  # ... and s = t means a zero gap: the second half is PE(0) = [0 ... 0, 1 ... 1]
        torch.testing.assert_close(seen[-1][:, N:], torch.cat([torch.zeros(3, N // 2), torch.ones(3, N // 2)], 1))
        torch.testing.assert_close(seen[-1][:, :N], positional_embedding(t, N))


def test_dropout_is_seen_by_the_step_and_replayable():
    m = randomized(small(), 4).train()
    assert is_stochastic(m) and not is_stochastic(m.eval())
    m.train()
    x, t, s, aug = inputs(res=16)
    outs = []
    for grad in (True, False):
        torch.manual_seed(11)
        with torch.set_grad_enabled(grad):
            outs.append(m(x, t, s, None, aug).detach())
    assert torch.equal(outs[0], outs[1])  # same RNG state -> same masks, with or without autograd
    torch.manual_seed(12)
    assert not torch.equal(outs[0], m(x, t, s, None, aug))


def test_cifar_step_runs_and_is_reproducible():
    """The reference's cifar.yaml loss settings on the tiny U-Net: the step's dropout stream makes it replayable."""
    hp = SoFlowHParams(velocity_loss_ratio=0.0, p=0.75, eps=1e-3, time_mean=(-0.9, -4.0, -0.9),
                       time_std=(1.6, 1.6, 1.6), l_init_ratio=1.0, l_end_ratio=0.0003125, total_steps=800000)
    x0 = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    losses = []
    for seed in (1, 2):
        m = randomized(small(), 5).train()
        noise = draw_noise(hp, x0, False, torch.Generator().manual_seed(3))
        torch.manual_seed(seed)  # the global RNG must not matter
        out = soflow_loss(m, sf.Flow(), hp, x0, None, noise, 0, m.null_label)
        out.loss.backward()
        losses.append(out.loss.detach())
        assert torch.isfinite(out.loss) and m.map_layer0.weight.grad.abs().sum() > 0
    assert torch.equal(losses[0], losses[1])


def test_model_from_config_restores_tuple_fields():
    """A description that went through JSON/YAML has lists where UNetConfig declares tuples; the rebuilt config is
    the original one (tuples again), not an unequal, unhashable twin."""
    import json

    from soflow_fast.models import describe, model_from_config

    net = build_unet("UNet-T")
    rebuilt = model_from_config(json.loads(json.dumps(describe(net))))
    assert isinstance(rebuilt.cfg.channel_mult, tuple) and rebuilt.cfg == net.cfg
    hash(rebuilt.cfg)
