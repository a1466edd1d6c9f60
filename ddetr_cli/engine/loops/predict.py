"""The prediction loop: batches of images and video frames through a model
runner, with per-stage timing.

:class:`Predictor` turns RGB arrays into :class:`Detection` lists (class names,
dataset category ids, boxes in original pixels) through any
:class:`~.runner.ModelRunner`. :func:`predict_items` drives it over decoded
sources (never mixing a video's frames with other inputs in one batch),
reports every record and every unreadable input, and draws annotated outputs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...data.coco_results import coco_result
from ...data.sources import SourceItem
from ...data.transforms import preprocess
from ..report.annotated import AnnotatedWriter
from ..report.progress import NullReporter, Reporter
from .runner import ModelRunner


@dataclass
class Detection:
    label: str  # class name
    category_id: int  # dataset category id (model.category_ids), or the class index
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original image pixels
    class_index: int = 0  # contiguous model class index (colours)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "category_id": self.category_id,
            "score": round(self.score, 5),
            "box": [round(v, 2) for v in self.box],
        }


@dataclass
class Timing:
    preprocess: float = 0.0  # seconds, summed
    inference: float = 0.0
    postprocess: float = 0.0
    images: int = 0

    def per_image_ms(self) -> dict[str, float]:
        n = max(1, self.images)
        return {
            "preprocess": 1000 * self.preprocess / n,
            "inference": 1000 * self.inference / n,
            "postprocess": 1000 * self.postprocess / n,
        }


class Predictor:
    """Batched inference through ``runner`` with its class mapping and
    per-stage timing (preprocess, inference, postprocess)."""

    def __init__(self, runner: ModelRunner, *, imgsz: int = 800, max_size: int = 1333, conf: float = 0.5,
                 top_k: int = 100, batch_size: int = 1) -> None:  # fmt: skip
        from ...models import postprocess

        self._postprocess = postprocess
        self.runner = runner
        self.device = runner.device
        self.imgsz, self.max_size = imgsz, max_size
        self.conf, self.top_k, self.batch_size = conf, top_k, max(1, batch_size)
        self.class_names: list[str] = list(runner.class_names or [])
        self.category_ids: list[int] | None = runner.category_ids
        self.timing = Timing()
        self.last_batch_ms = 0.0  # per-image wall time of the last batch

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _name(self, index: int) -> str:
        return self.class_names[index] if 0 <= index < len(self.class_names) else str(index)

    def _category(self, index: int) -> int:
        if self.category_ids is not None and 0 <= index < len(self.category_ids):
            return int(self.category_ids[index])
        return index

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """RGB uint8 arrays -> detections per image (score-sorted, original pixels)."""
        if not images:
            return []
        self._sync()
        t0 = time.perf_counter()
        batch, mask, sizes = preprocess(images, self.imgsz, self.max_size)  # [B, 3, H, W], [B, H, W], [B, 2]
        batch, mask = batch.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
        self._sync()
        t1 = time.perf_counter()
        outputs = self.runner(batch, mask)  # pred_logits [B, Q, C], pred_boxes [B, Q, 4]
        t2 = time.perf_counter()
        results = self._postprocess(outputs, sizes.to(outputs["pred_logits"].device), top_k=self.top_k,
                                    score_threshold=self.conf)  # fmt: skip
        per_image: list[list[Detection]] = []
        for res, (h, w) in zip(results, sizes.tolist()):
            scores = res["scores"].cpu().tolist()
            labels = res["labels"].cpu().tolist()
            boxes = res["boxes"].cpu()  # [K, 4] xyxy pixels
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            dets = [
                Detection(self._name(c), self._category(c), float(s), tuple(float(v) for v in b), int(c))
                for s, c, b in zip(scores, labels, boxes.tolist())
            ]
            dets.sort(key=lambda d: -d.score)
            per_image.append(dets)
        self._sync()
        t3 = time.perf_counter()
        n = len(images)
        self.timing.preprocess += t1 - t0
        self.timing.inference += t2 - t1
        self.timing.postprocess += t3 - t2
        self.timing.images += n
        self.last_batch_ms = 1000 * (t3 - t0) / n
        return per_image


def summarize(detections: Sequence[Detection]) -> str:
    """'2 circle, 1 square': counts per class, classes ordered by best score."""
    counts: dict[str, int] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        counts[d.label] = counts.get(d.label, 0) + 1
    return ", ".join(f"{n} {name}" for name, n in counts.items())


@dataclass
class ImageRecord:
    file: str
    width: int
    height: int
    image_id: int
    detections: list[Detection]
    frame: int | None = None
    ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file}
        if self.frame is not None:
            d["frame"] = self.frame
        d.update(
            image_id=self.image_id,
            width=self.width,
            height=self.height,
            detections=[det.to_dict() for det in self.detections],
        )
        return d


@dataclass
class PredictResult:
    run_dir: Path | None  # None when no input could be read (nothing was kept)
    imgsz: int = 0  # shorter side the images were resized to
    device: str = "cpu"
    records: list[ImageRecord] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one-line reasons, naming the input
    speed_ms: dict[str, float] = field(default_factory=dict)
    predictions_json: Path | None = None
    coco_json: Path | None = None
    visualizations: list[Path] = field(default_factory=list)

    def predictions(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.records]

    def coco_results(self) -> list[dict[str, Any]]:
        return [coco_result(rec.image_id, det.category_id, det.box, det.score, rounded=True)
                for rec in self.records for det in rec.detections]  # fmt: skip


class _ImageIds:
    """COCO image ids: a file named like a number keeps it (000000000139.png ->
    139) unless taken; everything else gets the next free id."""

    def __init__(self) -> None:
        self.used: set[int] = set()
        self.next = 1

    def __call__(self, item: SourceItem) -> int:
        stem = item.path.stem
        if not item.is_video and stem.isdigit() and int(stem) not in self.used:
            self.used.add(int(stem))
            return int(stem)
        while self.next in self.used:
            self.next += 1
        self.used.add(self.next)
        return self.next


def predict_items(predictor: Predictor, items: Iterable[SourceItem], result: PredictResult, *,
                  writer: AnnotatedWriter | None = None, reporter: Reporter | None = None) -> PredictResult:
    """Predicts every decoded item into ``result`` (records, failures, speed),
    reporting each record and each unreadable input, and drawing annotated
    outputs through ``writer``."""
    from ...viz import draw_detections

    reporter = reporter or NullReporter()
    image_id = _ImageIds()

    def flush(batch: list[SourceItem]) -> None:
        if not batch:
            return
        for item, dets in zip(batch, predictor.predict_batch([it.image for it in batch])):
            h, w = item.image.shape[:2]
            rec = ImageRecord(str(item.path), w, h, image_id(item), dets, item.frame, predictor.last_batch_ms)
            result.records.append(rec)
            reporter.predict_record(rec)
            if writer is not None:
                writer.add(item, draw_detections(item.image, dets))
        batch.clear()

    batch: list[SourceItem] = []
    for item in items:
        if item.error is not None:
            flush(batch)
            result.failed.append(item.error)
            reporter.predict_error(item.error)
            continue
        if batch and batch[-1].path != item.path and (item.is_video or batch[-1].is_video):
            flush(batch)  # a batch never mixes a video's frames with other inputs
        batch.append(item)
        if len(batch) >= predictor.batch_size:
            flush(batch)
    flush(batch)
    result.speed_ms = predictor.timing.per_image_ms()
    return result
