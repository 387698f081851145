"""The digits main job's quality report: 1-NFE and 2-NFE samples for every class, judged by a classifier trained on
real digits, with a 50-step Euler solve of the model's own velocity and the real-vs-real distance for scale."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..data.digits import NUM_CLASSES, load_digits_split
from ..fileio import atomic_open
from ..flow import Flow
from ..sampling import sample_images
from .digits_judge import DigitsJudge, class_balanced, format_report, quality_report

log = logging.getLogger("soflow_fast")
# Every class of the training split has >= 139 digits, so the floor can compare as many real digits per class as
# the samples have (the Frechet distance's bias depends on the count): with the default judge the floor measured
# 2.96 +- 0.25 at 100 per class (sd over 5 draws) against 2.47 +- 0.04 at 139, while a trained model's figure hardly
# moved (12.7 and 12.8), so fewer samples would flatter the ratio to the floor and make it noisier.
PER_CLASS = 139
EULER_STEPS = 50
METHODS = ("1-NFE", "2-NFE", f"euler-{EULER_STEPS}")


def generate(net: torch.nn.Module, flow: Flow, method: str, per_class: int, seed: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class samples of every class with one method: '1-NFE', '2-NFE' or 'euler-50'."""
    g = torch.Generator(device).manual_seed(seed)
    y = torch.arange(NUM_CLASSES, device=device).repeat_interleave(per_class)
    nfe = int(method.split("-")[0]) if method.endswith("-NFE") else 1
    x, _ = sample_images(net, flow, y.shape[0], nfe=nfe, generator=g, labels=y,
                         euler_steps=0 if method.endswith("-NFE") else EULER_STEPS)
    return x.float().cpu(), y.cpu()


def _reports(ema: torch.nn.Module, flow: Flow, seeds: list[int], per_class: int) -> list[dict]:
    """quality_report of one sample draw per seed (every method), with one judge and floor for all of them."""
    train_x, train_y, test_x, test_y = load_digits_split()
    floor_x = class_balanced(train_x, train_y, per_class)
    judge = DigitsJudge.train_on(train_x, train_y, seed=0)
    device = next(ema.parameters()).device
    return [quality_report(judge, floor_x, test_x, test_y,
                           {m: generate(ema, flow, m, per_class, s, device) for m in METHODS}) for s in seeds]


def run_quality_report(ema: torch.nn.Module, flow: Flow, run_dir: str | os.PathLike, *, seed: int, step: int,
                       ema_info: dict, per_class: int = PER_CLASS) -> dict:
    """Judge the EMA model `ema` of a digits run at `step`; print the table and write run_dir/quality.json.
    Samples come from seed + 1; ema_info (decay rate, warm-up) is recorded with the report."""
    report = _reports(ema, flow, [seed + 1], per_class)[0]
    # class_balanced takes per_class real digits of every class for the floor
    report.update(weights="ema", **ema_info, step=step, samples_per_method=per_class * NUM_CLASSES,
                  floor_real_digits=per_class * NUM_CLASSES)
    path = Path(run_dir) / "quality.json"
    with atomic_open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    print("quality of the EMA weights at step %d (%s):\n%s" % (step, path, format_report(report)))
    return report


def judge_draws(ema: torch.nn.Module, flow: Flow, seeds: list[int], per_class: int = PER_CLASS) -> dict:
    """Every method's class accuracy and Frechet distance for one model and several sample draws (one per seed), with
    the report's judge and floor: how much of a figure is the draw. The draw of seed + 1 is run_quality_report's.
    Returns {method: {"class_accuracy": [...], "frechet": [...]}} in the order of seeds."""
    reports = _reports(ema, flow, seeds, per_class)
    return {m: {k: [r[m][k] for r in reports] for k in ("class_accuracy", "frechet")} for m in METHODS}
