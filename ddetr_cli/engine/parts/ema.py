"""Exponential moving average of model weights (with a decay warm-up)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """Keeps ``ema = d * ema + (1 - d) * model`` after each optimizer step, with
    ``d = decay * (1 - exp(-updates / warmup))`` so early averages follow the
    model closely. Buffers are copied as-is."""

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: int = 2000, updates: int = 0) -> None:
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmup = max(1, warmup)
        self.updates = updates

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.warmup))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        src = _unwrap(model).state_dict()
        averaged, latest = [], []
        for name, value in self.module.state_dict().items():
            new = src[name].detach()
            if value.dtype.is_floating_point:
                averaged.append(value)
                latest.append(new.to(value.dtype))
            else:
                value.copy_(new)
        if averaged:  # ema + (1 - d) * (new - ema), one fused call over all tensors (not two per tensor)
            torch._foreach_lerp_(averaged, latest, 1 - d)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state.get("updates", 0))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
