"""Training and evaluation engine: config, loop, checkpoints, COCO evaluation, DDP.

:func:`run_training` and :func:`run_evaluation` are what ``ddetr train`` and
``ddetr eval`` call; scripts call them the same way.
"""

from __future__ import annotations

from .config import TrainConfig, TrainConfigError, read_config_yaml, resolve
from .device import DeviceError, resolve_device
from .evaluate import STAT_NAMES, EvalResult, coco_evaluate, evaluate
from .labelmap import ClassMismatchError, resolve_label_map
from .run_eval import EvalRun, run_evaluation
from .run_train import RunError, run_training
from .train import Trainer, TrainingError, TrainingInterrupted, TrainResult, build_criterion, train_step

__all__ = [
    "STAT_NAMES",
    "ClassMismatchError",
    "DeviceError",
    "EvalResult",
    "EvalRun",
    "RunError",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "TrainingInterrupted",
    "build_criterion",
    "coco_evaluate",
    "evaluate",
    "read_config_yaml",
    "resolve",
    "resolve_device",
    "resolve_label_map",
    "run_evaluation",
    "run_training",
    "train_step",
]
