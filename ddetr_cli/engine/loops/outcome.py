"""How a training run ended: :class:`TrainResult` when it returns,
:class:`TrainingInterrupted` when a signal stopped it after a save."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .evaluate import EvalResult


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGUSR1 during training, after ``last.pt`` was saved
    between two steps. ``signal_name``: the signal ("SIGINT", "SIGTERM", ...)."""

    def __init__(self, checkpoint: Path, signal_name: str = "SIGINT") -> None:
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint
        self.signal_name = signal_name


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    global_step: int
    best_ap: float
    last_eval: EvalResult | None
    stopped_early: str | None = None  # "time limit" | "max iters" | None
    history: list[dict[str, Any]] = field(default_factory=list)
