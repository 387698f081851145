"""The run-directory lock, with real processes: a live holder refuses a second trainer (naming host and pid), a
holder killed with SIGKILL is detected and taken over, a lock from another host is refused with how to remove it,
and under torchrun every rank stops when rank 0 cannot lock."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from soflow_fast import runlock
from soflow_fast.runlock import LOCK_NAME, RunLock, RunLockError

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HOLD = """
import sys, time
from soflow_fast.runlock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""
TRY = """
import logging, os, sys
from soflow_fast.runlock import RunLock, RunLockError
logging.basicConfig(level=logging.INFO, format="%(message)s")
if "WORLD_SIZE" in os.environ:
    import torch.distributed as dist
    dist.init_process_group("gloo")
is_main = int(os.environ.get("RANK", 0)) == 0
try:
    with RunLock(sys.argv[1], is_main=is_main):
        print("acquired", flush=True)
except RunLockError as e:
    print(f"rank {os.environ.get('RANK', 0)}: {e}", file=sys.stderr)
    sys.exit(2)
"""


def hold(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def attempt(run_dir, env=None):
    return subprocess.run([sys.executable, "-c", TRY, str(run_dir)], capture_output=True, text=True, timeout=120,
                          env={**ENV, **(env or {})})


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_trainer_exits_naming_the_holder(tmp_path):
    holder = hold(tmp_path / "run")
    try:
        t0 = time.monotonic()
        r = attempt(tmp_path / "run")
        assert time.monotonic() - t0 < 60  # at once: no waiting for the holder
        assert r.returncode == 2 and "acquired" not in r.stdout
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert f"pid {holder.pid} on host {socket.gethostname()}" in lines[0]
    finally:
        holder.kill()
        holder.wait()


def test_killed_holder_is_detected_and_taken_over(tmp_path):
    holder = hold(tmp_path / "run")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / LOCK_NAME).exists()  # the dead holder left its file
    r = attempt(tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "acquired" in r.stdout
    assert f"taking over the lock of pid {holder.pid}" in r.stderr
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released on exit


def test_released_lock_is_taken_without_warning(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    r = attempt(tmp_path / "run")
    assert r.returncode == 0 and "taking over" not in r.stderr


def write_record(run_dir, **record):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps({"started": "earlier", **record}))


def test_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    write_record(tmp_path / "run", host="node-elsewhere", pid=4242)
    r = attempt(tmp_path / "run")
    assert r.returncode == 2
    assert "pid 4242 on host node-elsewhere" in r.stderr
    assert f"remove {tmp_path / 'run' / LOCK_NAME}" in r.stderr


def test_lock_of_an_earlier_run_of_the_same_slurm_job_is_taken_over(tmp_path):
    write_record(tmp_path / "run", host="node-elsewhere", pid=4242, slurm_job="77", slurm_restart=0)
    r = attempt(tmp_path / "run", {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"})
    assert r.returncode == 0, r.stderr
    assert "earlier run (restart 0) of this SLURM job" in r.stderr
    write_record(tmp_path / "run2", host="node-elsewhere", pid=4242, slurm_job="77", slurm_restart=0)
    other = attempt(tmp_path / "run2", {"SLURM_JOB_ID": "78", "SLURM_RESTART_COUNT": "1"})  # another job
    assert other.returncode == 2


@pytest.mark.parametrize("alive", [True, False])
def test_without_flock_a_running_pid_on_this_host_holds(tmp_path, monkeypatch, alive):
    """Where the filesystem has no flock, the holder's pid decides (on this host)."""
    monkeypatch.setattr(runlock, "_flock", lambda fd: None)
    write_record(tmp_path / "run", host=socket.gethostname(), pid=os.getppid() if alive else dead_pid())
    if alive:
        with pytest.raises(RunLockError, match=f"pid {os.getppid()} on host"):
            RunLock(tmp_path / "run").__enter__()
    else:
        with RunLock(tmp_path / "run"):
            pass


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(RunLockError, match="exists and is not a directory"):
        RunLock(tmp_path / "run").__enter__()


def test_torchrun_every_rank_stops_when_rank0_cannot_lock(tmp_path):
    holder = hold(tmp_path / "run")
    script = tmp_path / "try.py"
    script.write_text(TRY)
    try:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            str(script), str(tmp_path / "run")], capture_output=True, text=True, timeout=300, env=ENV)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode != 0 and "acquired" not in r.stdout
    assert f"rank 0: run directory {tmp_path / 'run'} is in use by pid {holder.pid}" in r.stderr
    assert "rank 1: run directory" in r.stderr and "rank 0 could not lock it" in r.stderr
