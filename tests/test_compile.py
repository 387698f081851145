"""torch.compile of the network (compile 'blocks': each DiT block; 'model': the whole network) computes what eager
does, for the calls a training step makes: a no-gradient call, a gradient call of another row count and (DiT) the
secant pair call, all twice, as two steps would.

Tolerances (fp32). Backend aot_eager (the graphs dynamo and AOTAutograd capture, run by eager kernels;
SOFLOW_COMPILE_BACKEND): the same ops on the same inputs, so outputs are bitwise equal, and so are the gradients
with 'model'; with 'blocks' a tensor feeding several graphs (the conditioning c enters every block) has its gradient
summed in another order: each gradient within 1e-6 of its tensor's largest entry (measured 1.5e-7). Inductor (one
DiT case, 'blocks') fuses and reorders fp32 sums: outputs to 1e-6 absolute (they are O(1); the secant difference,
O(0.01), measured 2e-7), gradients within 1e-6 of each tensor's largest entry (measured 2.8e-7).
"""

import torch
import pytest

import soflow_fast
from soflow_fast import ops
from soflow_fast.parallel import parallelize, resolve_compile

CPU = torch.device("cpu")
GRAPHS: list[str] = []  # the code of each graph dynamo hands to the backend below


@torch._dynamo.register_backend
def soflow_recording(gm, example_inputs):
    """aot_eager, recording which graphs were compiled (so a test sees what was compiled, not only its results)."""
    GRAPHS.append(gm.code)
    return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def twins(kind: str, kernels: str = "eager"):
    """Two copies of a tiny network with the same random (non-zero) weights."""
    def build():
        torch.manual_seed(0)
        if kind == "dit":
            net = soflow_fast.build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, kernels=kernels,
                                          hidden_size=32, num_heads=2)
        else:  # dropout on: the compiled graph must draw the masks eager draws
            net = soflow_fast.build_model("UNet-T", input_size=8, in_channels=1, num_classes=0, channel_mult=(1, 2),
                                          attn_resolutions=(4,), dropout=0.3)
        with torch.no_grad():  # zero-initialized layers (adaLN, final layer) would hide most of the network
            for p in net.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
        return net

    return build(), build()


def step_calls(net, kind: str) -> list[torch.Tensor]:
    """The outputs of one step's worth of calls (a teacher call without gradient on 6 rows, a gradient call on 4 and,
    for the DiT, the secant pair call on 2); backpropagates a fixed cotangent through the gradient outputs."""
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(6, 1, 8, 8, generator=g), torch.rand(6, generator=g)
    extra = ((torch.randint(0, 10, (6,), generator=g),) if kind == "dit" else (None, torch.randn(6, 6, generator=g)))

    def rows(n):
        return [None if e is None else e[:n] for e in extra]

    torch.manual_seed(2)  # the U-Net's dropout stream
    with torch.no_grad():
        outs = [net(x, t, t, *rows(6))]
    outs.append(net(x[:4], t[:4], t[:4] * 0.5, *rows(4)))
    if kind == "dit":
        outs.extend(net(x[:2], t[:2], t[:2] * 0.3, *rows(2), pair=(0.01 * x[2:4], 0.01 * t[2:4])))
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs if o.requires_grad)
    loss.backward()
    return [o.detach() for o in outs]


def assert_twins_agree(net, ref, kind: str, out_tol: dict, grad_rel: float) -> None:
    """Two steps' calls give equal outputs (out_tol) and every parameter gradient within grad_rel of the largest
    entry of its tensor; the first step compiles one graph per call shape, the second reuses them."""
    GRAPHS.clear()
    for step in range(2):
        torch._dynamo.utils.counters.clear()
        for a, b in zip(step_calls(net, kind), step_calls(ref, kind)):
            torch.testing.assert_close(a, b, **out_tol)
        named = dict(ref.named_parameters())
        grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        assert len(grads) == sum(p.grad is not None for p in named.values()) > 10
        for n, grad in grads.items():
            want = named[n].grad
            torch.testing.assert_close(grad, want, atol=grad_rel * want.abs().max().item(), rtol=0,
                                       msg=lambda m: f"{n}: {m}")
        compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert compiled == (3 if kind == "dit" else 2) * (step == 0), f"step {step + 1}: {compiled} graphs"
        net.zero_grad()
        ref.zero_grad()


BITWISE = dict(atol=0, rtol=0)
GRAD_REL = {"model": 0.0, "blocks": 1e-6}


@pytest.mark.parametrize("kind,kernels,mode", [("dit", "eager", "blocks"), ("dit", "eager", "model"),
                                               ("dit", "triton", "blocks"), ("dit", "triton", "model"),
                                               ("unet", "eager", "model")])
def test_compiled_matches_eager(monkeypatch, kind, kernels, mode):
    if kernels == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("SOFLOW_COMPILE_BACKEND", "soflow_recording")
    torch._dynamo.reset()
    net, ref = twins(kind, kernels)
    net = parallelize(net, "none", param_dtype=None, activation_checkpointing=False, compile=mode, device=CPU)
    assert_twins_agree(net, ref, kind, BITWISE, GRAD_REL[mode])
    # 'model': each graph is the whole network, from the patch embedding / stem convolution on; 'blocks': a block
    assert all(("conv2d" in code) == (mode == "model") for code in GRAPHS), GRAPHS


def test_compiled_with_inductor_matches_eager(monkeypatch):
    """The default backend, on the mode whose graphs see the tokens as a block input (a transposed layout gave wrong
    input gradients before the patch embedding made it contiguous). About a minute of compiling on a CPU."""
    monkeypatch.delenv("SOFLOW_COMPILE_BACKEND", raising=False)
    torch._dynamo.reset()
    net, ref = twins("dit")
    net = parallelize(net, "none", param_dtype=None, activation_checkpointing=False, compile="blocks", device=CPU)
    assert_twins_agree(net, ref, "dit", dict(atol=1e-6, rtol=0), 1e-6)


@pytest.mark.parametrize("mode", ["none", "blocks", "model"])
def test_activation_checkpointing_recomputes_each_block(monkeypatch, mode):
    """AC recomputes each block in the backward (eager: its attention runs twice per gradient call) and composes
    with either compile mode (compiled: the recompute happens inside the graph, the results are eager's)."""
    monkeypatch.setenv("SOFLOW_COMPILE_BACKEND", "soflow_recording")
    torch._dynamo.reset()
    net, ref = twins("dit")
    net = parallelize(net, "none", param_dtype=None, activation_checkpointing=True, compile=mode, device=CPU)
    if mode == "none":
        runs = {"ac": [], "plain": []}
        for key, model in (("ac", net), ("plain", ref)):
            model.blocks[0].attn.register_forward_hook(lambda *a, key=key: runs[key].append(torch.is_grad_enabled()))
            step_calls(model, "dit")
        # each attention forward run with gradient is run once more, in the backward
        assert len(runs["ac"]) == len(runs["plain"]) + sum(runs["plain"]) > len(runs["plain"]), runs
    else:
        assert_twins_agree(net, ref, "dit", BITWISE, GRAD_REL[mode])


def test_blocks_needs_blocks():
    net, _ = twins("unet")
    with pytest.raises(ValueError, match="compile: 'blocks'.*SongUNet.*use 'model'"):
        parallelize(net, "none", param_dtype=None, activation_checkpointing=False, compile="blocks", device=CPU)


def test_resolve_compile():
    assert resolve_compile("auto", "cpu") == "none" and resolve_compile("auto", "cuda") == "model"
    assert [resolve_compile(m, "cuda") for m in ("none", "blocks", "model")] == ["none", "blocks", "model"]
    with pytest.raises(ValueError, match="compile: unknown value 'fast'"):
        resolve_compile("fast", "cpu")


def test_flash_attn_lookup_traces():
    """`attention` asks for flash-attn inside compiled graphs (CUDA, bf16): the lookup must not import there."""
    fn = torch.compile(lambda q: q + (ops._flash_attn_func() is None), backend="eager", fullgraph=True)
    assert fn(torch.zeros(1)).item() == float(ops._flash_attn_func() is None)


def test_cuda_graphs_needs_compile_model_on_cuda():
    """cuda_graphs (UNTESTED ON A GPU) is refused, naming the key, unless the whole network is compiled on CUDA."""
    from soflow_fast.parallel import check_cuda_graphs

    with pytest.raises(ValueError, match="^cuda_graphs = true needs a CUDA device, not cpu"):
        check_cuda_graphs("model", "cpu", "none")
    for mode in ("none", "blocks"):
        with pytest.raises(ValueError, match=f"^cuda_graphs = true needs compile model .* not compile {mode}$"):
            check_cuda_graphs(resolve_compile(mode, "cuda"), "cuda", "none")
    with pytest.raises(ValueError, match="not parallel fsdp$"):
        check_cuda_graphs("model", "cuda", "fsdp")
    check_cuda_graphs(resolve_compile("auto", "cuda"), "cuda", "ddp")  # auto on CUDA is model: accepted


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_cuda_graphs_compiles_with_reduce_overhead(monkeypatch, cuda_graphs):
    """With cuda_graphs the network is compiled whole with mode="reduce-overhead" (cudagraph trees); without, in the
    default mode. torch.compile is recorded, not run: CUDA graphs need a GPU."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw)))
    # the whole network compiles its forward (parallel.parallelize): record whose
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append((type(fn.__self__).__name__, kw)) or fn)
    net, _ = twins("dit")
    parallelize(net, "none", param_dtype=None, activation_checkpointing=False, compile="model",
                device=torch.device("cuda"), cuda_graphs=cuda_graphs)
    assert [name for name, _ in calls] == ["DiT"]
    assert calls[0][1].get("mode") == ("reduce-overhead" if cuda_graphs else None)
    assert calls[0][1]["fullgraph"] and calls[0][1]["dynamic"] is False
