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

from ...errors import TrainConfigError, TrainingError
from ...models.criterion import BranchCriterion, SetCriterion
from ...models.denoising import DenoisingCriterion, DenoisingQueries
from ...models.hybrid import HybridCriterion, HybridQueries, default_one2many_queries
from ...models.matcher import HungarianMatcher
from ..config import TrainConfig
from ..parts import distributed as dist_utils


def build_criterion(cfg: TrainConfig, num_classes: int) -> SetCriterion | BranchCriterion:
    """The set criterion of ``cfg`` (with the one-to-many branch's losses under
    ``hybrid``, the denoising groups' under ``denoise``)."""
    matcher = HungarianMatcher(cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou, cfg.focal_alpha)
    weights = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
    criterion = SetCriterion(num_classes, matcher, weights, focal_alpha=cfg.focal_alpha, class_loss=cfg.class_loss)
    if cfg.denoise:
        return DenoisingCriterion(criterion, cfg.denoise_weight)
    return HybridCriterion(criterion, cfg.hybrid_k, cfg.hybrid_weight) if cfg.hybrid else criterion


def build_train_module(model: nn.Module, cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> nn.Module:
    """What the training step calls: ``model``, or the model with its training-only
    queries: under ``hybrid`` the one-to-many group
    (:class:`~ddetr_cli.models.hybrid.HybridQueries`), under ``denoise`` the
    denoising groups (:class:`~ddetr_cli.models.denoising.DenoisingQueries`). The
    branch's own parameters (if any) join ``optimizer`` at ``lr``."""
    if cfg.denoise:
        if not model.config.two_stage:
            raise TrainConfigError("denoise: needs a two-stage model (set `variant: two-stage`, or turn denoise off)",
                                   param="denoise")
        module = DenoisingQueries(model, model.config.num_classes, cfg.denoise_groups, cfg.denoise_box_noise,
                                  cfg.denoise_label_noise)
    elif cfg.hybrid:
        module = HybridQueries(model, default_one2many_queries(model.config.num_queries, cfg.hybrid_queries))
    else:
        return model
    module.to(next(model.parameters()).device)
    if module.extra_parameters():
        optimizer.add_param_group({"params": module.extra_parameters(), "lr": cfg.lr, "base_lr": cfg.lr, "name": "main"})
    return module


def branch_state(module: nn.Module) -> dict | None:
    """The training-only state of a :func:`build_train_module` result (for
    ``last.pt``, never ``best.pt``): None for a plain model."""
    if not isinstance(module, (HybridQueries, DenoisingQueries)):
        return None
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if not k.startswith("model.")}


def load_branch_state(module: nn.Module, state: dict | None) -> None:
    if isinstance(module, (HybridQueries, DenoisingQueries)) and state:
        module.load_state_dict(state, strict=False)


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
        if getattr(getattr(model, "module", model), "wants_targets", False):  # (DDP wraps the module)
            outputs = model(images, mask, targets)
        else:
            outputs = model(images, mask)
    if not aux_loss:
        outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        for branch in ("one2many", "denoise"):
            if branch in outputs:
                outputs[branch] = {k: v for k, v in outputs[branch].items() if k != "aux_outputs"}
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
