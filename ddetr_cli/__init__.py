"""ddetr: Deformable DETR object detection (train, evaluate, predict, benchmark).

Heavy modules (torch, the model) load lazily so that ``ddetr --help`` is instant.
"""

from __future__ import annotations

import os

# OpenCV's own warnings ("[ WARN:0@...]") and ffmpeg's ("moov atom not found") would reach the terminal
# directly; an unreadable image or video is reported by ddetr itself, naming the file. Read when OpenCV
# loads / opens its first video; set these variables yourself to see OpenCV's logs.
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "0")  # AV_LOG_PANIC

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from .checkpoints import load_model

        return load_model
    raise AttributeError(f"module 'ddetr_cli' has no attribute {name!r}")
