"""Training checkpoint files.

A training checkpoint is the model payload of
:func:`ddetr_cli.checkpoints.native.model_payload` (so every reader of model
checkpoints accepts it) plus the state needed to continue exactly: optimizer,
lr schedule, AMP grad scaler, EMA, epoch, global step, step within the epoch,
RNG states (python, numpy, torch, cuda) and the resolved training config.
Writes are atomic: a crash mid-save leaves the previous file intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...checkpoints.io import CheckpointError, atomic_torch_save, remove_stale_temps, safe_torch_load

__all__ = ["TRAIN_KEYS", "load_train_checkpoint", "remove_stale_temps", "save_checkpoint"]

TRAIN_KEYS = ("optimizer", "epoch", "global_step", "train_config")


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Atomic save: the previous file survives a crash mid-write."""
    return atomic_torch_save(payload, path)


def load_train_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a training checkpoint; errors name the file and the missing key."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a training checkpoint (top level is {type(ckpt).__name__})")
    missing = [k for k in (*TRAIN_KEYS, "model") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: not a resumable training checkpoint (missing {', '.join(missing)}); "
            "fine-tune from its model weights (`weights`) instead",
            param="resume",
        )
    return ckpt
