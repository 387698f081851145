"""The kernel benchmark's CPU mode runs: parity under the Triton interpreter and the host-path table. A benchmark
that no longer runs would otherwise be found only on a day with a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import kernels as bench


pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode; on a GPU run the benchmark itself")


def test_kernel_benchmark_cpu_mode(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert bench.main(["--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    names = bench.ADALN + bench.LINEAR + bench.LOSSES
    assert sorted((r["kernel"], r["dtype"]) for r in rows["parity"]) == sorted(
        (k, d) for k in names for d in ("float32", "bfloat16"))
    assert [r["kernel"] for r in rows["host_path"]] == names
    for r in rows["host_path"]:
        assert set(r) == {"kernel"} | {f"{i} {m} us" for i in ("eager", "triton") for m in ("fwd", "fwd+bwd")}
        assert all(v > 0 for k, v in r.items() if k != "kernel")
    printed = capsys.readouterr().out
    assert "kernel timings need a GPU" in printed and "| layernorm_modulate | 0" not in printed  # no fake timing
    # The no-op launches are gone afterwards: the real kernels are back.
    for module, name in bench.KERNEL_OBJECTS:
        assert not isinstance(getattr(module, name), bench._NoLaunch), name


def test_kernel_occupancy_compiles_every_launch(tmp_path):
    """benchmarks/kernel_occupancy.py compiles each op's real launches for sm_90 (no GPU) and reads the resources
    back: every op yields its kernels, with registers and a resident-program count that fit the SM limits."""
    out = tmp_path / "occ.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_occupancy.py"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run([sys.executable, str(script), "--widths", "72", "1152", "--json", str(out)], check=True, env=env,
                   capture_output=True, text=True)
    rows = json.loads(out.read_text())
    kernels = {(r["op"], r["kernel"], r["D"], r["dtype"]) for r in rows}
    for dtype in ("bfloat16", "float32"):
        for D in (72, 1152):
            for op in bench.ADALN:
                assert {(op, "adaln_fwd_kernel", D, dtype), (op, "adaln_bwd_kernel", D, dtype)} <= kernels
        assert ("fm_loss", "fm_kernel", 4096, dtype) in kernels
        assert ("consistency_loss", "consistency_kernel", 4096, dtype) in kernels
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["programs_per_sm"] >= 1 and r["warps_per_sm"] <= 64
        assert r["warps_per_sm"] == r["programs_per_sm"] * r["warps"]
        assert -(-r["registers"] * 32 // 256) * 256 * r["warps_per_sm"] <= 65536  # per-warp allocation in 256s
        assert 0 < r["real_fraction"] <= 1


def test_step_host_path_mode():
    """benchmarks/step.py --host-path times eager and Triton steps with the launches recorded, on CPU; a U-Net
    config (no adaLN ops) is refused by name."""
    root = Path(__file__).resolve().parent.parent
    run = lambda cfg: subprocess.run([sys.executable, str(root / "benchmarks" / "step.py"), str(root / "configs" / cfg),  # noqa: E731
                                      "--host-path", "--steps", "2"], capture_output=True, text=True)
    out = run("digits.yaml")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| eager |") or line.startswith("| triton |")]
    assert len(rows) == 2 and all(float(r.split("|")[2]) > 0 for r in rows)
    bad = run("cifar10.yaml")
    assert bad.returncode != 0 and "model_type UNet" in bad.stderr


def test_step_host_path_compiled_row():
    """--compiled adds the network compiled whole and the whole step compiled beside eager (backend aot_eager and
    depth 1 here: seconds to compile; the figures that matter come from inductor at XL/2's depth, README
    "Measured")."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "step.py"), str(root / "configs" / "digits.yaml"),
                          "--host-path", "--steps", "1", "--compiled", "--set", "depth=1"], capture_output=True,
                         text=True, env={**os.environ, "SOFLOW_COMPILE_BACKEND": "aot_eager"})
    assert out.returncode == 0, out.stderr
    for impl in ("compiled", "compiled step"):
        rows = [line for line in out.stdout.splitlines() if line.startswith(f"| {impl} |")]
        assert len(rows) == 1 and float(rows[0].split("|")[2]) > 0
        assert f"host time eager / {impl}: " in out.stdout
    assert "compiled: aot_eager on CPU" in out.stdout
