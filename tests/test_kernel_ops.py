"""kernels: auto | triton | eager is resolved once, at build, to one implementation per op.

auto follows kernels/choices.py, whose table must be the one benchmarks/RESULTS.md's rows give; the model's
forward and the step call the resolved functions without consulting the choice again.
"""
import os
import re
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import soflow_fast  # noqa: E402
from soflow_fast import kernel_ops as K  # noqa: E402
from soflow_fast import loss, ops  # noqa: E402
from soflow_fast.flow import Flow  # noqa: E402
from soflow_fast.kernels import choices  # noqa: E402
from soflow_fast import step as step_module  # noqa: E402
from soflow_fast.models import dit  # noqa: E402
from soflow_fast.step import SoFlowHParams, draw_noise, soflow_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"


def on_gpu(monkeypatch, name: str) -> None:
    """Make torch.cuda name every device `name` (no GPU needed: resolution only reads the name)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_auto_is_eager_off_cuda():
    assert K.resolve_kernels("auto", "cpu") == "eager"
    eager = K.kernel_ops_for(K.resolve_kernels("auto", "cpu"))
    assert eager.layernorm_modulate is ops.layernorm_modulate_eager
    assert eager.fm_loss is loss.fm_loss
    assert K.resolve_kernels("triton", "cpu") == "triton"  # asked for: taken as asked, on any device


def test_auto_on_a_measured_gpu_follows_the_table(monkeypatch):
    on_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    got = K.parse_kernels(K.resolve_kernels("auto", "cuda:0"))
    assert got == {op: choices.AUTO["H100"][op].impl for op in K.OP_NAMES}

    # One op won on this class: auto gives that op Triton and the others eager, in one resolved string.
    table = {**choices.AUTO["H100"], "gated_residual": choices.Choice("triton", "test")}
    monkeypatch.setattr(choices, "AUTO", {"H100": table})
    resolved = K.resolve_kernels("auto", "cuda:0")
    assert K.parse_kernels(resolved) == {op: "triton" if op == "gated_residual" else "eager" for op in K.OP_NAMES}
    from soflow_fast.kernels import adaln
    mixed = K.kernel_ops_for(resolved)
    assert mixed.gated_residual is adaln.gated_residual
    assert mixed.layernorm_modulate is ops.layernorm_modulate_eager
    assert "gated_residual triton" in mixed.describe()

    on_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB")  # not measured: eager
    assert K.resolve_kernels("auto", "cuda:0") == "eager"


def test_resolved_strings_are_checked():
    for bad in ("auto", "fast", "layernorm_modulate=triton"):
        with pytest.raises(ValueError, match="kernels"):
            K.parse_kernels(bad)
    with pytest.raises(ValueError, match="kernels"):
        dit.DiTConfig(kernels="auto")  # a config carries the resolved choice, never the request


def results_rows() -> dict[str, list[float]]:
    """op -> compile/Triton ratios of its fwd+bwd rows in RESULTS.md's "All rows" table."""
    rows: dict[str, list[float]] = {}
    for line in RESULTS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and cells[0] in K.OP_NAMES and cells[4] == "fwd+bwd":
            rows.setdefault(cells[0], []).append(float(cells[10]))
    return rows


def test_table_is_what_results_md_measured():
    """Each H100 choice follows from its rows: Triton iff it beat compile by more than TIE in every fwd+bwd row;
    the evidence quotes the rows' range and count."""
    rows = results_rows()
    assert set(rows) == set(K.OP_NAMES)
    for op, ratios in rows.items():
        choice = choices.AUTO["H100"][op]
        assert choice.impl == ("triton" if min(ratios) > choices.TIE else "eager"), op
        span = re.search(r"compile/Triton ([\d.]+)-([\d.]+) over (\d+) rows", choice.evidence)
        assert span and (float(span[1]), float(span[2]), int(span[3])) == (min(ratios), max(ratios), len(ratios)), op


def test_forward_and_step_do_not_resolve_per_call(monkeypatch):
    """After build, the resolver may vanish: the forward and the loss only call the functions the model holds."""
    torch.manual_seed(0)
    model = soflow_fast.build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, kernels="triton")

    def refuse(*args, **kwargs):
        raise AssertionError("the implementation was looked up after build")

    for name in ("kernel_ops_for", "resolve_kernels", "parse_kernels"):
        monkeypatch.setattr(K, name, refuse)
    for module, name in ((dit, "kernel_ops_for"), (dit, "parse_kernels"), (step_module, "kernel_ops_for")):
        monkeypatch.setattr(module, name, refuse)
    hp = SoFlowHParams(cfg_scale=2.0, cfg_drop_rate=0.5, total_steps=10)
    x0 = torch.randn(4, 1, 8, 8)
    y = torch.randint(0, 10, (4,))
    noise = draw_noise(hp, x0, guided=True, generator=torch.Generator().manual_seed(1))
    out = soflow_loss(model, Flow("linear", "euler"), hp, x0, y, noise, step=0, null_label=model.null_label,
                      kernel_ops=model.kernel_ops)
    out.loss.backward()
    assert torch.isfinite(out.loss)
