"""Learning-rate schedule: optional linear warm-up, then a single x0.1 step
drop (official Deformable DETR: epoch 40 of 50).

The learning rate is a pure function of (epoch, global step), so resuming or
extending a run (new ``epochs`` / ``lr_drop``) just rebuilds this object.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class StepWarmupSchedule:
    lr_drop: int  # first epoch run at the reduced rate
    warmup_iters: int = 0
    gamma: float = 0.1
    warmup_start: float = 0.001

    def factor(self, epoch: int, step: int) -> float:
        """Multiplier of each group's base lr at ``epoch`` (0-based) and global ``step``."""
        f = self.gamma if epoch >= self.lr_drop else 1.0
        if self.warmup_iters > 0 and step < self.warmup_iters:
            alpha = step / self.warmup_iters
            f *= self.warmup_start * (1 - alpha) + alpha
        return f

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> float:
        """Sets every group's lr; returns the main (first group) lr."""
        f = self.factor(epoch, step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * f
        return optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return asdict(self)
