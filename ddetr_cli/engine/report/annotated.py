"""Annotated prediction outputs in a run folder: one image file per input
image, one mp4 per video (frames in order)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ...data.sources import SourceItem

_VIZ_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
RESERVED = ("predictions.json", "results_coco.json")


class AnnotatedWriter:
    """``add(item, annotated)`` writes ``annotated`` (RGB uint8 [H, W, 3]) for
    ``item``; names never collide with each other or with the JSON outputs.
    ``written`` lists the files; call :meth:`close` at the end."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.used: set[str] = set()
        self.written: list[Path] = []
        self.video: cv2.VideoWriter | None = None
        self.video_src: Path | None = None

    def add(self, item: SourceItem, annotated: np.ndarray) -> None:
        self._frame(item, annotated) if item.is_video else self._image(item, annotated)

    def _unique(self, stem: str, suffix: str) -> Path:
        name, n = f"{stem}{suffix}", 2
        while name in self.used or name in RESERVED:
            name, n = f"{stem}-{n}{suffix}", n + 1
        self.used.add(name)
        return self.run_dir / name

    def _image(self, item: SourceItem, annotated: np.ndarray) -> None:
        suffix = item.path.suffix.lower() if item.path.suffix.lower() in _VIZ_SUFFIXES else ".jpg"
        path = self._unique(item.path.stem, suffix)
        ok, buf = cv2.imencode(suffix, cv2.cvtColor(annotated, cv2.COLOR_RGB2BGR))
        if ok:
            buf.tofile(path)
            self.written.append(path)

    def _frame(self, item: SourceItem, annotated: np.ndarray) -> None:
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
