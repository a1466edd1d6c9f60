"""AdamW with the official Deformable DETR parameter groups."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..config import TrainConfig

LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def base_lrs(cfg: TrainConfig) -> dict[str, float]:
    """The base learning rate of each parameter group, by group name (the
    official rule: the backbone at ``lr_backbone``, the sampling-offset and
    reference-point projections at ``lr * lr_linear_proj_mult``)."""
    return {"main": cfg.lr, "backbone": cfg.lr_backbone, "linear_proj": cfg.lr * cfg.lr_linear_proj_mult}


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Three groups: the rest (``lr``), the backbone (names starting ``backbone.0``,
    ``lr_backbone``; frozen when it is 0) and the sampling-offset / reference-point
    projections (``lr * lr_linear_proj_mult``). Each group records ``base_lr``."""
    main, backbone, proj = [], [], []
    for name, p in model.named_parameters():
        if name.startswith("backbone.0"):
            if cfg.lr_backbone <= 0:
                p.requires_grad_(False)
                continue
            if p.requires_grad:
                backbone.append(p)
        elif not p.requires_grad:
            continue
        elif any(k in name for k in LINEAR_PROJ_NAMES):
            proj.append(p)
        else:
            main.append(p)
    lrs = base_lrs(cfg)
    groups = [{"params": params, "lr": lrs[name], "base_lr": lrs[name], "name": name}
              for name, params in (("main", main), ("backbone", backbone), ("linear_proj", proj))]  # fmt: skip
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused implementation (one kernel over
    all parameters) when they all live on the CPU or a CUDA device, where PyTorch
    has one: on a CPU its default is a Python loop over the tensors."""
    groups = param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
