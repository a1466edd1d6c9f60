"""Built-in training recipes: defaults that a named dataset brings along, between
the dataclass defaults and the user's own layers (see :func:`.config.resolve`)."""

from __future__ import annotations

from typing import Any

# Tuned for the synthetic `shapes` dataset (128-px images, 1-4 shapes, 3 classes)
# and `--time-limit 20` on a CPU with the tiny preset: small batches for many
# updates, full lr for the from-scratch backbone (every stage trained, learnt batch norm), no crops,
# 78-128 px scales (those of imgsz 128), a short warm-up, EMA
# weights for evaluation, denoising queries; with a time limit the lr drops at 80% of the budget.
SHAPES_RECIPE: dict[str, Any] = {
    "model": "tiny",
    "imgsz": 128,  # the other sizes follow it (derived_sizes)
    "crop": False,
    "batch_size": 8,
    "lr": 4e-4,
    "lr_backbone": 4e-4,  # the backbone starts from scratch here (no ImageNet weights): full lr
    "epochs": 60,
    "warmup_iters": 200,
    "ema": True,
    "ema_decay": 0.999,
    "ema_warmup": 500,
    "workers": 2,
    "denoise": True,  # DINO's contrastive denoising groups: AP 0.797 against 0.782 in 20 minutes (README)
    "name": "shapes",
}
