"""benchmarks/gpu_suite.py runs on a CPU: every stage at tiny shapes with the clock stubbed, a failing stage is
recorded without stopping the others, the matrix stops at its cap, and the child processes are capped and killed.
The suite is meant for one short GPU window; anything broken in it would otherwise be found only on that day."""
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_suite as suite  # noqa: E402

from soflow_fast.models.dit import DiT, DiTBlock  # noqa: E402
from soflow_fast.precision import MODES  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode; on a GPU run the suite itself")


@pytest.fixture
def fake_clock(monkeypatch):
    """Every clock read is 1 ms after the last: timings are fixed, and no test depends on this machine's speed."""
    ticks = itertools.count()
    monkeypatch.setattr(suite.Timer, "clock", staticmethod(lambda: next(ticks) * 1e-3))


@pytest.fixture
def compiled(monkeypatch):
    """torch.compile records what it was asked to compile and returns it unchanged (inductor on a CPU would take
    minutes); nn.Module.compile goes through it too."""
    calls = []

    def fake_compile(fn=None, *args, **kwargs):
        calls.append(fn)
        return fn
    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def load(out: Path, stage: str) -> dict:
    return json.loads((out / f"{stage}.json").read_text())


def last_table(printed: str) -> list[str]:
    lines = printed.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("| stage | status |"))
    return lines[start:]


def test_every_stage_at_tiny_shapes(tmp_path, fake_clock, compiled, capsys):
    assert suite.main(["--tiny", "--in-process", "--out", str(tmp_path), "--batches", "4",
                       "--compile-estimate-s", "1"]) == 0
    docs = {name: load(tmp_path, name) for name in suite.STAGES}
    for name, doc in docs.items():
        assert doc["status"] == "ok", (name, doc.get("traceback"))
        assert {"device", "torch", "elapsed_s", "cap_s"} <= set(doc)

    ceilings = docs["ceilings"]["result"]
    assert ceilings["copy"]["GB_s"] > 0
    assert [(g["dtype"], g["TFLOP_s"] > 0) for g in ceilings["gemm"]] == [("bf16", True), ("TF32", True),
                                                                          ("fp32", True)]

    attention = docs["attention"]["result"]
    assert (attention["heads"], attention["head_dim"], attention["tokens"]) == (2, 16, 4)
    calls = {(a["call"], a["rows"]) for a in attention["rows"]}
    assert calls == {("teacher", 3 + 2 * 1), ("x_l", 1), ("gradient", 4)}  # B = 4: 3 FM rows, 1 consistency row
    by_impl = {a["impl"]: a for a in attention["rows"] if a["call"] == "gradient"}
    assert set(by_impl) == {"sdpa (its own choice)", "sdpa cuDNN", "sdpa flash", "sdpa efficient", "sdpa math",
                            "flash-attn"}
    assert by_impl["sdpa math"]["fwd_bwd_ms"] > 0 and "error" in by_impl["sdpa cuDNN"]  # no cuDNN on a CPU
    assert "skipped" in by_impl["flash-attn"]

    prec = docs["precision"]["result"]
    assert {r["mode"] for r in prec["rows"]} == set(suite.precision_bench.MODES)
    assert all(r["q_rel_error"] > 0 for r in prec["rows"]) and "| digits (random) | bf16-secant |" in prec["table"]

    profile = docs["profile"]["result"]
    assert profile["precision"] == "fp32" and profile["kernels_per_step"] > 0
    assert set(profile["device_ms_by_category"]) == {"attention", "optimizer", "GEMM", "elementwise/norm", "other"}
    assert profile["device_ms_by_category"]["GEMM"] > 0 and profile["top_kernels"]
    assert {"gpu_busy_pct", "host_ms_per_step", "wall_ms_per_step"} <= set(profile)

    kernels = docs["kernels"]["result"]
    assert [k["op"] for k in kernels["rows"]] == suite.kernel_bench.ADALN + suite.kernel_bench.LINEAR + \
        suite.kernel_bench.LOSSES
    for k in kernels["rows"]:  # compile is stubbed here: the compiled path is the eager one, exactly
        assert k["compiled_vs_eager_err"] == 0 and k["triton_vs_twin_err"] < 0.1 and k["triton_ms"] > 0, k

    matrix = docs["matrix"]["result"]
    assert matrix["kernels_auto"] == "eager" and matrix["rounds_done"] == 1
    assert matrix["flops_per_step"]["4"] > 0 and matrix["peak_TFLOP_s"] == {"bf16": None, "fp32 (TF32)": None}
    rows = matrix["rows"]
    assert all(r["status"] == "measured" for r in rows), [r["status"] for r in rows]
    three = {(r["precision"], r["kernels"], r["compile"]) for r in rows if r["formulation"] == "three-call"}
    assert three == {(m, k, c) for m in MODES for k in ("eager", "triton")  # no CUDA: no "+graphs" variants
                     for c in ("none", "blocks", "model", "step")}
    assert [(r["formulation"], r["precision"]) for r in rows if r["formulation"] == "six-call"] == [("six-call",
                                                                                                       "fp32")]
    assert all(r["step_ms"] > 0 and r["speedup_vs_six_call"] > 0 and r["images_s"] > 0 and r["mfu"] is None
               for r in rows)
    # compile='blocks' compiled each block, 'model' the whole network, once per kernel implementation
    owners = [type(getattr(fn, "__self__", None)) for fn in compiled]
    assert owners.count(DiTBlock) == 2 and owners.count(DiT) == 2
    # 'step' compiled the loss of each step variant (one precision mode x kernels each), not a module
    assert sum(getattr(fn, "__name__", "") == "_loss_at" for fn in compiled) == len(MODES) * 2

    table = last_table(capsys.readouterr().out)
    assert [line.split("|")[1].strip() for line in table[2:]] == list(suite.STAGES)
    assert all(line.split("|")[2].strip() == "ok" for line in table[2:])
    assert "## summary" in (tmp_path / "summary.md").read_text()


def test_a_failing_stage_is_recorded_and_the_rest_run(tmp_path, fake_clock, monkeypatch, capsys):
    def boom(ctx):
        raise RuntimeError("boom: a broken stage")
    monkeypatch.setitem(suite.STAGES, "ceilings", suite.dataclasses.replace(suite.STAGES["ceilings"], run=boom))
    assert suite.main(["--tiny", "--in-process", "--out", str(tmp_path), "--stages", "ceilings", "attention"]) == 0
    failed, after = load(tmp_path, "ceilings"), load(tmp_path, "attention")
    assert failed["status"] == "error" and "boom: a broken stage" in failed["error"] and "boom" in failed["traceback"]
    assert after["status"] == "ok" and after["result"]["rows"]
    table = last_table(capsys.readouterr().out)
    assert "| ceilings | error |" in table[2] and "boom" in table[2] and "| attention | ok |" in table[3]


def test_the_matrix_stops_cleanly_at_its_cap(tmp_path, fake_clock, compiled):
    """With a 1 s cap nothing fits (a step is estimated at 1 s before any is seen): every variant is recorded as
    skipped, none is started, and the stage still ends ok."""
    assert suite.main(["--tiny", "--in-process", "--out", str(tmp_path), "--stages", "matrix",
                       "--cap-matrix", "1"]) == 0
    doc = load(tmp_path, "matrix")
    assert doc["status"] == "ok" and doc["result"]["rounds_done"] == 0
    assert {r["status"] for r in doc["result"]["rows"]} == {"skipped: stage cap"}
    assert len(doc["result"]["rows"]) == 2 * (1 + len(MODES) * 2 * 4) and not compiled  # B = 4 and 8; 4 compiles


def test_children_on_a_cpu_skip_cuda_stages_and_are_killed_at_their_cap(tmp_path):
    """As run on the day, but on this CPU: stages in child processes. Without CUDA the CUDA stages are skipped;
    a child that outlives its cap (0.5 s: it is still importing torch) is killed and recorded; no traceback."""
    run = lambda *a: subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    t0 = time.monotonic()
    got = run("--stages", "profile", "matrix", "attention", "ceilings", "--cap-ceilings", "0.5")
    assert got.returncode == 0 and "Traceback" not in got.stdout + got.stderr, got.stderr
    for name in ("profile", "matrix", "attention"):
        assert load(tmp_path, name)["reason"] == "skipped: no CUDA"
    killed = load(tmp_path, "ceilings")
    assert killed["status"] == "timeout" and "killed at the stage cap" in killed["error"]
    assert time.monotonic() - t0 < 60
    assert "| ceilings | timeout |" in "\n".join(last_table(got.stdout))

    got = run("--tiny", "--stages", "ceilings")  # a child that finishes: its own JSON, read back by the parent
    assert got.returncode == 0 and "Traceback" not in got.stdout + got.stderr, got.stderr
    assert load(tmp_path, "ceilings")["status"] == "ok" and (tmp_path / "ceilings.log").exists()
    assert "| ceilings | ok |" in "\n".join(last_table(got.stdout))


def test_kernel_categories():
    names = {
        "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<...>>>": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3": "attention",
        "fmha_cutlassB_bf16_aligned_64x64_k128_sm80": "attention",
        "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT": "GEMM",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "GEMM",
        "aten::addmm": "GEMM",
        "void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor>": "optimizer",
        "void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>": "elementwise/norm",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>": "elementwise/norm",
        "_adaln_bwd_kernel": "elementwise/norm",
        "triton_poi_fused_add_mul_0": "elementwise/norm",
        "Memcpy DtoD (Device -> Device)": "other",
    }
    assert {n: suite.classify(n) for n in names} == names


@pytest.mark.parametrize("cuda", [False, True])
def test_matrix_priority(cuda):
    """The default mode compiled as a model, as a step and (CUDA) as a step in CUDA graphs first, then the reference
    baseline, then every uncompiled variant of the first batch; every combination once."""
    vs = suite.matrix_variants(["eager", "triton"], (32, 64), cuda)
    first = ["model", "step"] + (["step+graphs"] if cuda else [])
    assert vs[:len(first)] == [suite.Variant("three-call", "bf16-secant", "eager", c, 32) for c in first]
    vs = vs[len(first):]
    assert vs[0] == suite.Variant("six-call", "fp32", "eager", "none", 32)
    assert {(v.compile, v.batch) for v in vs[1:1 + 8]} == {("none", 32)} and vs[1].precision == "bf16-secant"
    compiles = 4 + 2 * cuda  # none, blocks, model, step (+ model+graphs, step+graphs)
    assert len(first) + len(vs) == len(set(vs) | set(first)) == 2 * (1 + len(MODES) * 2 * compiles)


def test_time_limit_interrupts_and_disarms():
    with pytest.raises(TimeoutError), suite.time_limit(0.05):
        time.sleep(2)
    time.sleep(0.1)  # no alarm left behind
