"""The COCO results format, written by ``eval --coco-json`` and
``predict --coco-json``: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.
The one place boxes go from xyxy (what the model post-processing gives) to
COCO's xywh."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def coco_result(image_id: int, category_id: int, box: Sequence[float], score: float, *,
                rounded: bool = False) -> dict[str, Any]:
    """One detection, ``box`` = (x1, y1, x2, y2) in pixels. ``rounded``: boxes
    to 0.01 px and scores to 1e-5 (files meant to be read by people)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    bbox = [x0, y0, x1 - x0, y1 - y0]
    score = float(score)
    if rounded:
        bbox, score = [round(v, 2) for v in bbox], round(score, 5)
    return {"image_id": int(image_id), "category_id": int(category_id), "bbox": bbox, "score": score}
