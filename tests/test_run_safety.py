"""Week-long runs lose no work and go silently wrong nowhere (issue 16): a signal saves and exits 143, a second trainer
on a run directory stops at once, paths are checked before the first step and checkpoints written before evaluation,
a resume applies or refuses config changes by key, metrics.jsonl holds each step once, a diverged run stops keeping
its last clean checkpoint, damaged checkpoints are named (or skipped on request), init_from and resume_from.

The signal and lock cases run the real CLI in subprocesses on the digits with a tiny DiT."""
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from soflow_fast.checkpoint import atomic_save, checkpoint_dir, consolidate, list_checkpoints, read_meta
from soflow_fast.cli import main
from soflow_fast.config import ConfigError
from soflow_fast.integrity import ChecksumError
from soflow_fast.signals import EXIT_STOPPED
from test_train import SMALL, flat_state, make

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LONG = {**SMALL, "total_steps": 100000, "logging_steps": 1, "ckpt_saving_steps": 100000}  # runs until stopped


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps_of(run_dir):
    return [int(p.name.removeprefix("step_")) for p in list_checkpoints(run_dir)]


def write_config(tmp_path, **kw):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**LONG, **kw}))
    return path


def start_train(config, run_dir, *extra):
    return subprocess.Popen([sys.executable, "-m", "soflow_fast", "train", str(config), "--run-dir", str(run_dir),
                             "--no-progress", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)


def wait_for_records(proc, run_dir, count=2, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("the trainer logged no steps")


def test_sigterm_saves_the_step_exits_143_and_the_run_resumes(tmp_path):
    config, run = write_config(tmp_path), tmp_path / "run"
    proc = start_train(config, run)
    wait_for_records(proc, run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_STOPPED, err
    stopped = records(run)[-1]["step"]  # the stop step is logged too
    assert steps_of(run) == [stopped] and stopped >= 2
    assert "stopped on request (SIGTERM)" in err
    r = subprocess.run([sys.executable, "-m", "soflow_fast", "train", str(config), "--run-dir", str(run),
                        "--no-progress", "--max-steps", str(stopped + 2)], capture_output=True, text=True, env=ENV,
                       timeout=240)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {checkpoint_dir(run, stopped)} at step {stopped}" in r.stderr
    assert [rec["step"] for rec in records(run)] == list(range(1, stopped + 3))  # each step once


def test_second_trainer_on_a_run_directory_exits_naming_the_holder(tmp_path):
    config, run = write_config(tmp_path), tmp_path / "run"
    first = start_train(config, run)
    try:
        wait_for_records(first, run)
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "soflow_fast", "train", str(config), "--run-dir", str(run),
                                 "--no-progress"], capture_output=True, text=True, env=ENV, timeout=240)
        assert time.monotonic() - t0 < 120  # no waiting for the holder (about the time to import torch)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("soflow-fast train: error: run directory"), second.stderr
        assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0]
        assert first.poll() is None  # the holder trains on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=240)
    assert first.returncode == EXIT_STOPPED
    assert not (run / "run.lock").exists()  # released


def test_sigusr1_in_process_saves_and_fit_reports_the_stop(tmp_path, monkeypatch):
    tr = make(tmp_path, total_steps=50, ckpt_saving_steps=50, logging_steps=10)
    real = tr.train_step

    def step_then_signal(*a):
        out = real(*a)
        if tr.step == 4:
            signal.raise_signal(signal.SIGUSR1)
        return out

    monkeypatch.setattr(tr, "train_step", step_then_signal)
    assert tr.fit(progress=False) is True
    assert tr.step == 4 and steps_of(tmp_path / "run") == [4]
    assert [r["step"] for r in records(tmp_path / "run")] == [4]  # the window up to the stop is logged
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # restored after fit


def test_save_every_minutes_saves_on_time(tmp_path):
    tr = make(tmp_path, total_steps=4, ckpt_saving_steps=100, keep_checkpoints=0, save_every_minutes=1e-9)
    assert tr.fit(progress=False) is False
    assert steps_of(tmp_path / "run") == [1, 2, 3, 4]


@pytest.mark.parametrize("key,kind", [("eval_fid_reference", "no such file"), ("eval_inception", "no such file"),
                                      ("eval_vae", "a folder without config.json")])
def test_paths_needed_later_fail_before_the_first_step(tmp_path, capsys, key, kind):
    (tmp_path / "ref.npz").write_bytes(b"")
    (tmp_path / "inception.pth").write_bytes(b"")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    paths = {"eval_fid_reference": str(tmp_path / "ref.npz"), "eval_inception": str(tmp_path / "inception.pth"),
             "eval_vae": str(tmp_path / "vae")}
    paths[key] = str(tmp_path / ("missing" if kind == "no such file" else ""))  # a typo, or the wrong folder
    config = write_config(tmp_path, total_steps=4, eval_steps=2, **paths)
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"soflow-fast train: error: config: {key} = {paths[key]!r}: {kind}"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and steps_of(tmp_path / "run") == []


def test_checkpoint_is_written_before_the_steps_evaluation(tmp_path, monkeypatch):
    tr = make(tmp_path, total_steps=6, ckpt_saving_steps=3)

    def failing_evaluation(step):
        if step == 3:
            raise RuntimeError("evaluation failed")

    monkeypatch.setattr(tr.evaluator, "after_step", failing_evaluation)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        tr.fit(progress=False)
    assert steps_of(tmp_path / "run") == [3]


def test_resume_applies_changeable_keys_and_logs_them(tmp_path, caplog):
    make(tmp_path, total_steps=6).fit(max_steps=3, progress=False)
    with caplog.at_level(logging.INFO, logger="soflow_fast"):
        tr = make(tmp_path, total_steps=6, learning_rate=2e-3, betas=[0.8, 0.95], weight_decay=0.01, logging_steps=1)
    group = tr.optimizer.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (2e-3, (0.8, 0.95), 0.01)
    messages = [r.getMessage() for r in caplog.records]
    assert "resume: learning_rate 0.001 -> 0.002" in messages
    assert "resume: betas [0.9, 0.99] -> [0.8, 0.95]" in messages
    tr.fit(progress=False)
    assert [r["lr"] for r in records(tmp_path / "run") if r["step"] > 3] == [2e-3] * 3
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["learning_rate"] == 2e-3
    assert read_meta(checkpoint_dir(tmp_path / "run", 6))["config"]["learning_rate"] == 2e-3


@pytest.mark.parametrize("key,value", [("seed", 8), ("batch_size", 16), ("total_steps", 12), ("cfg_scale", 1.5),
                                       ("noising_type", "Trig")])
def test_resume_refuses_keys_that_define_the_run(tmp_path, key, value):
    make(tmp_path).fit(max_steps=3, progress=False)
    with pytest.raises(ConfigError, match=rf"^config: {key} = {value!r}, but checkpoint .*step_00000003 was trained "
                                          rf"with {SMALL.get(key, 'Linear')!r}; a resume cannot change it"):
        make(tmp_path, **{key: value})


def test_metrics_hold_each_step_once_across_resumes(tmp_path):
    first = make(tmp_path, logging_steps=1, ckpt_saving_steps=2)
    first.fit(max_steps=3, progress=False)
    shutil.rmtree(checkpoint_dir(tmp_path / "run", 3))  # as if killed before step 3's checkpoint completed
    with open(tmp_path / "run" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "lo')  # and a line cut short by the kill
    resumed = make(tmp_path, logging_steps=1, ckpt_saving_steps=2)
    assert resumed.step == 2
    resumed.fit(progress=False)
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


def test_tensorboard_holds_each_step_once_across_resumes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make(tmp_path, logging_steps=1, ckpt_saving_steps=2, tensorboard=True).fit(max_steps=3, progress=False)
    shutil.rmtree(checkpoint_dir(tmp_path / "run", 3))  # killed before step 3's checkpoint completed
    make(tmp_path, logging_steps=1, ckpt_saving_steps=2, tensorboard=True).fit(progress=False)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6]


def test_diverged_run_stops_with_exit_1_keeping_the_last_clean_checkpoint(tmp_path, monkeypatch, capsys):
    import soflow_fast.train as T

    real = T.soflow_loss

    def diverges_after_three(*a, **kw):
        out = real(*a, **kw)
        if a[6] >= 3:  # the step argument: steps 4, 5, ... are non-finite
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(T, "soflow_loss", diverges_after_three)
    config = write_config(tmp_path, total_steps=30, logging_steps=3, ckpt_saving_steps=3, keep_checkpoints=1,
                          on_nonfinite="skip", max_consecutive_skips=7)
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soflow-fast train: error: diverged: 9 consecutive steps were "
                                                   "non-finite up to step 12 (max_consecutive_skips = 7"), lines
    assert steps_of(tmp_path / "run") == [3, 9]  # step 3: the newest without skipped steps, spared by pruning
    assert [read_meta(checkpoint_dir(tmp_path / "run", s))["clean"] for s in (3, 9)] == [True, False]


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_checkpoint_is_named_or_skipped_with_resume_fallback(tmp_path, caplog):
    run = tmp_path / "run"
    make(tmp_path, total_steps=6, keep_checkpoints=0).fit(max_steps=6, progress=False)
    shard = next(checkpoint_dir(run, 6).glob("*.distcp"))
    flip_a_byte(shard)
    with pytest.raises(ChecksumError, match=f"step_00000006: file {shard.name} is damaged"):
        make(tmp_path, total_steps=6, keep_checkpoints=0)
    with pytest.raises(ChecksumError, match=f"file {shard.name} is damaged"):
        consolidate(run)  # export and sample verify too
    with caplog.at_level(logging.WARNING, logger="soflow_fast"):
        tr = make(tmp_path, total_steps=6, keep_checkpoints=0, resume_fallback=True)
    assert tr.step == 3
    assert f"step_00000006: file {shard.name} is damaged" in caplog.text
    assert steps_of(run) == [3] and list((run / "ckpts" / "abandoned").glob("*/step_00000006"))
    tr.fit(progress=False)  # and the run saves its own step 6
    assert steps_of(run) == [3, 6]


def test_init_from_starts_a_new_run_from_given_weights(tmp_path):
    source = make(tmp_path, "source", total_steps=3)
    source.fit(progress=False)
    exported = tmp_path / "source.pt"
    atomic_save(consolidate(tmp_path / "source"), exported)
    for name, init in (("from_pt", exported), ("from_dir", checkpoint_dir(tmp_path / "source", 3))):
        tr = make(tmp_path, name, init_from=str(init))
        assert tr.step == 0 and tr.optimizer.state_dict()["state"] == {}
        for p, e, s in zip(tr.params, tr.ema.tensors, source.params):
            assert torch.equal(p.detach(), s.detach()) and torch.equal(e, s.detach())
    tr.fit(max_steps=2, progress=False)
    assert make(tmp_path, "from_dir", init_from=str(init)).step == 2  # a requeue resumes its own checkpoint
    with pytest.raises(ConfigError, match="init_from = ''.*init_from only starts a new run"):
        make(tmp_path, "from_dir")
    with pytest.raises(ConfigError, match=r"^config: init_from = .*source.pt': its model has hidden_size = 32"):
        make(tmp_path, "other", init_from=str(exported), hidden_size=48)
    with pytest.raises(ConfigError, match=r"^config: init_from = .*missing.pt': checkpoint .*missing.pt: no such"):
        make(tmp_path, "none", init_from=str(tmp_path / "missing.pt"))


def test_resume_from_a_chosen_step_continues_exactly_and_a_requeue_keeps_its_progress(tmp_path):
    straight = make(tmp_path, "straight", keep_checkpoints=0, ckpt_saving_steps=2)
    straight.fit(progress=False)
    make(tmp_path, keep_checkpoints=0, ckpt_saving_steps=2).fit(progress=False)
    back = make(tmp_path, keep_checkpoints=0, ckpt_saving_steps=2, resume_from=2)
    assert back.step == 2 and steps_of(tmp_path / "run") == [2]
    back.fit(max_steps=4, progress=False)
    again = make(tmp_path, keep_checkpoints=0, ckpt_saving_steps=2, resume_from=2)  # the same command, requeued
    assert again.step == 4
    again.fit(progress=False)
    for x, y in zip(flat_state(straight), flat_state(again)):
        assert torch.equal(x, y)
    with pytest.raises(ConfigError, match=r"resume_from = 5: .*step_00000005 is not a checkpoint \(this run's "
                                          r"checkpoints: steps 2, 4, 6\)"):
        make(tmp_path, "run", keep_checkpoints=0, ckpt_saving_steps=2, resume_from=5)
