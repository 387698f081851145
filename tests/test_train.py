"""The trainer: exact resume, a falling loss on the digits, non-finite handling, checkpoint errors, the CLI."""
import json
import subprocess
import sys

import pytest
import torch

from soflow_fast.checkpoint import latest_checkpoint, list_checkpoints, read_meta
from soflow_fast.config import ConfigError, TrainConfig
from soflow_fast.metrics import NonFiniteError
from soflow_fast.train import Trainer

SMALL = dict(model_type="DiT-S/2", hidden_size=32, depth=1, num_heads=2, dataset_type="digits", data_size=8,
             batch_size=32, total_steps=6, cfg_scale=2.0, cfg_drop_rate=0.2, mix_ratio=0.5, cfg_decay_time=0.8,
             learning_rate=1e-3, logging_steps=2, ckpt_saving_steps=3, eval_demo_steps=0, ema_decay_rate=0.9,
             quality_report=False, device="cpu", kernels="eager", seed=7)


def make(tmp_path, name="run", **kw):
    cfg = TrainConfig.from_dict({**SMALL, **kw})
    return Trainer(cfg, tmp_path / name)


def flat_state(tr):
    return [p.detach().clone() for p in tr.params] + [e.clone() for e in tr.ema.tensors]


@pytest.mark.parametrize("schedule", [{}, dict(lr_schedule="cosine", lr_warmup_steps=2, lr_end_ratio=0.1)])
def test_resume_continues_bit_for_bit(tmp_path, schedule):
    straight = make(tmp_path, "a", **schedule)
    straight.fit(progress=False)

    first = make(tmp_path, "b", **schedule)
    first.fit(max_steps=3, progress=False)  # stops at step 3, which is also a checkpoint step
    resumed = make(tmp_path, "b", **schedule)  # a fresh process would do the same: a new Trainer on the run directory
    assert resumed.step == 3
    resumed.fit(progress=False)
    assert resumed.step == 6
    for x, y in zip(flat_state(straight), flat_state(resumed)):
        assert torch.equal(x, y)
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"]) for k in opt_a)
    log_a = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    def by_step(log):
        return {r["step"]: r["loss"] for r in log}
    # windows (2, 6] cover the same steps in both runs; the interrupted run also logged at its stop (step 3)
    assert by_step(log_a)[2] == by_step(log_b)[2] and by_step(log_a)[6] == by_step(log_b)[6]


def test_digits_loss_falls(tmp_path):
    tr = make(tmp_path, total_steps=60, logging_steps=10, ckpt_saving_steps=60, hidden_size=64, depth=2,
              num_heads=4, batch_size=64, learning_rate=2e-3)
    tr.fit(progress=False)
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "loss_fm", "loss_c", "mse_fm", "weight_fm", "mse_c", "weight_c", "grad_norm", "images_per_s",
            "peak_mem_gb"} <= set(recs[0])
    assert recs[-1]["mse_fm"] < 0.8 * recs[0]["mse_fm"], [r["mse_fm"] for r in recs]


def test_nonfinite_loss_stops_or_skips(tmp_path, monkeypatch):
    import soflow_fast.train as T

    real = T.soflow_loss

    def poisoned(*a, **kw):
        out = real(*a, **kw)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(T, "soflow_loss", poisoned)  # before the build: a trainer picks its loss function then
    tr = make(tmp_path, "stop")
    before = flat_state(tr)
    with pytest.raises(NonFiniteError, match="step 1: non-finite loss"):
        tr.fit(progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, flat_state(tr)))  # weights untouched

    skip = make(tmp_path, "skip", on_nonfinite="skip")
    before = flat_state(skip)
    skip.fit(max_steps=2, progress=False)
    assert skip.skipped == 2 and skip.step == 2
    assert all(torch.equal(a, b) for a, b in zip(before, flat_state(skip)))


def test_checkpoints_are_atomic_pruned_and_validated(tmp_path):
    tr = make(tmp_path, total_steps=9, keep_checkpoints=2)
    tr.fit(progress=False)
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert names == ["step_00000006", "step_00000009"]
    assert not list((tmp_path / "run" / "ckpts").glob("*.tmp"))
    last = latest_checkpoint(tmp_path / "run")
    meta = read_meta(last)
    assert meta["step"] == 9 and meta["data"]["epoch"] >= 0 and meta["world_size"] == 1
    # an unfinished save (a .tmp directory) is ignored; the run resumes from the last complete checkpoint
    (tmp_path / "run" / "ckpts" / "step_00000012.tmp").mkdir()
    assert make(tmp_path, total_steps=9, keep_checkpoints=2).step == 9  # (total_steps is fixed for a run: resume.py)
    # a damaged shard file is a clear error naming the checkpoint, not a silent restart
    shard = next(last.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"step_00000009: file {shard.name} is damaged"):  # its CHECKSUMS.json
        make(tmp_path, total_steps=9, keep_checkpoints=2)
    (last / "CHECKSUMS.json").unlink()  # as written before checksums: the loader's own checks remain
    with pytest.raises(ValueError, match="step_00000009"):
        make(tmp_path, total_steps=9, keep_checkpoints=2)
    # a foreign meta file
    torch.save({"hello": torch.zeros(1)}, last / "meta.pt")
    with pytest.raises(ValueError, match="not a soflow_fast/1 file"):
        make(tmp_path, total_steps=9, keep_checkpoints=2)
    # a checkpoint of another architecture
    (last / "meta.pt").unlink()
    import shutil

    shutil.rmtree(last)
    with pytest.raises(ValueError, match="hidden_size"):
        make(tmp_path, total_steps=9, keep_checkpoints=2, hidden_size=48)


def test_lr_schedule_drives_the_optimizer(tmp_path):
    """The first warm-up step updates exactly as a constant run at learning_rate / lr_warmup_steps; later steps log
    the schedule's rate (cfg.lr_at: optim.lr_at, tested against its formula in test_optim.py)."""
    warm = make(tmp_path, "w", lr_schedule="linear", lr_warmup_steps=4, total_steps=8, logging_steps=2)
    warm.fit(max_steps=1, progress=False)
    plain = make(tmp_path, "p", learning_rate=SMALL["learning_rate"] / 4)
    plain.fit(max_steps=1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(flat_state(warm), flat_state(plain)))
    warm.fit(progress=False)
    logged = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "w" / "metrics.jsonl").read_text().splitlines())}
    assert [logged[s] for s in (2, 4, 6, 8)] == [warm.cfg.lr_at(s - 1) for s in (2, 4, 6, 8)]
    assert logged[2] < logged[4] > logged[6] > logged[8] > 0


def test_ema_warmup_decay():
    from soflow_fast.ema import ema_decay

    cfg = TrainConfig.from_dict({**SMALL, "ema_warmup": True, "ema_decay_rate": 0.999})
    assert ema_decay(cfg.ema_decay_rate, cfg.ema_warmup, 0) == pytest.approx(0.1)
    assert ema_decay(cfg.ema_decay_rate, cfg.ema_warmup, 10**6) == 0.999
    plain = TrainConfig.from_dict({**SMALL, "ema_decay_rate": 0.999})
    assert ema_decay(plain.ema_decay_rate, plain.ema_warmup, 0) == 0.999


@pytest.mark.parametrize("power, tv", [(0.0, 1e-12), (1.0, 5e-4), (3.0, 5e-4)])
def test_ema_power_averages_the_run(power, tv):
    """The power-function EMA (docs/algorithm.md section 9): after n updates, the weight each update's parameters hold
    in the EMA is (about) proportional to i^power: exactly the running mean for power 0 (fp64 rounding: 1e-12), within
    3e-4 in total variation at n = 1800 for powers 1 and 3 (the documented bound, with margin)."""
    from soflow_fast.ema import ema_decay

    n = 1800
    weights = torch.zeros(n, dtype=torch.float64)
    for k in range(n):  # the EMA of one-hot parameter vectors: e <- d e + (1 - d) onehot(k)
        d = ema_decay(1.0, False, k, power)
        weights *= d
        weights[k] += 1 - d
    profile = torch.arange(1, n + 1, dtype=torch.float64) ** power
    assert (weights - profile / profile.sum()).abs().sum() < tv
    assert ema_decay(0.999, False, n, power) <= 0.999  # capped at the rate


def test_ema_power_reaches_the_trainer(tmp_path):
    """ema_power replaces the warm-up: the first update copies the weights (decay 0), the warm-up's keeps 10% of the
    initialization."""
    power = make(tmp_path, "p", ema_power=2.0)
    power.fit(max_steps=1, progress=False)
    assert all(torch.equal(p.float(), e) for p, e in zip(power.params, power.ema.tensors))
    warm = make(tmp_path, "w", ema_warmup=True)
    warm.fit(max_steps=1, progress=False)
    assert not all(torch.equal(p.float(), e) for p, e in zip(warm.params, warm.ema.tensors))
    with pytest.raises(ConfigError, match="ema_power"):
        make(tmp_path, "both", ema_power=2.0, ema_warmup=True)


def test_cli_train_resume_and_sample(tmp_path):
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({**SMALL, "total_steps": 4, "ckpt_saving_steps": 2, "eval_demo_steps": 2,
                                   "eval_demo_shape": [2, 5]}))
    def run(*a):
        return subprocess.run([sys.executable, "-m", "soflow_fast", *a], capture_output=True, text=True)
    r = run("train", str(cfg), "--run-dir", str(tmp_path / "r"), "--max-steps", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run("train", str(cfg), "--run-dir", str(tmp_path / "r"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "step_00000002" in r.stderr
    assert (tmp_path / "r" / "samples" / "step_00000004.png").exists()
    r = run("sample", str(tmp_path / "r"), "--out", str(tmp_path / "s"), "--num-samples", "10", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    r = run("export", str(tmp_path / "r"), str(tmp_path / "e.pt"))
    assert r.returncode == 0, r.stderr
    r = run("sample", str(tmp_path / "e.pt"), "--out", str(tmp_path / "s2"), "--num-samples", "10", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    import numpy as np

    assert np.array_equal(np.load(tmp_path / "s" / "samples_1nfe.npz")["arr_0"],
                          np.load(tmp_path / "s2" / "samples_1nfe.npz")["arr_0"])
    r = run("train", str(cfg), "--set", "velocity_loss_ratio=2")
    assert r.returncode == 2 and "velocity_loss_ratio" in r.stderr
    for sub in ("train", "sample", "export", "import-checkpoint"):
        h = run(sub, "--help")
        assert h.returncode == 0 and "usage" in h.stdout


def test_activation_checkpointing_changes_nothing(tmp_path):
    plain = make(tmp_path, "plain", total_steps=2)
    plain.fit(progress=False)
    ac = make(tmp_path, "ac", total_steps=2, activation_checkpointing=True)
    ac.fit(progress=False)
    for a, b in zip(flat_state(plain), flat_state(ac)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)  # the same ops recomputed: equal up to fp32 ulps


def test_compiled_blocks_match_eager(tmp_path):
    """compile: blocks (torch.compile per DiT block, inductor on CPU) trains like eager; inductor fuses and reorders
    fp32 ops, so equal to 1e-6 after two steps (measured 3e-9), not bitwise."""
    plain = make(tmp_path, "plain", total_steps=2)
    plain.fit(progress=False)
    comp = make(tmp_path, "comp", total_steps=2, compile="blocks")
    comp.fit(progress=False)
    for a, b in zip(flat_state(plain), flat_state(comp)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode,graphs", [("model", 3), ("step", 1)])
def test_compiled_model_matches_eager(tmp_path, monkeypatch, caplog, mode, graphs):
    """compile: model (the whole network, one graph per call of the step: teacher, x_l and gradient calls) and
    compile: step (the whole loss, one graph) train like eager. Backend aot_eager (the captured graphs run by eager
    kernels): the same fp32 ops, so the weights after three steps are bitwise equal (measured). The first step's time,
    compiling included, is logged."""
    monkeypatch.setenv("SOFLOW_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    plain = make(tmp_path, "plain", total_steps=3)
    plain.fit(progress=False)
    comp = make(tmp_path, "comp", total_steps=3, compile=mode)
    with caplog.at_level("INFO", logger="soflow_fast"):
        comp.fit(progress=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # once for the run's steps
    assert any(r.getMessage().startswith("compiled in ") and f"compile {mode}" in r.getMessage()
               for r in caplog.records)
    for a, b in zip(flat_state(plain), flat_state(comp)):
        assert torch.equal(a, b)


def test_compile_refused_under_the_bf16_emulator(tmp_path):
    """A bf16 mode on a CPU runs the emulator, which torch.compile cannot trace: compile must resolve to none."""
    with pytest.raises(ConfigError, match="compile = 'model' with precision 'bf16' on a CPU"):
        make(tmp_path, compile="model", precision="bf16")
    assert make(tmp_path, compile="auto", precision="bf16").compile == "none"  # auto is none on a CPU


def test_attention_and_cuda_graphs_resolved_at_start(tmp_path, caplog):
    """The DiT's attention is resolved once (auto on a CPU: sdpa) and logged; flash-attn without the package (or a
    GPU) and cuda_graphs on a CPU are refused in one line naming the key."""
    tr = make(tmp_path, total_steps=1)
    assert tr.attention.name == "sdpa" and all(b.attn.attend is tr.attention.fn for b in tr.net.blocks)
    with caplog.at_level("INFO", logger="soflow_fast"):
        tr.fit(progress=False)
    assert "attention: sdpa (auto on cpu)" in [r.getMessage() for r in caplog.records]
    with pytest.raises(ConfigError, match=r"^config: attention: 'flash-attn': [^\n]*$"):
        make(tmp_path, "fa", attention="flash-attn")
    with pytest.raises(ConfigError, match=r"^config: cuda_graphs = true needs a CUDA device, not cpu; set it false$"):
        make(tmp_path, "graphs", cuda_graphs=True)
