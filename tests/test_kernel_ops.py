"""kernels: auto | triton | eager is resolved once, at build, to one implementation per op.

auto follows kernels/choices.py, whose table must be the one benchmarks/RESULTS.md's rows give; the model's
forward and the step call the resolved functions without consulting the choice again.
"""
import re
from pathlib import Path

import torch
import pytest

import soflow_fast
from soflow_fast import kernel_ops as K
from soflow_fast import loss, ops
from soflow_fast.flow import Flow
from soflow_fast.kernels import choices
from soflow_fast import step as step_module
from soflow_fast.models import dit
from soflow_fast.step import SoFlowHParams, draw_noise, soflow_loss

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
    # ops the table does not name (not measured on this class: the GEMM-fused ones) run eager
    assert got == {op: choices.AUTO["H100"][op].impl if op in choices.AUTO["H100"] else "eager" for op in K.OP_NAMES}

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
    assert set(rows) == set(choices.AUTO["H100"]) <= set(K.OP_NAMES)  # a measured op is in the table, and only those
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


def test_registration_is_chosen_by_the_device_type_at_build():
    """kernels triton: CUDA models get the triton_op registration (inductor traces into it), every other device the
    custom_op one; eager stays eager on both."""
    pytest.importorskip("triton")
    from soflow_fast.kernels import adaln, soflow_loss

    for device_type in ("cuda", "cpu"):
        ops_ = K.kernel_ops_for("triton", device_type)
        assert ops_.layernorm_modulate is adaln.functions(device_type).layernorm_modulate
        assert ops_.fm_loss is soflow_loss.functions(device_type).fm_loss
        assert K.kernel_ops_for("eager", device_type).gated_residual is ops.gated_residual_eager
    assert adaln.functions("cuda") != adaln.functions("cpu")
    model = soflow_fast.build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, kernels="triton")
    assert model.kernel_ops is K.kernel_ops_for("triton", "cpu")


def test_compiled_model_on_cpu_calls_the_custom_ops():
    """On CPU, torch.compile of a kernels=triton model traces the custom_op registration (soflow::), never the
    triton_op one (soflow_triton::, whose tracing needs CUDA)."""
    pytest.importorskip("triton")
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = soflow_fast.build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, kernels="triton",
                                    hidden_size=32, num_heads=2, depth=1)
    compiled = torch.compile(model, backend=recording, fullgraph=True)
    compiled(torch.randn(2, 1, 8, 8), torch.rand(2), torch.rand(2), torch.randint(0, 10, (2,)))
    code = "\n".join(graphs)
    assert "torch.ops.soflow.layernorm_modulate" in code and "soflow_triton" not in code


def _soflow_imports(path: Path, package: str) -> set[str]:
    """The soflow_fast modules a source file of `package` imports."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = (package + ("." + node.module if node.module else "")) if node.level else node.module or ""
            if base in ("soflow_fast", package):  # from soflow_fast import ops / from . import x: modules
                found |= {f"{base}.{a.name}" for a in node.names}
            elif base.startswith("soflow_fast"):
                found.add(base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("soflow_fast")}
    return found


def test_kernels_import_only_the_eager_twins():
    """kernels/ imports its own helpers and the eager twins and constants (soflow_fast.ops, loss, flow), and those
    import nothing that imports kernels back (kernel_ops, models, ...): no cycle through the kernels."""
    root = Path(__file__).resolve().parents[1]
    twins = {"soflow_fast.ops", "soflow_fast.loss", "soflow_fast.flow"}
    for path in (root / "kernels").glob("*.py"):
        outside = {m for m in _soflow_imports(path, "soflow_fast.kernels") if not m.startswith("soflow_fast.kernels.")}
        assert outside <= twins, path.name
    for name in twins:
        inner = _soflow_imports(root / "soflow_fast" / (name.split(".")[1] + ".py"), "soflow_fast")
        assert inner <= twins and not any("kernel" in m for m in inner), (name, inner)


def test_unfused_gemm_ops_use_the_chosen_neighbours():
    """layernorm_modulate_linear / linear_gated_residual left eager are F.linear around this KernelOps'
    layernorm_modulate / gated_residual (so a Triton neighbour still runs): the eager twins when both are eager."""
    pytest.importorskip("triton")
    from torch.utils._python_dispatch import TorchDispatchMode

    eager = K.kernel_ops_for("eager")
    assert eager.layernorm_modulate_linear is ops.layernorm_modulate_linear_eager
    assert eager.linear_gated_residual is ops.linear_gated_residual_eager
    mixed = K.kernel_ops_for(",".join(f"{op}={'triton' if op in ('layernorm_modulate', 'gated_residual') else 'eager'}"
                                      for op in K.OP_NAMES))

    class Seen(TorchDispatchMode):
        names: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x, s, w, b = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(5, 8), torch.randn(5)
    with Seen() as seen:
        out = mixed.layernorm_modulate_linear(x, s, s, w, b)
        res = mixed.linear_gated_residual(torch.randn(2, 3, 5), torch.randn(2, 5), x, w, b)
    assert {"soflow.layernorm_modulate", "soflow.gated_residual"} <= seen.names
    torch.testing.assert_close(out, ops.layernorm_modulate_linear_eager(x, s, s, w, b), atol=1e-5, rtol=1e-5)
    assert res.shape == (2, 3, 5)
