"""Graceful stop, with real processes and signals: a loop that receives SIGTERM / SIGINT / SIGUSR1 finishes its step,
saves at the boundary and exits with EXIT_STOPPED; a second Ctrl-C aborts; under torchrun (gloo) a signal to one rank
makes both save the same step and stop."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from soflow_fast.signals import EXIT_STOPPED, Boundary, GracefulStop, SaveTimer

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# argv: out folder, check_every, seconds per step. Each step logs its begin and end; a save writes saved<rank>_<step>.
LOOP = """
import os, sys, time
from pathlib import Path
from soflow_fast.signals import EXIT_STOPPED, GracefulStop
out, every, step_s = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rank = int(os.environ.get("RANK", 0))
if "WORLD_SIZE" in os.environ:
    import torch.distributed as dist
    dist.init_process_group("gloo")
code = 0
with GracefulStop(check_every=every) as stop, open(out / f"log{rank}", "a", buffering=1) as log:
    (out / f"pid{rank}").write_text(str(os.getpid()))
    for step in range(1, 2000):
        log.write(f"begin {step}\\n")
        time.sleep(step_s)
        log.write(f"end {step}\\n")
        at = stop.at_step(step)
        if at.save:
            (out / f"saved{rank}_{step}").write_text(stop.received or "")
        if at.stop:
            code = EXIT_STOPPED
            break
os._exit(code)  # as the trainer would return it (skipping torch.distributed's teardown, as soflow_fast does)
"""


def start(tmp_path, every=1, step_s=0.02, ranks=1):
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    cmd = [sys.executable, str(script), str(tmp_path), str(every), str(step_s)]
    if ranks > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def wait_for_steps(tmp_path, rank=0, steps=3, timeout=120):
    """The pid of `rank` once it has finished `steps` steps."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = tmp_path / f"log{rank}"
        if log.exists() and log.read_text().count("end ") >= steps:
            return int((tmp_path / f"pid{rank}").read_text())
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} did not finish {steps} steps")


def saves(tmp_path, rank=0):
    return sorted(int(p.name.split("_")[1]) for p in tmp_path.glob(f"saved{rank}_*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_saves_at_the_next_boundary_and_exits_with_the_code(tmp_path, sig):
    proc = start(tmp_path)
    pid = wait_for_steps(tmp_path)
    signalled_after = (tmp_path / "log0").read_text().count("end ")
    os.kill(pid, sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, out
    lines = (tmp_path / "log0").read_text().split()
    last = int(lines[-1])
    assert lines[-2:] == ["end", str(last)]  # the step in flight finished: no cut-off step
    assert saves(tmp_path) == [last] and last >= signalled_after
    assert (tmp_path / f"saved0_{last}").read_text() == sig.name


def test_ctrl_c_twice_aborts_without_saving(tmp_path):
    proc = start(tmp_path, step_s=30.0)  # a step longer than the test: the first Ctrl-C cannot reach a boundary
    pid = wait_for_steps(tmp_path, steps=0)
    time.sleep(0.5)
    os.kill(pid, signal.SIGINT)
    time.sleep(1.5)
    os.kill(pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT and "KeyboardInterrupt" in out
    assert saves(tmp_path) == []


def test_one_ctrl_c_delivered_twice_still_saves(tmp_path):
    """torchrun forwards the SIGINT a terminal already sent its workers: the copy must not abort the save."""
    proc = start(tmp_path, step_s=2.0)
    pid = wait_for_steps(tmp_path, steps=0)
    time.sleep(0.3)
    os.kill(pid, signal.SIGINT)
    time.sleep(0.3)  # apart enough to reach the handler twice (signals sent together merge into one)
    os.kill(pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_STOPPED, out
    assert saves(tmp_path) == [1]


def test_torchrun_one_rank_signalled_both_save_the_same_step(tmp_path):
    proc = start(tmp_path, every=3, ranks=2)
    pid = wait_for_steps(tmp_path, rank=1, steps=4)
    os.kill(pid, signal.SIGTERM)  # rank 1 only, not the agent
    out, _ = proc.communicate(timeout=300)
    s0, s1 = saves(tmp_path, 0), saves(tmp_path, 1)
    assert len(s0) == 1 and s0 == s1 and s0[0] % 3 == 0, out
    assert (tmp_path / f"saved1_{s1[0]}").read_text() == "SIGTERM"
    assert (tmp_path / f"saved0_{s0[0]}").read_text() == ""  # rank 0 stopped on rank 1's signal
    for rank in (0, 1):  # and neither ran a step past the saved one
        assert (tmp_path / f"log{rank}").read_text().split()[-2:] == ["end", str(s0[0])]
    codes = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank.*\n.*exitcode\s*:\s*(-?\d+)", out))  # torchrun's table
    assert codes == {"0": str(EXIT_STOPPED), "1": str(EXIT_STOPPED)}, out


def test_handlers_are_restored_and_the_flag_set():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with GracefulStop() as stop:
            assert stop.at_step(1) == Boundary(save=False, stop=False)
            signal.raise_signal(signal.SIGUSR1)
            assert stop.received == "SIGUSR1"
            assert stop.at_step(2) == Boundary(save=True, stop=True)
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_save_timer():
    now = [100.0]
    timer = SaveTimer(2, clock=lambda: now[0])
    now[0] += 119.0
    assert not timer.due()
    now[0] += 1.0
    assert timer.due()
    timer.restart()
    assert not timer.due()
    assert not SaveTimer(0, clock=lambda: now[0] + 1e9).due()  # 0 minutes: off


def test_timed_save_is_a_save_without_stop(monkeypatch):
    stop = GracefulStop(save_minutes=1)
    monkeypatch.setattr(stop.timer, "due", lambda: True)
    assert stop.at_step(1) == Boundary(save=True, stop=False)
