"""`soflow-fast plot RUN_DIR`: reading metrics.jsonl (resumed runs, separate FID records, a torn last line) and
drawing it (panel layout, a point lands where the axis mapping puts it)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soflow_fast.cli import main
from soflow_fast.evaluation import plot

BLUE = plot.COLORS[0]


def _write(path: Path, records: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _record(step: int) -> dict:
    return {"step": step, "loss": 1.0 / step, "loss_fm": 0.5 / step, "loss_c": 0.7 / step, "mse_fm": 0.1,
            "mse_c": 0.2, "weight_fm": 0.5, "weight_c": 0.6, "grad_norm": 2.0, "images_per_s": 100.0 + step}


def test_read_metrics_dedupes_merges_and_skips(tmp_path, caplog) -> None:
    recs = [_record(s) for s in (10, 20, 30)]
    recs += [{**_record(20), "loss": 9.0}, {"step": 20, "fid": 42.0}]  # a resumed run re-logs step 20; then FID
    recs += [{**_record(40), "loss": float("nan")}]
    _write(tmp_path / "metrics.jsonl", recs, tail='{"step": 50, "lo')  # a crash mid-write
    series = plot.read_metrics(tmp_path / "metrics.jsonl")
    assert series["loss"] == [(10.0, 0.1), (20.0, 9.0), (30.0, 1.0 / 30)]  # last write of step 20 wins, NaN dropped
    assert series["fid"] == [(20.0, 42.0)]
    assert [s for s, _ in series["images_per_s"]] == [10.0, 20.0, 30.0, 40.0]
    assert "line(s) [7]" in caplog.text


def test_plot_layout_and_point_position(tmp_path) -> None:
    recs = [_record(s) for s in range(10, 101, 10)] + [{"step": 10, "fid": 100.0}, {"step": 100, "fid": 50.0}]
    _write(tmp_path / "metrics.jsonl", recs)
    out = plot.plot_metrics(tmp_path)
    assert out == tmp_path / "metrics.png"
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (3 * plot.PANEL_H, 2 * plot.PANEL_W, 3)  # six panels, two columns
    # FID is the sixth panel (row 2, column 1); its first point (step 10, FID 100) is at the left edge, 5% of the
    # value range below the top (the axis pads the data range by 5% each side).
    x0, y0 = plot.PANEL_W, 2 * plot.PANEL_H
    left, top = x0 + plot.MARGIN_L, y0 + plot.MARGIN_T
    bottom = y0 + plot.PANEL_H - plot.MARGIN_B
    y = bottom - (100 - 47.5) / 55 * (bottom - top)
    assert tuple(img[round(y), left + 1]) == BLUE
    assert tuple(img[round(y) - 4, left + 1]) != BLUE  # and not a smear: the dot has radius 2


def test_plot_only_present_panels(tmp_path) -> None:
    _write(tmp_path / "metrics.jsonl", [{"step": s, "loss": math.exp(-s)} for s in range(1, 5)])
    img = Image.open(plot.plot_metrics(tmp_path, tmp_path / "sub" / "p.png"))
    assert img.size == (2 * plot.PANEL_W, plot.PANEL_H)


def test_plot_cli_and_errors(tmp_path, capsys) -> None:
    _write(tmp_path / "run" / "metrics.jsonl", [_record(s) for s in (1, 2)])
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "metrics.png").is_file()
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "nowhere/metrics.jsonl" in capsys.readouterr().err
    _write(tmp_path / "empty" / "metrics.jsonl", [])
    with pytest.raises(ValueError, match="no metric records"):
        plot.plot_metrics(tmp_path / "empty")
    _write(tmp_path / "other" / "metrics.jsonl", [{"step": 1, "lr": 0.1}])
    with pytest.raises(ValueError, match="none of the plotted keys"):
        plot.plot_metrics(tmp_path / "other")
