"""Prediction inputs: image files, folders, globs and videos.

:func:`expand_sources` turns what the user typed into a list of
:class:`SourceEntry` (a path, or a path with the reason it cannot be read);
:func:`iter_sources` decodes the entries lazily, one :class:`SourceItem` per
image or video frame. An unreadable input becomes an item carrying an error,
never an exception, so one bad file does not stop a run.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from ..errors import ImageReadError
from .images import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_image

_GLOB_CHARS = re.compile(r"[*?\[]")


class SourceEntry(NamedTuple):
    path: Path
    error: str | None = None  # why it cannot be read (missing, empty folder, no match)

    @property
    def is_video(self) -> bool:
        return self.error is None and self.path.suffix.lower() in VIDEO_SUFFIXES


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


def expand_sources(sources: Sequence[str], notes: list[str] | None = None) -> list[SourceEntry]:
    """Inputs -> entries: directories (their sorted image and video files),
    globs (sorted image and video files), plain files; a missing input or an
    empty glob/folder gives an entry with an error. What a folder holds besides
    (subfolders, other files) is not read, and ``notes`` gets one line saying so."""
    out: list[SourceEntry] = []
    media = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            children = sorted(p.iterdir())
            files = [f for f in children if f.is_file() and f.suffix.lower() in media]
            subdirs = sum(1 for f in children if f.is_dir())
            others = len(children) - len(files) - subdirs
            if notes is not None and (subdirs or others):
                parts = [f"{subdirs} subfolder(s)"] * bool(subdirs) + [f"{others} other file(s)"] * bool(others)
                notes.append(f"{p}: {' and '.join(parts)} not read (only the folder's own image and video files are)")
            if not files:
                out.append(SourceEntry(p, "folder contains no image or video files (" + ", ".join(sorted(media)) + ")"))
            out.extend(SourceEntry(f) for f in files)
        elif p.exists():
            out.append(SourceEntry(p))
        elif _GLOB_CHARS.search(src):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(src), recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
            if not files:
                out.append(SourceEntry(p, "no image or video files match this pattern"))
            out.extend(SourceEntry(f) for f in files)
        else:
            out.append(SourceEntry(p, "no such file or directory"))
    return out


def count_items(entries: Sequence[SourceEntry]) -> int:
    """Images + video frames (as the containers report them)."""
    total = 0
    for entry in entries:
        if entry.is_video:
            cap = cv2.VideoCapture(str(entry.path))
            total += max(1, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)) if cap.isOpened() else 1
            cap.release()
        else:
            total += 1
    return total


def iter_sources(entries: Sequence[SourceEntry]) -> Iterator[SourceItem]:
    """Yields one ``SourceItem`` per image and per video frame, decoded lazily."""
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
