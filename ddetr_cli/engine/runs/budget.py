"""The time budget of a run (``time_limit`` minutes).

A time-boxed run drops the learning rate x0.1 at a share of the budget
(``time_lr_drop``, 80 % unless set) and stops
early enough to finish its final validation inside it. Until the first
validation has been timed, its cost is guessed from the training speed (a
forward pass is about a third of a training step; with a x1.5 margin).
"""

from __future__ import annotations

import math
import time


class TimeBudget:
    def __init__(self, minutes: float | None, val_batches: int, drop_at: float = 0.8) -> None:
        self.limit_s = minutes * 60 if minutes else None
        self.drop_at = drop_at  # share of the budget spent when the lr drops
        self.val_batches = val_batches  # validation batches on this process
        self.start = time.perf_counter()
        self.eval_cost = 0.0  # seconds of the last validation (0: not timed yet)
        self.eval_guess = 0.0  # what the final validation is expected to cost

    @property
    def limited(self) -> bool:
        return self.limit_s is not None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def note_steps(self, step_s: float) -> None:
        """After a training step: ``step_s`` is the mean compute time per step."""
        if self.eval_cost == 0.0:
            self.eval_guess = 0.5 * step_s * self.val_batches
        else:
            self.eval_guess = self.eval_cost

    def note_eval(self, seconds: float) -> None:
        self.eval_cost = seconds

    def drop_due(self) -> bool:
        """``drop_at`` of the budget (less the final validation) is spent."""
        return self.limit_s is not None and self.elapsed() > self.drop_at * self.limit_s - self.eval_guess

    def exhausted(self) -> bool:
        """One more step would leave no time for the final validation."""
        return self.limit_s is not None and self.elapsed() + self.eval_guess > self.limit_s


def val_batches(n_images: int, batch_size: int, world_size: int) -> int:
    return math.ceil(n_images / (batch_size * world_size))
