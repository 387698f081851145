"""The digits judge: accuracy on real held-out digits, and the report's behaviour on real data and on noise.

One judge (default settings, seed 0) is trained once per module; the determinism test trains short runs.
"""
from __future__ import annotations

import pytest
import torch

from soflow_fast.data.digits import load_digits_split
from soflow_fast.evaluation.digits_judge import DigitsJudge, class_balanced, format_report, quality_report


@pytest.fixture(scope="module")
def split():
    return load_digits_split(held_out=0.2, seed=0)


@pytest.fixture(scope="module")
def judge(split) -> DigitsJudge:
    train_x, train_y, _, _ = split
    return DigitsJudge.train_on(train_x, train_y, seed=0)


@pytest.fixture(scope="module")
def report(judge, split) -> dict:
    train_x, train_y, test_x, test_y = split
    noise = torch.rand(test_x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # Real held-out digits with saturated pixels pushed past +-1: clamping must give back the real digits.
    overshoot = torch.where(test_x.abs() >= 1.0, 3.0 * test_x, test_x)
    samples = {
        "real-test": (test_x, test_y),
        "real-train": (train_x, train_y),
        "overshoot": (overshoot, test_y),
        "noise": (noise, test_y),
    }
    return quality_report(judge, train_x, test_x, test_y, samples)


def test_judge_held_out_accuracy(judge, split, report) -> None:
    _, _, test_x, test_y = split
    acc = (judge.predict(test_x) == test_y).float().mean().item()
    assert acc >= 0.97
    assert report["classifier_test_accuracy"] == acc
    assert judge.features(test_x[:5]).shape == (5, judge.head.in_features)


def test_real_digits_score_like_real_data(report) -> None:
    floor = report["floor_frechet_train_vs_test"]
    assert floor > 0  # two different finite samples never have identical statistics
    # The held-out set against itself: same predictions as the accuracy line, and a distance of 0 (round-off only).
    assert report["real-test"]["class_accuracy"] == report["classifier_test_accuracy"]
    assert report["real-test"]["frechet"] < 1e-6 * floor
    # The train set as "samples" is exactly the floor's comparison.
    assert report["real-train"]["frechet"] == pytest.approx(floor, rel=1e-12)
    assert report["real-train"]["class_accuracy"] >= 0.97


def test_samples_are_clamped(report) -> None:
    assert report["overshoot"] == report["real-test"]


def test_noise_scores_badly(report) -> None:
    # Uniform noise carries no digit: accuracy near chance (0.1), and far from the real feature distribution.
    assert report["noise"]["class_accuracy"] < 0.3
    assert report["noise"]["frechet"] > 10 * report["floor_frechet_train_vs_test"]


def test_format_report_lists_every_method(report) -> None:
    text = format_report(report)
    for name in ("real-test", "real-train", "overshoot", "noise"):
        assert name in text
    assert f"{report['noise']['frechet']:.4f}" in text
    assert f"{report['classifier_test_accuracy']:.4f}" in text


def test_training_is_deterministic_and_leaves_global_rng_alone(split) -> None:
    train_x, train_y, _, _ = split
    rng_before = torch.random.get_rng_state()
    a = DigitsJudge.train_on(train_x, train_y, seed=3, steps=20)
    b = DigitsJudge.train_on(train_x, train_y, seed=3, steps=20)
    c = DigitsJudge.train_on(train_x, train_y, seed=4, steps=20)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))


def test_mismatched_sample_labels_raise(judge, split) -> None:
    train_x, _, test_x, test_y = split
    with pytest.raises(ValueError, match="bad"):
        quality_report(judge, train_x, test_x, test_y, {"bad": (test_x[:10], test_y[:9])})


def test_class_balanced_draws_per_class_rows(split) -> None:
    train_x, train_y, _, _ = split
    ids = torch.arange(train_x.shape[0], dtype=torch.float32).view(-1, 1, 1, 1).expand_as(train_x)
    picked = class_balanced(ids, train_y, 7, seed=1)[:, 0, 0, 0].long()
    assert picked.unique().numel() == 70  # without replacement
    assert torch.equal(torch.bincount(train_y[picked], minlength=10), torch.full((10,), 7))
    assert torch.equal(class_balanced(ids, train_y, 7, seed=1), class_balanced(ids, train_y, 7, seed=1))
    assert not torch.equal(class_balanced(ids, train_y, 7, seed=1), class_balanced(ids, train_y, 7, seed=2))
    smallest = int(torch.bincount(train_y).min())
    assert class_balanced(ids, train_y, smallest).shape[0] == 10 * smallest
    with pytest.raises(ValueError, match=f"per_class {smallest + 1}: class .* has only {smallest} real digits"):
        class_balanced(ids, train_y, smallest + 1)


def test_floor_is_the_balanced_real_digits_as_samples(judge, split) -> None:
    """The floor of a class-balanced real subset is exactly that subset judged as a sampler's output."""
    train_x, train_y, test_x, test_y = split
    floor_x = class_balanced(train_x, train_y, 50)
    labels = torch.arange(10).repeat_interleave(50)
    report = quality_report(judge, floor_x, test_x, test_y, {"real-50": (floor_x, labels)})
    assert report["real-50"]["frechet"] == report["floor_frechet_train_vs_test"]
    assert report["real-50"]["class_accuracy"] >= 0.97  # the grouping by class matches the labels
