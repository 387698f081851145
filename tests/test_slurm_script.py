"""docs/slurm/train.sbatch: valid bash, calls the CLI and torchrun with flags they have, and on SIGTERM forwards it
and requeues; run with stand-ins for srun and scontrol that record their calls."""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "slurm" / "train.sbatch"
# srun stand-in: records its arguments, then "trains" until SIGTERM (recorded, then a second of "saving", then exit 1
# as torchrun does when signalled) or exits at once with $FAKE_RC.
SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$CALLS/srun_args"
[[ -n "${FAKE_RC:-}" ]] && exit "$FAKE_RC"
trap 'echo TERM >> "$CALLS/log"; kill $child; sleep 1; echo saved >> "$CALLS/log"; exit 1' TERM
sleep 60 & child=$!
echo started >> "$CALLS/log"
wait $child
"""
SCONTROL = """#!/bin/bash
if [[ $1 == show ]]; then printf 'node-a\\nnode-b\\n'; else echo "$*" >> "$CALLS/log"; fi
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "SLURM_JOB_ID": "1234",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2", "SLURM_RESTART_COUNT": "0"}
    return env, calls


def submit(env, *args, rc=None):
    env = {**env, **({"FAKE_RC": str(rc)} if rc is not None else {})}
    return subprocess.Popen(["bash", str(SCRIPT), "cfg.yaml", "/runs/r", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def log_of(calls):
    path = calls / "log"
    return path.read_text().split("\n") if path.exists() else []


def test_bash_syntax_and_sbatch_header():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert "#SBATCH --signal=B:TERM@120" in text and "#SBATCH --requeue" in text
    shutdown = int(re.search(r"SHUTDOWN_TIMEOUT:-(\d+)", text).group(1))
    assert shutdown < 120  # torchrun must not kill the saving workers before SLURM's warning time runs out


def test_calls_torchrun_and_the_cli_with_flags_they_have(fake_slurm):
    env, calls = fake_slurm
    proc = submit(env, "--set", "total_steps=10", rc=0)
    assert proc.wait(timeout=60) == 0
    args = (calls / "srun_args").read_text().splitlines()
    assert args[:3] == ["--kill-on-bad-exit=1", "python", "-m"] and args[3] == "torch.distributed.run"
    split = args.index("-m", 4)
    torchrun, cli = args[4:split], args[split + 1:]
    assert cli == ["soflow_fast", "train", "cfg.yaml", "--run-dir", "/runs/r", "--no-progress", "--set",
                   "total_steps=10"]
    assert "--rdzv-endpoint=node-a:29500" in torchrun and "--local-ranks-filter=0" in torchrun
    from torch.distributed.run import get_args_parser

    known = {s for a in get_args_parser()._actions for s in a.option_strings}
    assert {a.split("=")[0] for a in torchrun} <= known
    from soflow_fast.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert {"--run-dir", "--no-progress", "--set"} <= {s for a in train._actions for s in a.option_strings}


def test_sigterm_is_forwarded_and_the_job_requeued(fake_slurm):
    env, calls = fake_slurm
    proc = submit(env)
    deadline = time.time() + 60
    while "started" not in log_of(calls):
        assert time.time() < deadline, "the srun stand-in did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert log_of(calls)[1:4] == ["TERM", "saved", "requeue 1234"]  # requeued only once the save is over
    assert "requeueing job 1234" in out


@pytest.mark.parametrize("rc", [0, 1, 2])
def test_finished_or_failed_runs_are_not_requeued(fake_slurm, rc):
    env, calls = fake_slurm
    proc = submit(env, rc=rc)
    assert proc.wait(timeout=60) == rc
    assert not any(line.startswith("requeue") for line in log_of(calls))


def test_usage_without_arguments():
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 2 and "usage: sbatch train.sbatch CONFIG RUN_DIR" in r.stderr
