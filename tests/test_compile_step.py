"""compile 'step' (soflow_fast.step.compiled_loss): the whole loss of a step, three network calls and the loss math,
as one compiled graph, computes what soflow_loss does, and is compiled once for a run's steps.

Tolerances (fp32 and fp64 rows): backend aot_eager (the graph dynamo and AOTAutograd capture, run by eager kernels):
the same ops on the same inputs, so the loss, its statistics and every parameter gradient are bitwise equal. The l
ratio is the one input that changes between steps; it enters as a float64 0-dim tensor and must give the Python
float's numbers (a float64 product would differ in the last bits, and the bitwise check would see it).
"""
import pytest
import torch

import soflow_fast
from soflow_fast.flow import Flow
from soflow_fast.step import SoFlowHParams, compiled_loss, draw_noise, soflow_loss

HP = dict(cfg_scale=2.0, mix_ratio=0.5, cfg_drop_rate=0.25, cfg_decay_time=0.8, total_steps=100)


def dit(dtype: torch.dtype = torch.float32, dropout: float = 0.0):
    torch.manual_seed(0)
    net = soflow_fast.build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, null_class=True,
                                  hidden_size=32, num_heads=2).to(dtype)
    with torch.no_grad():  # zero-initialized layers (adaLN, final layer) would hide most of the network
        for p in net.parameters():
            p.normal_(0, 0.1)
    if dropout:
        net.blocks[0].attn.register_module("drop", torch.nn.Dropout(dropout))
    return net


@pytest.mark.parametrize("dtype,noising,coefficient", [(torch.float32, "Linear", "Euler"),
                                                       (torch.float64, "Trig", "Trig")])
def test_compiled_step_matches_eager(dtype, noising, coefficient):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    flow, hp = Flow(noising, coefficient), SoFlowHParams(**HP)
    net, ref = dit(dtype), dit(dtype)
    loss_fn = compiled_loss("aot_eager")
    for step in (0, 37):  # two steps, two l ratios: one graph
        g = torch.Generator().manual_seed(step)
        x0, y = torch.randn(8, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (8,), generator=g)
        noise = draw_noise(hp, x0, True, g)
        out = loss_fn(net, flow, hp, x0, y, noise, step, net.null_label)
        want = soflow_loss(ref, flow, hp, x0, y, noise, step, ref.null_label)
        out.loss.backward()
        want.loss.backward()
        torch.testing.assert_close(out.loss, want.loss, atol=0, rtol=0)
        for key, value in want.stats.items():
            torch.testing.assert_close(out.stats[key], value, atol=0, rtol=0, msg=key)
        grads = dict(ref.named_parameters())
        for name, p in net.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, atol=0, rtol=0, msg=name)
        net.zero_grad()
        ref.zero_grad()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compiled_step_refuses_dropout():
    hp = SoFlowHParams(**HP)
    net = dit(dropout=0.1)
    x0, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="compile 'step' needs a network without dropout"):
        compiled_loss("aot_eager")(net, Flow(), hp, x0, y, draw_noise(hp, x0, True), 0, net.null_label)


def test_step_mode_runs_on_one_process():
    from soflow_fast.parallel import check_cuda_graphs, parallelize, resolve_compile

    assert resolve_compile("step", "cpu") == "step"
    net = dit()
    assert parallelize(net, "none", param_dtype=None, activation_checkpointing=False, compile="step",
                       device=torch.device("cpu")) is net  # no module compiled: the trainer compiles the loss
    with pytest.raises(ValueError, match="^compile: 'step' runs on one process .* not parallel ddp; use 'model'$"):
        parallelize(net, "ddp", param_dtype=None, activation_checkpointing=False, compile="step",
                    device=torch.device("cpu"))
    check_cuda_graphs("step", "cuda", "none")  # accepted: the whole step is captured
