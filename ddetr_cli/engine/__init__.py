"""Training and evaluation engine: config, loop, checkpoints, COCO evaluation, DDP."""

from __future__ import annotations

from .config import TrainConfig, TrainConfigError, read_config_yaml, resolve
from .evaluate import STAT_NAMES, EvalResult, coco_evaluate, evaluate
from .labelmap import ClassMismatchError, resolve_label_map
from .train import Trainer, TrainingError, TrainResult, build_criterion, train_step

__all__ = [
    "STAT_NAMES",
    "ClassMismatchError",
    "EvalResult",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "build_criterion",
    "coco_evaluate",
    "evaluate",
    "read_config_yaml",
    "resolve",
    "resolve_label_map",
    "train_step",
]
