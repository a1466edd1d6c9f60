"""Training checkpoints and run folders.

A training checkpoint is the model payload of
:func:`ddetr_cli.checkpoints.native.model_payload` (so every reader of model
checkpoints accepts it) plus the state needed to continue exactly: optimizer,
lr schedule, AMP grad scaler, EMA, epoch, global step, step within the epoch,
RNG states (python, numpy, torch, cuda) and the resolved training config.
Writes are atomic: a crash mid-save leaves the previous file intact.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints.io import CheckpointError, atomic_torch_save, safe_torch_load

TRAIN_KEYS = ("optimizer", "epoch", "global_step", "train_config")


def capture_rng_state() -> dict[str, Any]:
    """RNG states as weights_only-loadable objects (tensors, lists, numbers)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


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
            "use --weights to fine-tune from model weights instead"
        )
    return ckpt


def next_run_dir(project: str | Path, name: str) -> Path:
    """``project/name``, or ``name2``, ``name3``, ... when taken; created empty."""
    project = Path(project)
    project.mkdir(parents=True, exist_ok=True)
    base = name
    m = re.fullmatch(r"(.*?)(\d+)", name)
    n = 1
    candidate = project / base
    while True:
        try:
            candidate.mkdir(parents=False, exist_ok=False)
            return candidate
        except FileExistsError:
            n += 1
            candidate = project / f"{base}{n}" if not m else project / f"{base}_{n}"
