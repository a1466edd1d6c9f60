"""One optimisation step, and the criterion it minimises.

``train_step`` is shared by the training loop, the DDP equivalence test and
the training benchmark: forward (under autocast when asked), the set loss,
backward (through the AMP grad scaler when asked), gradient clipping and the
optimizer step. A non-finite loss stops before the weights are touched, on
every process at once.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import TrainingError
from ...models.criterion import SetCriterion
from ...models.matcher import HungarianMatcher
from ..config import TrainConfig
from ..parts import distributed as dist_utils


def build_criterion(cfg: TrainConfig, num_classes: int) -> SetCriterion:
    matcher = HungarianMatcher(cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou, cfg.focal_alpha)
    weights = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
    return SetCriterion(num_classes, matcher, weights, focal_alpha=cfg.focal_alpha)


def move_targets(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]


def train_step(
    model: nn.Module,
    criterion: SetCriterion,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    mask: torch.Tensor,
    targets: list[dict],
    *,
    clip_max_norm: float = 0.1,
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    aux_loss: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """One optimisation step. images [B, 3, H, W], mask [B, H, W] (True = pad).
    Returns (weighted total loss, unweighted loss terms, grad norm before clipping).
    Raises :class:`TrainingError` on a non-finite loss before touching the weights."""
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        outputs = model(images, mask)
    if not aux_loss:
        outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
    losses = criterion(outputs, targets)  # fp32
    total = criterion.weighted_total(losses)
    finite = torch.isfinite(total.detach()).float()
    dist_utils.all_reduce_mean(finite)  # every rank must agree to stop
    if finite.item() < 1.0:
        raise TrainingError("non-finite loss: " + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items() if k.startswith("loss") and "_" not in k[5:]))
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    if clip_max_norm > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip_max_norm))
    else:
        norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return total.detach(), {k: v.detach() for k, v in losses.items()}, norm
