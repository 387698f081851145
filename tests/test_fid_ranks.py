"""The periodic FID spread over ranks (evaluation/periodic.py -> fid.evaluate_model_fid): each rank samples its
chunks, rank 0 gathers the features in chunk order, so the record (FID, sFID, IS, precision, recall) is the same on
one rank and on two (torchrun, gloo), bit for bit: every chunk's noise, network calls and features are computed alike
wherever it runs, and the scores are computed once, on rank 0, from the same features in the same order."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

from test_evaluate import SIZE, WIDTH_DIVISOR, _images, _random_inception

SCRIPT = """
import json, sys
import numpy as np
import torch
from pathlib import Path
from soflow_fast.config import TrainConfig
from soflow_fast.evaluation.periodic import Evaluator
from soflow_fast.metrics import MetricsLogger
from soflow_fast.models import build_model
from soflow_fast.parallel import init_distributed
from soflow_fast.precision import resolve_precision

torch.set_num_threads(1)
run = Path(sys.argv[1])
run.mkdir(exist_ok=True)
dist = init_distributed("cpu")
cfg = TrainConfig.from_dict(dict(model_type="DiT-S/2", hidden_size=32, depth=1, num_heads=2, dataset_type="digits",
                                 data_size=8, num_classes=0, eval_steps=1, eval_num_samples=23, eval_batch_size=5,
                                 eval_fid_reference=sys.argv[2], eval_inception=sys.argv[3], device="cpu"))
torch.manual_seed(0)
net = build_model("DiT-S/2", input_size=8, in_channels=1, num_classes=0, hidden_size=32, depth=1, num_heads=2)
with torch.no_grad():
    for p in net.parameters():
        p.normal_(0, 0.3)  # away from the zero-initialised output layer: samples that depend on the weights
import soflow_fast.evaluation.inception as inception
inception.INPUT_SIZE = int(sys.argv[4])
import soflow_fast.evaluation.periodic as periodic
calls = []
real = periodic.sample_images
periodic.sample_images = lambda model, flow, k, **kw: calls.append(k) or real(model, flow, k, **kw)
metrics = MetricsLogger(run, dist, 1, None, None)
ev = Evaluator(cfg, run, dist, cfg.flow, resolve_precision("fp32", dist.device), lambda: net.eval(), metrics)
rec = ev.evaluate_fid(7)
print(json.dumps({"rank": dist.rank, "calls": calls, "record": rec}), flush=True)
"""


def test_periodic_fid_is_the_same_on_one_and_two_ranks(tmp_path):
    torch.set_num_threads(1)
    net = _random_inception(WIDTH_DIVISOR, SIZE)
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    ref = tmp_path / "ref.npz"
    gray = _images(5, 40).mean(-1, keepdims=True).astype(np.uint8)  # the samples are one-channel digits-like
    np.savez(ref, arr_0=np.repeat(gray, 3, -1))  # reference images: statistics and pool features computed
    script = tmp_path / "fid_ranks.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    records = {}
    for world in (1, 2):
        launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        f"--nproc-per-node={world}"]
        r = subprocess.run([*launcher, str(script), str(tmp_path / f"run{world}"), str(ref), str(weights), str(SIZE)],
                           capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr
        records[world] = {o["rank"]: o for o in map(json.loads, r.stdout.strip().splitlines())}
    # 23 samples in chunks of 5: one rank samples all five chunks; of two, rank 0 takes 0, 2, 4 and rank 1 takes 1, 3
    assert records[1][0]["calls"] == [5, 5, 5, 5, 3]
    assert records[2][0]["calls"] == [5, 5, 3] and records[2][1]["calls"] == [5, 5]
    assert records[2][1]["record"] is None  # rank 0 scores and writes
    one, two = records[1][0]["record"], records[2][0]["record"]
    assert {"fid", "inception_score", "precision", "recall", "fid_num_samples"} <= set(one)
    assert one["fid_num_samples"] == 23 and one == two
    assert [json.loads(line) for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()] == [two]
