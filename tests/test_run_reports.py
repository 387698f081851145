"""What a cluster user reads of a run: train.log, TensorBoard scalars, the tqdm bar, the profiler window, and the
safetensors export read back by `sample` (issue 16, "What cluster users expect")."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from soflow_fast.checkpoint import consolidate, model_from_checkpoint
from soflow_fast.cli import main
from soflow_fast.config import ConfigError, TrainConfig
from soflow_fast.errors import UserError
from soflow_fast.train import Trainer

SMALL = dict(model_type="DiT-S/2", hidden_size=32, depth=1, num_heads=2, dataset_type="digits", data_size=8,
             batch_size=16, total_steps=4, logging_steps=2, ckpt_saving_steps=2, eval_demo_steps=0,
             quality_report=False, device="cpu", kernels="eager", seed=3)
ROOT = Path(__file__).resolve().parent.parent


def config(tmp_path, **kw) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**SMALL, **kw}))
    return str(path)


def test_train_log_holds_the_console_and_is_appended_across_resumes(tmp_path, capsys):
    cfg, run = config(tmp_path), tmp_path / "run"
    assert main(["train", cfg, "--run-dir", str(run), "--max-steps", "2", "--no-progress"]) == 0
    assert main(["train", cfg, "--run-dir", str(run), "--no-progress"]) == 0
    text = (run / "train.log").read_text()
    assert "steps 0 -> 2" in text and "steps 2 -> 4" in text          # both runs, in order
    assert text.index("steps 0 -> 2") < text.index("resumed from") < text.index("steps 2 -> 4")
    assert "step 2  loss" in text and "step 4  loss" in text           # the metrics lines the console shows
    # a run that stops on an error says so in the log too
    assert main(["train", cfg, "--run-dir", str(run), "--set", "depth=2", "--no-progress"]) == 2
    last = (run / "train.log").read_text().splitlines()[-1]
    assert "stopped: UserError: config: depth = 2, but checkpoint" in last and "trained with 1" in last


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr = Trainer(TrainConfig.from_dict({**SMALL, "tensorboard": True}), tmp_path / "run")
    tr.fit(progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    for key in ("loss", "grad_norm", "images_per_s", "lr"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in records] == [2, 4]
        # TensorBoard stores float32: equal to the JSON value rounded to float32
        assert [e.value for e in events] == [float(np.float32(r[key])) for r in records]
    assert "peak_mem_gb_per_rank" not in acc.Tags()["scalars"]  # a list, not a scalar


def test_tensorboard_missing_is_one_line_naming_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    argv = ["train", config(tmp_path, tensorboard=True), "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorboard = true needs the tensorboard package" in err[0]


def test_progress_is_a_tqdm_bar_unless_no_progress(tmp_path, capsys):
    cfg = config(tmp_path, total_steps=2)
    assert main(["train", cfg, "--run-dir", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "100%|" in err and "| 2/2 [" in err and "step/s, loss=" in err  # tqdm's layout, with the logged loss
    assert main(["train", cfg, "--run-dir", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "2/2 [" not in capsys.readouterr().err


def test_log_lines_are_not_printed_into_the_bar(tmp_path):
    """With the bar up, a log line starts a line of its own (after the bar is cleared with a carriage return), in a
    log file as on a terminal: printed straight to the stream it would follow the bar's text on the bar's line."""
    out = subprocess.run([sys.executable, "-m", "soflow_fast", "train", config(tmp_path, total_steps=6),
                          "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    starts = [m.start() for m in re.finditer(r"\[\d\d:\d\d:\d\d\] step \d+ ", out.stderr)]
    assert len(starts) == 3 and "step/s" in out.stderr, out.stderr
    assert all(i == 0 or out.stderr[i - 1] in "\r\n" for i in starts), out.stderr


def _step_marks(trace: Path) -> list[int]:
    events = json.loads(trace.read_text())["traceEvents"]
    return sorted(int(e["name"].split()[1]) for e in events if e.get("name", "").startswith("step ")
                  and e["name"].split()[1].isdigit())


def test_profile_window_traces_exactly_its_steps(tmp_path):
    tr = Trainer(TrainConfig.from_dict({**SMALL, "total_steps": 5, "profile_steps": [2, 3]}), tmp_path / "run")
    tr.fit(progress=False)
    traces = list((tmp_path / "run" / "profile").iterdir())
    assert [t.name for t in traces] == ["trace_steps2-3_rank0.json"]
    assert _step_marks(traces[0]) == [2, 3]
    # a run that stops inside the window still writes what it profiled
    tr = Trainer(TrainConfig.from_dict({**SMALL, "total_steps": 5, "profile_steps": [2, 4]}), tmp_path / "cut")
    tr.fit(max_steps=3, progress=False)
    assert _step_marks(tmp_path / "cut" / "profile" / "trace_steps2-3_rank0.json") == [2, 3]


@pytest.mark.parametrize("kw,match", [
    ({"profile_steps": [3, 2]}, "profile_steps = \\[3, 2\\]: expected \\[\\] or \\[start, end\\]"),
    ({"profile_steps": [0, 2]}, "profile_steps = \\[0, 2\\]: expected \\[\\] or \\[start, end\\] with 1 <= start"),
    ({"memory_snapshot": True}, "memory_snapshot = True: the snapshot covers the profile_steps window"),
])
def test_profile_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict({**SMALL, **kw})


def test_memory_snapshot_refused_on_cpu_naming_the_key(tmp_path):
    cfg = TrainConfig.from_dict({**SMALL, "profile_steps": [1, 1], "memory_snapshot": True})
    with pytest.raises(UserError, match="memory_snapshot = true: the snapshot records CUDA allocations; this run "
                                          "is on cpu"):
        Trainer(cfg, tmp_path / "run")


def test_step_benchmark_profile_flags(tmp_path):
    def bench(*flags):
        script, cfg = ROOT / "benchmarks" / "step.py", ROOT / "configs" / "digits.yaml"
        return subprocess.run([sys.executable, str(script), str(cfg),
                               "--steps", "1", "--warmup", "0", "--batch-size", "8", "--set", "depth=1",
                               "--set", "hidden_size=32", "--set", "num_heads=2", "--profile-dir", str(tmp_path),
                               *flags], capture_output=True, text=True)
    r = bench("--profile-steps", "2", "3")
    assert r.returncode == 0, r.stderr
    assert _step_marks(tmp_path / "trace_steps2-3_rank0.json") == [2, 3]
    r = bench("--profile-steps", "1", "1", "--memory-snapshot")
    assert r.returncode == 2 and "--memory-snapshot: the snapshot records CUDA allocations" in r.stderr


def test_safetensors_export_round_trip(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", config(tmp_path, total_steps=2, ema_decay_rate=0.5), "--run-dir", str(run),
                 "--no-progress"]) == 0
    ck = consolidate(run)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    y = torch.tensor([1, 2, 3])

    def out(model):
        with torch.no_grad():
            return model(x, t, t * 0.5, y)

    for flags, weights in (([], "ema"), (["--raw-weights"], "model")):
        folder = tmp_path / f"export_{weights}"
        assert main(["export", str(run), str(folder), "--format", "safetensors", *flags]) == 0
        assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json"}
        back = consolidate(folder)
        assert torch.equal(out(model_from_checkpoint(back, weights)), out(model_from_checkpoint(ck, weights)))
    assert any(not torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["model"])  # two different exports
    # `sample` reads the folder: the same samples as from the run itself
    for src, dst in ((run, "s1"), (tmp_path / "export_ema", "s2")):
        assert main(["sample", str(src), "--out", str(tmp_path / dst), "--num-samples", "4", "--device", "cpu"]) == 0
    assert np.array_equal(np.load(tmp_path / "s1" / "samples_1nfe.npz")["arr_0"],
                          np.load(tmp_path / "s2" / "samples_1nfe.npz")["arr_0"])
    capsys.readouterr()
    # the folder holds one set of weights: asking for the other says so in one line
    assert main(["sample", str(tmp_path / "export_ema"), "--out", str(tmp_path / "s3"), "--raw-weights"]) == 2
    assert "holds no 'model' weights, only ['ema']" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "e.pt"), "--raw-weights"]) == 2
    assert "--raw-weights: a .pt export keeps both" in capsys.readouterr().err
