"""`soflow-fast plot RUN_DIR`: the curves of RUN_DIR/metrics.jsonl (loss terms, mse, adaptive weights, grad norm,
images/s, FID when logged) over steps, as one PNG drawn with Pillow.

Pillow, not matplotlib (issue 16 asked which serves better): the PNG is a quick look at a run from a login node,
and its six panels of lines with round-number ticks, log axes and legends are all it needs. Pillow is already a
dependency and draws it in ~100 lines whose geometry the tests check pixel by pixel; matplotlib would add a large
dependency for the same picture with nicer fonts. Anyone who wants zoom, smoothing or several runs overlaid has
TensorBoard (`tensorboard: true`, docs/cluster.md), which reads the same numbers.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

from ..fileio import atomic_open

log = logging.getLogger("soflow_fast")

# (title, keys, log-scale y): losses and norms span decades over a run, so they read better on a log axis.
PANELS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("loss", ("loss", "loss_fm", "loss_c"), True),
    ("mse", ("mse_fm", "mse_c"), True),
    ("adaptive loss weight", ("weight_fm", "weight_c"), False),
    ("grad norm", ("grad_norm",), True),
    ("images / s", ("images_per_s",), False),
    ("FID", ("fid",), False),
)
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
PANEL_W, PANEL_H, MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 520, 300, 64, 16, 28, 36

Series = dict[str, list[tuple[float, float]]]


def read_metrics(path: str | os.PathLike) -> Series:
    """{key: [(step, value), ...]} sorted by step; a step logged twice (a resumed run re-logs the steps after its
    last checkpoint) keeps its last record; non-finite values and unreadable lines (a crash mid-write) are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    by_step: dict[float, dict] = {}
    bad = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = float(rec["step"])
        except (ValueError, KeyError, TypeError):
            bad.append(lineno)
            continue
        by_step.setdefault(step, {}).update(rec)  # records of one step merge (e.g. losses, then an FID record)
    if bad:
        log.warning("%s: skipped unreadable line(s) %s", path, bad[:10])
    series: Series = {}
    for step in sorted(by_step):
        for k, v in by_step[step].items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                series.setdefault(k, []).append((step, float(v)))
    if not series:
        raise ValueError(f"{path}: no metric records (one JSON object with a 'step' per line)")
    return series


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round numbers (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """log10 of the 1, 2, 5 x 10^k values in [10^lo, 10^hi] (only 10^k when that is plenty); linear below 2."""
    cands = [[math.log10(m) + e for e in range(math.floor(lo), math.ceil(hi) + 1)] for m in (1, 2, 5)]
    decades = [t for t in cands[0] if lo <= t <= hi]
    if len(decades) >= 3:
        return decades
    ticks = sorted(t for c in cands for t in c if lo <= t <= hi)
    return ticks if len(ticks) >= 2 else _ticks(lo, hi)


def _fmt(v: float) -> str:
    if float(v).is_integer() and abs(v) < 1e7:
        return str(int(v))
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.1e}"


def _draw_panel(draw, font, x0: int, y0: int, title: str, data: Series, log_y: bool) -> None:
    left, top = x0 + MARGIN_L, y0 + MARGIN_T
    right, bottom = x0 + PANEL_W - MARGIN_R, y0 + PANEL_H - MARGIN_B
    log_y = log_y and all(v > 0 for pts in data.values() for _, v in pts)
    ty = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs = [s for pts in data.values() for s, _ in pts]
    ys = [ty(v) for pts in data.values() for _, v in pts]
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = min(ys), max(ys)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    if yhi == ylo:
        pad = abs(ylo) * 0.05 or 1.0
        ylo, yhi = ylo - pad, yhi + pad
    pad = (yhi - ylo) * 0.05
    ylo, yhi = ylo - pad, yhi + pad

    def px(s: float, v: float) -> tuple[float, float]:
        return (left + (s - xlo) / (xhi - xlo) * (right - left), bottom - (v - ylo) / (yhi - ylo) * (bottom - top))

    draw.text((left, y0 + 8), title + ("  (log scale)" if log_y else ""), fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    for t in (_log_ticks if log_y else _ticks)(ylo, yhi):
        _, y = px(xlo, t)
        draw.line([left, y, right, y], fill=(232, 232, 232))
        draw.text((x0 + 4, y - 5), _fmt(10 ** t if log_y else t), fill=(60, 60, 60), font=font)
    for t in _ticks(xlo, xhi):
        x, _ = px(t, ylo)
        draw.line([x, bottom, x, bottom + 4], fill=(120, 120, 120))
        draw.text((x - 12, bottom + 6), _fmt(t), fill=(60, 60, 60), font=font)
    draw.text((right - 24, bottom + 20), "step", fill=(60, 60, 60), font=font)
    for i, (key, pts) in enumerate(data.items()):
        color = COLORS[i % len(COLORS)]
        line = [px(s, ty(v)) for s, v in pts]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for x, y in line if len(line) <= 50 else line[-1:]:  # dots where points are few (e.g. FID)
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.line([right - 110, top + 10 + 12 * i, right - 94, top + 10 + 12 * i], fill=color, width=2)
        draw.text((right - 90, top + 4 + 12 * i), key, fill="black", font=font)


def plot_metrics(run_dir: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Path:
    """Draw RUN_DIR/metrics.jsonl into a PNG (default RUN_DIR/metrics.png); returns its path."""
    from PIL import Image, ImageDraw, ImageFont

    run_dir = Path(run_dir)
    series = read_metrics(run_dir / "metrics.jsonl")
    panels = [(title, {k: series[k] for k in keys if k in series}, log_y) for title, keys, log_y in PANELS]
    panels = [p for p in panels if p[1]]
    if not panels:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: none of the plotted keys "
                         f"({', '.join(k for _, keys, _ in PANELS for k in keys)}) has a value")
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    img = Image.new("RGB", (cols * PANEL_W, rows * PANEL_H), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    for i, (title, data, log_y) in enumerate(panels):
        r, c = divmod(i, cols)
        _draw_panel(draw, font, c * PANEL_W, r * PANEL_H, title, data, log_y)
    out = Path(out) if out else run_dir / "metrics.png"
    with atomic_open(out) as fh:
        img.save(fh, format="PNG")
    return out
