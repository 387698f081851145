"""Test-wide settings and helpers.

Without CUDA the Triton kernels run under the Triton interpreter, and TRITON_INTERPRET=1 must be set before triton is
first imported: it is set here, before pytest imports any test module (a value exported by the caller wins)."""
import json
import os
import subprocess
import sys
from typing import Any, Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def torchrun(tmp_path) -> Callable[[str], Any]:
    """run(source): the script `source` on two CPU ranks (torchrun --standalone); it must exit 0, and its last stdout
    line, JSON, is returned."""
    def run(source: str) -> Any:
        script = tmp_path / "torchrun_script.py"
        script.write_text(source)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            str(script)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])
    return run
