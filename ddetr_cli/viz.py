"""Drawing with OpenCV only (matplotlib is not a dependency): detections on
images, and training curves (``metrics.csv`` -> ``results.png``)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# A fixed palette (RGB), indexed by class; distinct, saturated, readable under white text.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 190, 190), (240, 50, 230), (150, 170, 20), (200, 120, 120), (0, 128, 128),
    (170, 110, 40), (128, 0, 0), (90, 160, 110), (128, 128, 0), (255, 160, 30),
    (0, 0, 128), (100, 100, 100), (220, 190, 0), (30, 90, 255), (180, 60, 60),
)  # fmt: skip

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_colour(index: int) -> tuple[int, int, int]:
    return PALETTE[int(index) % len(PALETTE)]


def _field(det: Any, name: str, default: Any = None) -> Any:
    if isinstance(det, dict):
        return det.get(name, default)
    return getattr(det, name, default)


def draw_detections(
    image: np.ndarray,
    detections: Iterable[Any],
    *,
    thickness: int | None = None,
    font_scale: float | None = None,
    show_score: bool = True,
) -> np.ndarray:
    """Returns a copy of ``image`` (uint8 [H, W, 3] RGB) with boxes and
    "name 0.87" labels drawn. A detection is an object or dict with ``box``
    (x1, y1, x2, y2 pixels), ``label``, ``score`` and ``class_index`` (or
    ``category_id``) choosing the colour. Sizes scale with the image."""
    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    short = min(h, w)
    thickness = thickness or max(1, int(round(short / 320)))
    font_scale = font_scale or float(np.clip(short / 900, 0.35, 1.2))
    text_thick = max(1, int(round(font_scale * 1.6)))
    pad = max(1, int(round(3 * font_scale)))
    dets = sorted(detections, key=lambda d: float(_field(d, "score", 0.0)))  # best drawn last (on top)
    for det in dets:
        x1, y1, x2, y2 = (float(v) for v in _field(det, "box"))
        index = _field(det, "class_index")
        if index is None:
            index = _field(det, "category_id", 0)
        colour = class_colour(int(index))
        p1 = (int(round(max(0, min(w - 1, x1)))), int(round(max(0, min(h - 1, y1)))))
        p2 = (int(round(max(0, min(w - 1, x2)))), int(round(max(0, min(h - 1, y2)))))
        cv2.rectangle(out, p1, p2, colour, thickness, lineType=cv2.LINE_8)  # axis-aligned: crisp
        text = str(_field(det, "label", ""))
        if show_score and _field(det, "score") is not None:
            text = f"{text} {float(_field(det, 'score')):.2f}".strip()
        if not text:
            continue
        (tw, th), base = cv2.getTextSize(text, _FONT, font_scale, text_thick)
        box_h = th + base + 2 * pad
        top = p1[1] - box_h if p1[1] - box_h >= 0 else p1[1]  # above the box, else just inside
        left = min(p1[0], max(0, w - tw - 2 * pad))
        cv2.rectangle(out, (left, top), (left + tw + 2 * pad, top + box_h), colour, -1)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luminance > 160 else (255, 255, 255)
        cv2.putText(out, text, (left + pad, top + pad + th), _FONT, font_scale, ink, text_thick, cv2.LINE_AA)
    return out


# ---------------------------------------------------------------------- charts
_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "loss_ce", "loss_bbox", "loss_giou")),
    ("AP", ("AP", "AP50", "AP75")),
    ("AP by size", ("APs", "APm", "APl")),
    ("AR", ("AR1", "AR10", "AR100")),
    ("errors (%)", ("class_error", "cardinality_error")),
    ("learning rate", ("lr",)),
)
_X_COLUMNS = ("epoch", "step", "iter", "iteration")
_SKIP = ("time",)
_LINE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def read_metrics(csv_path: str | os.PathLike) -> tuple[str, dict[str, list[float]]]:
    """CSV with a header row -> (x column name, {column: values}); empty or
    non-numeric cells become NaN; AP/AR columns treat -1 ('no objects') as NaN."""
    path = Path(csv_path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise ValueError(f"{path}: metrics file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read metrics ({exc})") from None
    if not rows:
        raise ValueError(f"{path}: no metric rows yet")
    columns: dict[str, list[float]] = {name: [] for name in rows[0] if name}
    for row in rows:
        for name in columns:
            try:
                v = float(row.get(name) or "nan")
            except ValueError:
                v = float("nan")
            if (name.startswith("AP") or name.startswith("AR")) and v < 0:
                v = float("nan")
            columns[name].append(v)
    x_name = next((c for c in _X_COLUMNS if c in columns), "")
    if not x_name:
        columns["row"] = [float(i) for i in range(len(rows))]
        x_name = "row"
    return x_name, columns


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi - lo < 1e-12:
        lo, hi = lo - (abs(lo) * 0.1 or 0.5), hi + (abs(hi) * 0.1 or 0.5)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], start
    while t <= hi + step * 1e-6:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        mantissa, exponent = f"{v:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"
    return f"{v:.4g}"


def _draw_panel(canvas: np.ndarray, rect: tuple[int, int, int, int], title: str, x: Sequence[float],
                series: dict[str, list[float]], x_label: str) -> None:
    x0, y0, pw, ph = rect
    ink, grid, frame = (40, 40, 40), (225, 225, 225), (120, 120, 120)
    left, right, top, bottom = 62, 14, 30, 38
    ax0, ay0, ax1, ay1 = x0 + left, y0 + top, x0 + pw - right, y0 + ph - bottom
    cv2.putText(canvas, title, (x0 + left, y0 + 20), _FONT, 0.55, ink, 1, cv2.LINE_AA)
    xs = np.asarray(x, dtype=np.float64)
    vals = np.concatenate([np.asarray(v, dtype=np.float64) for v in series.values()])
    finite = vals[np.isfinite(vals)]
    if finite.size == 0 or not np.isfinite(xs).any():
        return
    y_lo, y_hi = float(finite.min()), float(finite.max())
    margin = (y_hi - y_lo) * 0.05 or (abs(y_hi) * 0.05 or 0.05)
    y_lo, y_hi = y_lo - margin, y_hi + margin
    x_lo, x_hi = float(np.nanmin(xs)), float(np.nanmax(xs))
    if x_hi - x_lo < 1e-12:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5

    def px(xv: float, yv: float) -> tuple[int, int]:
        return (int(round(ax0 + (xv - x_lo) / (x_hi - x_lo) * (ax1 - ax0))),
                int(round(ay1 - (yv - y_lo) / (y_hi - y_lo) * (ay1 - ay0))))  # fmt: skip

    for t in _nice_ticks(y_lo, y_hi):
        if y_lo <= t <= y_hi:
            _, yy = px(x_lo, t)
            cv2.line(canvas, (ax0, yy), (ax1, yy), grid, 1)
            label = _fmt_tick(t)
            (tw, th), _ = cv2.getTextSize(label, _FONT, 0.38, 1)
            cv2.putText(canvas, label, (ax0 - tw - 6, yy + th // 2), _FONT, 0.38, ink, 1, cv2.LINE_AA)
    for t in _nice_ticks(x_lo, x_hi, 6):
        if x_lo <= t <= x_hi:
            xx, _ = px(t, y_lo)
            cv2.line(canvas, (xx, ay0), (xx, ay1), grid, 1)
            label = _fmt_tick(t)
            (tw, th), _ = cv2.getTextSize(label, _FONT, 0.38, 1)
            cv2.putText(canvas, label, (xx - tw // 2, ay1 + th + 6), _FONT, 0.38, ink, 1, cv2.LINE_AA)
    cv2.rectangle(canvas, (ax0, ay0), (ax1, ay1), frame, 1)
    (tw, _), _ = cv2.getTextSize(x_label, _FONT, 0.42, 1)
    cv2.putText(canvas, x_label, ((ax0 + ax1 - tw) // 2, y0 + ph - 8), _FONT, 0.42, ink, 1, cv2.LINE_AA)

    all_pts: list[list[tuple[int, int]]] = []
    for i, (name, ys) in enumerate(series.items()):
        colour = _LINE_COLOURS[i % len(_LINE_COLOURS)]
        ys = np.asarray(ys, dtype=np.float64)
        pts = [px(a, b) for a, b in zip(xs, ys) if math.isfinite(a) and math.isfinite(b)]
        all_pts.append(pts)
        for p, q in zip(pts, pts[1:]):
            cv2.line(canvas, p, q, colour, 2, cv2.LINE_AA)
        for p in pts if len(pts) <= 30 else pts[-1:]:
            cv2.circle(canvas, p, 3, colour, -1, cv2.LINE_AA)

    # legend: "name last-value", in the plot corner with the fewest data points
    entries = []
    for name, ys in series.items():
        last = next((float(v) for v in list(ys)[::-1] if math.isfinite(v)), None)
        entries.append(f"{name} {_fmt_tick(last)}" if last is not None else name)
    sizes = [cv2.getTextSize(t, _FONT, 0.4, 1)[0] for t in entries]
    line_h = max(th for _, th in sizes) + 8
    lw = max(tw for tw, _ in sizes) + 34
    lh = line_h * len(entries) + 6
    corners = [(ax1 - lw - 6, ay0 + 6), (ax1 - lw - 6, ay1 - lh - 6), (ax0 + 6, ay0 + 6), (ax0 + 6, ay1 - lh - 6)]
    flat = [p for pts in all_pts for p in pts]

    def crowding(corner: tuple[int, int]) -> int:
        cx, cy = corner
        return sum(cx - 4 <= px_ <= cx + lw + 4 and cy - 4 <= py_ <= cy + lh + 4 for px_, py_ in flat)

    lx, ly = min(corners, key=crowding)
    overlay = canvas[ly : ly + lh, lx : lx + lw]
    overlay[:] = (0.25 * overlay + 0.75 * 255).astype(np.uint8)  # translucent white box
    cv2.rectangle(canvas, (lx, ly), (lx + lw, ly + lh), (200, 200, 200), 1)
    for i, text in enumerate(entries):
        colour = _LINE_COLOURS[i % len(_LINE_COLOURS)]
        ty = ly + 4 + line_h * (i + 1) - 8
        cv2.line(canvas, (lx + 6, ty - 4), (lx + 24, ty - 4), colour, 2, cv2.LINE_AA)
        cv2.putText(canvas, text, (lx + 30, ty), _FONT, 0.4, ink, 1, cv2.LINE_AA)


def plot_metrics(csv_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Draws one line-chart panel per metric group (loss, AP, AP by size, AR,
    errors, learning rate, then any other numeric column) from a metrics CSV
    and writes a PNG. Raises ValueError naming the file on unreadable input."""
    x_name, columns = read_metrics(csv_path)
    x = columns[x_name]
    used = {x_name, *_SKIP}
    panels: list[tuple[str, dict[str, list[float]]]] = []
    for title, names in _PANELS:
        series = {n: columns[n] for n in names if n in columns and any(math.isfinite(v) for v in columns[n])}
        used.update(names)
        if series:
            panels.append((title, series))
    for name, values in columns.items():
        if name not in used and any(math.isfinite(v) for v in values):
            panels.append((name, {name: values}))
    if not panels:
        raise ValueError(f"{csv_path}: no numeric metric columns to plot")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    pw, ph = 480, 320
    canvas = np.full((rows * ph + 10, cols * pw + 10, 3), 255, np.uint8)  # [H, W, 3] RGB
    for i, (title, series) in enumerate(panels):
        r, c = divmod(i, cols)
        _draw_panel(canvas, (5 + c * pw, 5 + r * ph, pw, ph), title, x, series, x_name)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"{out}: PNG encoding failed")
    tmp = out.with_name(f".{out.name}.tmp")
    buf.tofile(tmp)
    os.replace(tmp, out)
    return out
