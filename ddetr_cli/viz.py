"""Drawing detections on images with OpenCV (a leaf: numpy + opencv only).
The charts (``results.png``, PR curve, confusion matrix, ...) are drawn with
matplotlib in :mod:`ddetr_cli.engine.report.plots`."""

from __future__ import annotations

from collections.abc import Iterable
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
