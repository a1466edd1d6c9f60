"""ddetr: Deformable DETR object detection (train, evaluate, predict, benchmark).

Heavy modules (torch, the model) load lazily so that ``ddetr --help`` is instant.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from .checkpoints import load_model

        return load_model
    raise AttributeError(f"module 'ddetr_cli' has no attribute {name!r}")
