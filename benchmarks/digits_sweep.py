"""Sweep the digits main job: train short variants of a config one after another and print their quality table.

    python benchmarks/digits_sweep.py --out runs/sweep [--config configs/digits.yaml] [--variants FILE]
        [--only NAME ...] [--seeds 42 43 44] [--set key=value ...] [--per-class N] [--draws N]

A variant is a name and a set of `--set`-style overrides of the config (`{}` is the config itself). --variants reads
them from a YAML or JSON file mapping each name to its overrides; without it the built-in coarse list below runs.
Each (variant, seed) trains in its own run directory OUT/NAME-sSEED, in this process, and is judged by the digits
quality report (soflow_fast/evaluation/digits_quality.py) with --per-class samples per class. A run directory whose
quality.json is already at the run's last step is read, not retrained, so an interrupted sweep continues where it
stopped (a half-trained run resumes from its checkpoint).

One draw of samples moves a model's Frechet distance by 5-9% and its accuracy by 0.1-0.35 points (sd over 8 draws
of the main job's models), about as much as a change of training seed. --draws N judges each finished model N
times (sample seeds seed + 1 ... seed + N; the first is quality.json's draw; kept in OUT/NAME-sSEED/quality_draws.json)
and the table shows the means over the draws, the 1-NFE Frechet distance's sd over them, and the share of draws in
which 2-NFE is at least as close to the data as 1-NFE: figures of the model, not of one draw.

The table reads each run's quality.json, metrics.jsonl and config.yaml: 1-NFE, 2-NFE and Euler-50 class accuracy and
Frechet distance, the real-vs-real floor, and compute as model FLOPs (docs/algorithm.md section 8: forward MACs x 2 x
forward-equivalents per step, x steps) relative to the unmodified config, so variants compare at equal compute even
when the machine is shared; train seconds come from metrics.jsonl (wall time, CPU, unreliable under contention).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from soflow_fast.checkpoint import consolidate, model_from_checkpoint
from soflow_fast.config import ConfigError, TrainConfig, load_config, parse_override
from soflow_fast.data.digits import IMAGE_SHAPE, NUM_CLASSES, load_digits_split
from soflow_fast.errors import RunFailed, UserError, one_line
from soflow_fast.evaluation.digits_quality import METHODS, PER_CLASS, judge_draws, run_quality_report
from soflow_fast.fileio import atomic_open
from soflow_fast.models import build_model
from soflow_fast.train import Trainer

# The next pass around configs/digits.yaml (hidden 96, 2,880 steps, velocity_loss_ratio 0.5, cfg_scale 1.4); steps
# keep its compute where a variant changes the forward-equivalents per step (docs/algorithm.md section 8: 616 at
# ratio 0.6 vs 640) or the width (hidden 112: (96 / 112)^2 of the steps). benchmarks/RESULTS.md (third to sixth
# passes): at this budget 2-NFE parity and one-step accuracy trade off; the narrower network moved that line.
BUILTIN: dict[str, dict[str, Any]] = {
    "base": {},
    "cfg1.35": {"cfg_scale": 1.35},
    "p0.75": {"p": 0.75},
    "vlr0.6-eq": {"velocity_loss_ratio": 0.6, "total_steps": 2992},
    "h112-eq": {"hidden_size": 112, "total_steps": 2116},
}


def read_variants(path: Optional[str]) -> dict[str, dict[str, Any]]:
    """{name: overrides} from a YAML/JSON file (safe_load), or the built-in list."""
    if path is None:
        return dict(BUILTIN)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--variants {path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--variants {path}: not valid YAML or JSON ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"--variants {path}: expected a non-empty mapping of variant names to overrides")
    for name, sets in raw.items():
        if not isinstance(sets, dict) and sets is not None:
            raise ConfigError(f"--variants {path}: variant {name!r}: expected a mapping of keys to values")
    return {str(name): dict(sets or {}) for name, sets in raw.items()}


def compute_flops(cfg: TrainConfig) -> float:
    """Model FLOPs of the whole run: forward MACs x 2 x forward-equivalents per step (docs/algorithm.md section 8)."""

    sizes = {k: getattr(cfg, k) for k in ("hidden_size", "depth", "num_heads", "patch_size")
             if getattr(cfg, k) is not None}
    net = build_model(cfg.model_type, input_size=cfg.data_size, in_channels=IMAGE_SHAPE[0], num_classes=NUM_CLASSES,
                      null_class=cfg.cfg_drop_rate > 0, device="meta", **sizes)
    guided = cfg.cfg_scale > 1.0
    return 2.0 * net.cfg.forward_macs() * cfg.hparams.forward_equivalents(cfg.batch_size, guided) * cfg.total_steps


def train_seconds(metrics_path: Path, batch_size: int) -> float:
    """Wall seconds of the training loop, summed over metrics.jsonl's logging windows (steps x batch / images/s)."""
    total, last = 0.0, 0
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        total += (rec["step"] - last) * batch_size / rec["images_per_s"]
        last = rec["step"]
    return total


def _finished(run_dir: Path, total_steps: int) -> bool:
    path = run_dir / "quality.json"
    return path.exists() and json.loads(path.read_text()).get("step") == total_steps


def run_variant(cfg: TrainConfig, run_dir: Path, per_class: int) -> None:
    """Train (or resume) one run and write its quality report, unless it is already finished."""
    if _finished(run_dir, cfg.total_steps):
        return
    # the report is run here, with --per-class samples, instead of the trainer's default one at the end of fit
    trainer = Trainer(dataclasses.replace(cfg, quality_report=False), run_dir)
    trainer.fit(progress=False)
    run_quality_report(trainer.ema_module(), trainer.flow, run_dir, seed=cfg.seed, step=trainer.step,
                       ema_info=cfg.ema_info, per_class=per_class)


def draws_of(run_dir: Path, cfg: TrainConfig, per_class: int, n: int) -> dict:
    """judge_draws of a finished run's EMA weights at sample seeds seed + 1 ... seed + n (cached in
    quality_draws.json)."""
    path = run_dir / "quality_draws.json"
    key = {"step": cfg.total_steps, "per_class": per_class, "seeds": [cfg.seed + 1 + i for i in range(n)]}
    if path.exists():
        cached = json.loads(path.read_text())
        if {k: cached.get(k) for k in key} == key:
            return cached
    try:
        ckpt = consolidate(run_dir)
    except FileNotFoundError as e:  # e.g. checkpoints deleted after the run to save space
        raise UserError(f"--draws {n}: new draws need the run's saved weights ({e})") from None
    result = {**key, **judge_draws(model_from_checkpoint(ckpt), cfg.flow, key["seeds"], per_class)}
    with atomic_open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    return result


def row_of(name: str, run_dir: Path, base_flops: float, draws: Optional[dict] = None) -> dict[str, Any]:
    """One table row from a finished run directory's files: quality.json's figures, or the means over `draws`."""
    cfg = load_config(run_dir / "config.yaml")
    quality = json.loads((run_dir / "quality.json").read_text())
    row: dict[str, Any] = {"variant": name, "seed": cfg.seed, "steps": cfg.total_steps, "batch": cfg.batch_size,
                           "compute": compute_flops(cfg) / base_flops,
                           "floor": quality["floor_frechet_train_vs_test"],
                           "train_s": train_seconds(run_dir / "metrics.jsonl", cfg.batch_size),
                           "samples": quality["samples_per_method"]}
    if draws is None:
        draws = {m: {k: [quality[m][k]] for k in ("class_accuracy", "frechet")} for m in METHODS}
    for m in METHODS:
        row[f"{m} acc"] = statistics.mean(draws[m]["class_accuracy"])
        row[f"{m} FD"] = statistics.mean(draws[m]["frechet"])
    one, two = draws["1-NFE"]["frechet"], draws["2-NFE"]["frechet"]
    row["draws"] = len(one)
    row["1-NFE FD sd"] = statistics.stdev(one) if len(one) > 1 else None
    row["2-NFE FD <= 1-NFE"] = sum(b <= a for a, b in zip(one, two)) / len(one)
    return row


COLUMNS = [(f"{m} {k}", k) for m in METHODS for k in ("acc", "FD")] + [
    ("floor", "FD"), ("1-NFE FD/floor", "ratio"), ("draws", "n"), ("1-NFE FD sd", "FD"), ("2-NFE FD <= 1-NFE", "share"),
    ("train_s", "s")]


def _value(v: Optional[float], kind: str) -> str:
    if v is None:
        return "-"
    if kind in ("acc", "share"):
        return f"{100 * v:.{2 if kind == 'acc' else 0}f}%"  # 2 decimals: one sample of 1,390 is 0.07 points
    return f"{v:.0f}" if kind in ("s", "n") else f"{v:.2f}"


def _cell(group: list[dict[str, Any]], key: str, kind: str) -> str:
    """One run's value, or mean [min, max] over a group of runs."""
    vals = [r[key] for r in group]
    if len(vals) == 1 or None in vals:
        return _value(vals[0], kind)
    return f"{_value(statistics.mean(vals), kind)} [{_value(min(vals), kind)}, {_value(max(vals), kind)}]"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per run, then a mean [min, max] row per variant run at more than one seed."""
    head = ["variant", "seed", "steps", "batch", "compute"] + [name for name, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        r["1-NFE FD/floor"] = r["1-NFE FD"] / r["floor"]
        groups.setdefault(r["variant"], []).append(r)
    singles = [(str(r["seed"]), [r]) for r in rows]
    means = [("mean", g) for g in groups.values() if len(g) > 1]
    for seed, group in singles + means:
        r = group[0]
        cells = [r["variant"], seed, str(r["steps"]), str(r["batch"]), f"{r['compute']:.2f}x"]
        lines.append("| " + " | ".join(cells + [_cell(group, key, kind) for key, kind in COLUMNS]) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder holding one run directory per variant and seed")
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--variants", help="YAML/JSON file: {name: {key: value, ...}}; default: the built-in list")
    ap.add_argument("--only", nargs="+", help="run only these variants of the list")
    ap.add_argument("--seeds", nargs="+", type=int, help="run each variant at these seeds (default: the config's)")
    ap.add_argument("--set", action="append", default=[], help="key=value applied to every variant (first)")
    ap.add_argument("--per-class", type=int, default=PER_CLASS, help="samples per class for each Frechet figure")
    ap.add_argument("--draws", type=int, default=1, help="judge each model on this many sample draws (their means)")
    args = ap.parse_args(argv)
    try:
        variants = read_variants(args.variants)
        unknown = sorted(set(args.only or ()) - set(variants))
        if unknown:
            raise ConfigError(f"--only: no variant named {unknown[0]!r}; the list has {sorted(variants)}")
        smallest = int(torch.bincount(load_digits_split()[1]).min())
        if not 2 <= args.per_class <= smallest:
            raise ConfigError(f"--per-class {args.per_class}: must lie in [2, {smallest}] (a covariance needs two "
                              f"samples; the floor needs as many real training digits per class)")
        if args.draws < 1:
            raise ConfigError(f"--draws {args.draws}: must be at least 1")
        common = dict(parse_override(s) for s in args.set)
        base_flops = compute_flops(load_config(args.config, common))
        rows = []
        for name, sets in variants.items():
            if args.only and name not in args.only:
                continue
            for seed in args.seeds or [None]:
                cfg = load_config(args.config, {**common, **sets, **({} if seed is None else {"seed": seed})})
                run_dir = Path(args.out) / f"{name}-s{cfg.seed}"
                print(f"== {name} seed {cfg.seed}: {sets or 'the config as is'} -> {run_dir}", flush=True)
                run_variant(cfg, run_dir, args.per_class)
                draws = draws_of(run_dir, cfg, args.per_class, args.draws) if args.draws > 1 else None
                rows.append(row_of(name, run_dir, base_flops, draws))
    except (UserError, RunFailed) as e:  # ConfigError is a UserError; anything else is a bug and keeps its traceback
        print(f"digits_sweep: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 1
    table = format_table(rows)
    with atomic_open(Path(args.out) / "sweep.md", "w") as fh:
        fh.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
