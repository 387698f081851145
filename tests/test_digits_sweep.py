"""benchmarks/digits_sweep.py on two tiny variants (a few steps of a small DiT, few samples per class): each variant's
overrides reach its run, the table reads every run's files, a second call reuses finished runs, and bad input is one
line naming the flag or key."""
import json
import shutil
import sys
from pathlib import Path

import pytest

from soflow_fast.config import load_config
from soflow_fast.data.digits import load_digits_split
from soflow_fast.evaluation.digits_judge import DigitsJudge, class_balanced
from soflow_fast.evaluation.frechet import frechet_distance, gaussian_stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import digits_sweep as sweep  # noqa: E402

TINY = ["total_steps=3", "batch_size=16", "hidden_size=32", "depth=1", "num_heads=2", "eval_demo_steps=0",
        "logging_steps=2"]


def _args(tmp_path: Path, variants: Path) -> list[str]:
    args = ["--out", str(tmp_path / "out"), "--config", str(ROOT / "configs" / "digits.yaml"),
            "--variants", str(variants), "--per-class", "3"]
    for s in TINY:
        args += ["--set", s]
    return args


def test_sweep_runs_variants_and_reuses_finished_runs(tmp_path, capsys):
    variants = tmp_path / "v.yaml"
    variants.write_text("guided: {}\nunguided: {cfg_scale: 1.0, learning_rate: 0.001}\n")
    assert sweep.main(_args(tmp_path, variants)) == 0
    first = capsys.readouterr().out
    out = tmp_path / "out"
    runs = {name: out / f"{name}-s42" for name in ("guided", "unguided")}
    cfgs = {name: (run / "config.yaml").read_text() for name, run in runs.items()}
    assert "cfg_scale: 1.0" in cfgs["unguided"]
    assert f"cfg_scale: {load_config(ROOT / 'configs' / 'digits.yaml').cfg_scale}" in cfgs["guided"]
    assert "learning_rate: 0.001" in cfgs["unguided"]
    rows = {name: sweep.row_of(name, run, 1.0) for name, run in runs.items()}
    for name, row in rows.items():
        quality = json.loads((runs[name] / "quality.json").read_text())
        assert row["steps"] == quality["step"] == 3 and row["samples"] == 30
        assert row["1-NFE FD"] == quality["1-NFE"]["frechet"] and row["floor"] == quality[
            "floor_frechet_train_vs_test"]
        assert row["train_s"] > 0
        assert quality["floor_real_digits"] == 30
    # The floor compares as many real training digits per class as the samples have (3), with the report's judge.
    train_x, train_y, test_x, _ = load_digits_split()
    judge = DigitsJudge.train_on(train_x, train_y, seed=0)
    floor = frechet_distance(*gaussian_stats(judge.features(class_balanced(train_x, train_y, 3))),
                             *gaussian_stats(judge.features(test_x)))
    assert rows["guided"]["floor"] == rows["unguided"]["floor"] == floor
    # Without guidance there is no teacher call: 3B + n_c forward-equivalents instead of 3B + n_fm + 3 n_c.
    n_fm = int(load_config(ROOT / "configs" / "digits.yaml").velocity_loss_ratio * 16)
    n_c = 16 - n_fm
    assert rows["unguided"]["compute"] / rows["guided"]["compute"] == pytest.approx(
        (3 * 16 + n_c) / (3 * 16 + n_fm + 3 * n_c))
    lines = [ln for ln in first.splitlines() if ln.startswith("| guided") or ln.startswith("| unguided")]
    assert len(lines) == 2
    assert f"{rows['guided']['1-NFE FD']:.2f}" in lines[0] and "| 1.00x |" in lines[0]
    assert (out / "sweep.md").read_text().strip() == first[first.index("| variant"):].strip()
    # A second call reads the finished runs instead of training them again.
    stamps = {name: (run / "quality.json").stat().st_mtime_ns for name, run in runs.items()}
    assert sweep.main(_args(tmp_path, variants)) == 0
    assert {name: (run / "quality.json").stat().st_mtime_ns for name, run in runs.items()} == stamps
    assert capsys.readouterr().out.endswith(first[first.index("| variant"):])


def test_draws_judge_the_model_several_times(tmp_path, capsys):
    variants = tmp_path / "v.yaml"
    variants.write_text("a: {}\n")
    assert sweep.main(_args(tmp_path, variants) + ["--draws", "3"]) == 0
    run = tmp_path / "out" / "a-s42"
    quality = json.loads((run / "quality.json").read_text())
    draws = json.loads((run / "quality_draws.json").read_text())
    assert draws["seeds"] == [43, 44, 45] and draws["step"] == 3 and draws["per_class"] == 3
    for m in sweep.METHODS:
        # The first draw is quality.json's (sample seed 43), judged again from the saved EMA weights.
        assert draws[m]["frechet"][0] == quality[m]["frechet"]
        assert draws[m]["class_accuracy"][0] == quality[m]["class_accuracy"]
        assert len(set(draws[m]["frechet"])) == 3  # new samples each draw
    row = sweep.row_of("a", run, 1.0, draws)
    one, two = draws["1-NFE"]["frechet"], draws["2-NFE"]["frechet"]
    assert row["1-NFE FD"] == pytest.approx(sum(one) / 3) and row["draws"] == 3
    assert row["2-NFE FD <= 1-NFE"] == sum(b <= a for a, b in zip(one, two)) / 3
    table = capsys.readouterr().out
    assert f"| {row['1-NFE FD']:.2f} |" in table and f"| 3 | {row['1-NFE FD sd']:.2f} |" in table
    # A second call reads the cached draws.
    stamp = (run / "quality_draws.json").stat().st_mtime_ns
    assert sweep.main(_args(tmp_path, variants) + ["--draws", "3"]) == 0
    assert (run / "quality_draws.json").stat().st_mtime_ns == stamp
    # More draws than cached need the saved weights: without them, one line naming the flag.
    shutil.rmtree(run / "ckpts")
    capsys.readouterr()
    assert sweep.main(_args(tmp_path, variants) + ["--draws", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("digits_sweep: --draws 4: new draws need the run's saved")


def test_seed_spread_row(tmp_path, capsys):
    rows = [{"variant": "v", "seed": s, "steps": 3, "batch": 16, "compute": 1.0, "floor": 1.0, "train_s": 2.0,
             "1-NFE acc": a, "1-NFE FD": fd, "2-NFE acc": a, "2-NFE FD": fd, "euler-50 acc": a, "euler-50 FD": fd,
             "draws": 1, "1-NFE FD sd": None, "2-NFE FD <= 1-NFE": 1.0}
            for s, a, fd in ((42, 0.99, 3.0), (43, 0.98, 5.0))]
    table = sweep.format_table(rows)
    mean = [ln for ln in table.splitlines() if "| mean |" in ln]
    assert len(mean) == 1 and "| 98.50% [98.00%, 99.00%] | 4.00 [3.00, 5.00] |" in mean[0]


@pytest.mark.parametrize("content, flag, message", [
    (None, "--variants", "no such file"),
    ("[a, b]", "--variants", "expected a non-empty mapping"),
    ("bad: {no_such_key: 1}", "config", "unknown key 'no_such_key'"),
    ("bad: {cfg_scale: 0.5}", "config", "cfg_scale"),
])
def test_bad_input_is_one_line(tmp_path, capsys, content, flag, message):
    variants = tmp_path / "v.yaml"
    if content is not None:
        variants.write_text(content)
    assert sweep.main(_args(tmp_path, variants)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("digits_sweep: ") and flag in err and message in err


@pytest.mark.parametrize("extra, flag, message", [
    (["--per-class", "1"], "--per-class 1", "must lie in [2, 139]"),
    (["--per-class", "140"], "--per-class 140", "must lie in [2, 139]"),
    (["--only", "nope"], "--only", "no variant named 'nope'"),
    (["--draws", "0"], "--draws 0", "must be at least 1"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, extra, flag, message):
    variants = tmp_path / "v.yaml"
    variants.write_text("a: {}\n")
    assert sweep.main(_args(tmp_path, variants) + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("digits_sweep: ") and flag in err and message in err


def test_a_diverged_variant_is_one_line(tmp_path, capsys):
    variants = tmp_path / "v.yaml"
    variants.write_text("a: {learning_rate: 1.0e+30}\n")
    assert sweep.main(_args(tmp_path, variants)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("digits_sweep: step ") and "non-finite loss" in err
