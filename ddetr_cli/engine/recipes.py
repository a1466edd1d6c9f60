"""Built-in training recipes: defaults that a named dataset brings along, between
the dataclass defaults and the user's own layers (see :func:`.config.resolve`)."""

from __future__ import annotations

from typing import Any

# Tuned for the synthetic `shapes` dataset (128-px images, 1-4 shapes, 3 classes)
# and `--time-limit 20` on a CPU with the tiny preset: small batches for many
# updates, full lr for the from-scratch backbone (every stage trained, learnt batch norm), no crops,
# one scale (128 px: every image of the set has that size), a short warm-up, EMA
# weights for evaluation, denoising queries; with a time limit the lr drops at 90% of the budget
# (the drop's gain comes within ~250 steps, while the full lr still gains fast: README).
SHAPES_RECIPE: dict[str, Any] = {
    "model": "tiny",
    "imgsz": 128,  # the other sizes follow it (derived_sizes)
    "crop": False,
    "multi_scale": False,  # AP 0.881 against 0.785 with the 78-128 px scales of imgsz 128 (README)
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
    "time_lr_drop": 0.9,  # AP 0.785 against 0.737 at 0.8, same day (README)
    "name": "shapes",
}

# A recipe's key gives way (back to the dataclass default) when the user sets one of its rivals:
# denoising does not combine with hybrid matching, one training scale with a range of scales.
RECIPE_YIELDS: dict[str, tuple[str, ...]] = {"denoise": ("hybrid",), "multi_scale": ("min_scale", "scale_step")}
