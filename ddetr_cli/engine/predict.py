"""Inference on images, folders, globs and videos.

``iter_sources`` expands the inputs and decodes them lazily (one item per image
or video frame; an unreadable input becomes an item carrying an error, never an
exception). ``Predictor`` batches RGB arrays through the model with per-stage
timing. ``run_predict`` ties them together and writes a fresh run directory::

    predictions.json       [{file, frame?, image_id, width, height, detections: [...]}, ...]
    results_coco.json      optional, COCO results format
    <name>.<ext>           optional annotated images / <video>.mp4 annotated videos
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..checkpoints.io import atomic_write_text
from ..data.images import IMAGE_SUFFIXES, VIDEO_SUFFIXES, ImageReadError, read_image
from ..data.transforms import preprocess

_GLOB_CHARS = re.compile(r"[*?\[]")
_VIZ_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


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
class SourceItem:
    """One image or video frame. ``image`` is RGB uint8 [H, W, 3], or None
    with ``error`` set when the input could not be read."""

    path: Path
    image: np.ndarray | None = None
    error: str | None = None
    frame: int | None = None  # video frame index
    frames: int | None = None  # video frame count (from the container; may be 0)
    fps: float | None = None

    @property
    def is_video(self) -> bool:
        return self.frame is not None

    @property
    def name(self) -> str:
        return f"{self.path} frame {self.frame}" if self.is_video else str(self.path)


def expand_sources(sources: Sequence[str]) -> list[tuple[Path, str | None]]:
    """Inputs -> [(path, error)]: directories (sorted image files), globs
    (sorted image and video files), plain files; a missing input or an empty
    glob/folder gives an entry with an error."""
    out: list[tuple[Path, str | None]] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                out.append((p, "folder contains no image files (" + ", ".join(sorted(IMAGE_SUFFIXES)) + ")"))
            out.extend((f, None) for f in files)
        elif p.exists():
            out.append((p, None))
        elif _GLOB_CHARS.search(src):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(src), recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
            if not files:
                out.append((p, "no image or video files match this pattern"))
            out.extend((f, None) for f in files)
        else:
            out.append((p, "no such file or directory"))
    return out


def count_items(entries: Sequence[tuple[Path, str | None]]) -> int:
    """Images + video frames (as the containers report them)."""
    total = 0
    for path, error in entries:
        if error is None and path.suffix.lower() in VIDEO_SUFFIXES:
            cap = cv2.VideoCapture(str(path))
            total += max(1, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)) if cap.isOpened() else 1
            cap.release()
        else:
            total += 1
    return total


def iter_sources(sources: Sequence[str] | Sequence[tuple[Path, str | None]]) -> Iterator[SourceItem]:
    """Yields one ``SourceItem`` per image and per video frame, decoded lazily."""
    entries = sources if sources and isinstance(sources[0], tuple) else expand_sources(sources)  # type: ignore[arg-type]
    for path, error in entries:
        if error is not None:
            yield SourceItem(path, error=f"{path}: {error}")
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            yield from _iter_video(path)
        else:
            try:
                yield SourceItem(path, image=read_image(path))
            except ImageReadError as exc:
                yield SourceItem(path, error=str(exc))


def _iter_video(path: Path) -> Iterator[SourceItem]:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            yield SourceItem(path, error=f"{path}: cannot open video")
            return
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or 25.0
        index = 0
        while True:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            yield SourceItem(path, image=cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), frame=index, frames=frames, fps=fps)
            index += 1
        if index == 0:
            yield SourceItem(path, error=f"{path}: no decodable frames in video")
    finally:
        cap.release()


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
    """Batched inference with the model's class mapping and per-stage timing."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device | str = "cpu",
        imgsz: int = 800,
        max_size: int = 1333,
        conf: float = 0.5,
        top_k: int = 100,
        batch_size: int = 1,
        amp: bool = False,
    ):
        from ..models import postprocess

        self._postprocess = postprocess
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.imgsz, self.max_size = imgsz, max_size
        self.conf, self.top_k, self.batch_size = conf, top_k, max(1, batch_size)
        self.class_names: list[str] = list(getattr(model, "class_names", None) or [])
        self.category_ids: list[int] | None = getattr(model, "category_ids", None)
        self.amp_dtype = None
        if amp:
            from .amp import amp_dtype

            self.amp_dtype = amp_dtype("auto" if self.device.type == "cuda" else "bf16", self.device)
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
        batch, mask, sizes = preprocess(images, self.imgsz, self.max_size)  # [B,3,H,W], [B,H,W], [B,2]
        batch, mask = batch.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
        self._sync()
        t1 = time.perf_counter()
        if self.amp_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                outputs = self.model(batch, mask)
        else:
            outputs = self.model(batch, mask)
        self._sync()
        t2 = time.perf_counter()
        results = self._postprocess(
            {"pred_logits": outputs["pred_logits"].float(), "pred_boxes": outputs["pred_boxes"].float()},
            sizes.to(self.device),
            top_k=self.top_k,
            score_threshold=self.conf,
        )
        per_image: list[list[Detection]] = []
        for res, (h, w) in zip(results, sizes.tolist()):
            scores = res["scores"].cpu().tolist()
            labels = res["labels"].cpu().tolist()
            boxes = res["boxes"].cpu()
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


def fresh_run_dir(out: str | os.PathLike | None = None, project: str | os.PathLike = "runs/predict") -> Path:
    """``out`` if it is new or an empty folder, else ``out-2``, ``out-3``...;
    without ``out``: ``project/N`` with N one past the highest number there.
    The folder is created; an existing non-empty run is never reused."""
    if out is not None:
        base = Path(out).expanduser()
        candidates = (base if n == 1 else base.with_name(f"{base.name}-{n}") for n in range(1, 10_000))
    else:
        root = Path(project)
        existing = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
        start = max(existing, default=0) + 1
        candidates = (root / str(n) for n in range(start, start + 10_000))
    for cand in candidates:
        if cand.is_dir() and not any(cand.iterdir()):
            return cand
        try:
            cand.mkdir(parents=True, exist_ok=False)
            return cand
        except FileExistsError:
            continue
    raise OSError(f"{out or project}: could not find a free run folder name")


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
    run_dir: Path
    records: list[ImageRecord] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one-line reasons, naming the input
    speed_ms: dict[str, float] = field(default_factory=dict)
    predictions_json: Path | None = None
    coco_json: Path | None = None
    visualizations: list[Path] = field(default_factory=list)

    def predictions(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.records]


class _VizWriter:
    """Annotated outputs in the run folder: one file per image, one mp4 per video."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.used: set[str] = set()
        self.written: list[Path] = []
        self.video: cv2.VideoWriter | None = None
        self.video_src: Path | None = None

    def _unique(self, stem: str, suffix: str) -> Path:
        name, n = f"{stem}{suffix}", 2
        while name in self.used or name in ("predictions.json", "results_coco.json"):
            name, n = f"{stem}-{n}{suffix}", n + 1
        self.used.add(name)
        return self.run_dir / name

    def image(self, item: SourceItem, annotated: np.ndarray) -> None:
        suffix = item.path.suffix.lower() if item.path.suffix.lower() in _VIZ_SUFFIXES else ".jpg"
        path = self._unique(item.path.stem, suffix)
        ok, buf = cv2.imencode(suffix, cv2.cvtColor(annotated, cv2.COLOR_RGB2BGR))
        if ok:
            buf.tofile(path)
            self.written.append(path)

    def frame(self, item: SourceItem, annotated: np.ndarray) -> None:
        if self.video_src != item.path:
            self.close()
            path = self._unique(item.path.stem, ".mp4")
            h, w = annotated.shape[:2]
            self.video = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), item.fps or 25.0, (w, h))
            self.video_src = item.path
            if self.video.isOpened():
                self.written.append(path)
            else:
                self.video = None
        if self.video is not None:
            self.video.write(cv2.cvtColor(annotated, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self.video is not None:
            self.video.release()
        self.video, self.video_src = None, None


def run_predict(
    predictor: Predictor,
    sources: Sequence[str],
    *,
    run_dir: Path,
    viz: bool = False,
    coco_json: bool = False,
    on_record: Callable[[ImageRecord], None] | None = None,
    on_error: Callable[[str], None] | None = None,
    entries: Sequence[tuple[Path, str | None]] | None = None,
) -> PredictResult:
    """Predicts every input, calling ``on_record`` per image/frame and
    ``on_error`` per unreadable input, and writes the outputs into ``run_dir``
    (see ``fresh_run_dir``)."""
    from ..viz import draw_detections

    run_dir.mkdir(parents=True, exist_ok=True)
    result = PredictResult(run_dir=run_dir)
    writer = _VizWriter(run_dir) if viz else None
    next_id = 1
    used_ids: set[int] = set()

    def image_id_for(item: SourceItem) -> int:
        nonlocal next_id
        stem = item.path.stem
        if not item.is_video and stem.isdigit() and int(stem) not in used_ids:
            used_ids.add(int(stem))
            return int(stem)
        while next_id in used_ids:
            next_id += 1
        used_ids.add(next_id)
        return next_id

    def flush(batch: list[SourceItem]) -> None:
        if not batch:
            return
        dets_per_image = predictor.predict_batch([it.image for it in batch])
        for item, dets in zip(batch, dets_per_image):
            h, w = item.image.shape[:2]
            rec = ImageRecord(str(item.path), w, h, image_id_for(item), dets, item.frame, predictor.last_batch_ms)
            result.records.append(rec)
            if on_record is not None:
                on_record(rec)
            if writer is not None:
                annotated = draw_detections(item.image, dets)
                writer.frame(item, annotated) if item.is_video else writer.image(item, annotated)
        batch.clear()

    batch: list[SourceItem] = []
    try:
        for item in iter_sources(entries if entries is not None else list(sources)):
            if item.error is not None:
                flush(batch)
                result.failed.append(item.error)
                if on_error is not None:
                    on_error(item.error)
                continue
            if batch and batch[-1].path != item.path and (item.is_video or batch[-1].is_video):
                flush(batch)  # a batch never mixes a video's frames with other inputs
            batch.append(item)
            if len(batch) >= predictor.batch_size:
                flush(batch)
        flush(batch)
    finally:
        if writer is not None:
            writer.close()

    result.speed_ms = predictor.timing.per_image_ms()
    result.predictions_json = atomic_write_text(run_dir / "predictions.json", json.dumps(result.predictions(), indent=1))
    if coco_json:
        coco = [
            {
                "image_id": rec.image_id,
                "category_id": det.category_id,
                "bbox": [round(det.box[0], 2), round(det.box[1], 2),
                         round(det.box[2] - det.box[0], 2), round(det.box[3] - det.box[1], 2)],
                "score": round(det.score, 5),
            }  # fmt: skip
            for rec in result.records
            for det in rec.detections
        ]
        result.coco_json = atomic_write_text(run_dir / "results_coco.json", json.dumps(coco))
    if writer is not None:
        result.visualizations = writer.written
    return result
