"""Hungarian matching between predicted queries and ground-truth boxes.

The cost of assigning query ``q`` to target ``t`` is (Deformable DETR defaults)::

    cost = 2 * focal_class_cost + 5 * L1(cxcywh) + 2 * (-GIoU)

with the focal class cost ``pos - neg`` at the target class, where
``pos = a (1-p)^g (-log p)`` and ``neg = (1-a) p^g (-log(1-p))``, a = 0.25, g = 2.
The cost matrix is computed once for the whole batch and split per image
before ``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import MatchingError
from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


Indices = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class HungarianMatcher:
    """Callable: ``matcher(outputs, targets) -> [(pred_idx, tgt_idx) per image]``.

    outputs: ``pred_logits`` [B, Q, C] (sigmoid logits), ``pred_boxes`` [B, Q, 4]
    cxcywh in [0, 1]. targets: B dicts with ``labels`` [T_b] int64 and ``boxes``
    [T_b, 4] cxcywh. Each returned pair is two int64 CPU tensors of length
    min(Q, T_b); pred_idx is sorted ascending.
    """

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        if self.cost_class == 0 and self.cost_bbox == 0 and self.cost_giou == 0:
            raise ValueError("matcher: all costs are 0")

    def cost_matrix(self, outputs: dict, targets: list[dict]) -> torch.Tensor:
        """Returns the batched cost [B*Q, sum(T_b)] (float32)."""
        logits = outputs["pred_logits"].float()
        B, Q, _ = logits.shape
        prob = logits.flatten(0, 1).sigmoid()  # [B*Q, C]
        boxes = outputs["pred_boxes"].float().flatten(0, 1)  # [B*Q, 4]
        tgt_ids = torch.cat([t["labels"] for t in targets]).to(prob.device).long()  # [T]
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes.device).float()  # [T, 4]

        a, g, eps = self.focal_alpha, self.focal_gamma, 1e-8
        neg = (1 - a) * prob.pow(g) * (-(1 - prob + eps).log())  # [B*Q, C]
        pos = a * (1 - prob).pow(g) * (-(prob + eps).log())  # [B*Q, C]
        c_class = pos[:, tgt_ids] - neg[:, tgt_ids]  # [B*Q, T]
        c_bbox = torch.cdist(boxes, tgt_boxes, p=1)  # [B*Q, T]
        c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))  # [B*Q, T]
        return self.cost_bbox * c_bbox + self.cost_class * c_class + self.cost_giou * c_giou

    @torch.no_grad()
    def __call__(self, outputs: dict, targets: list[dict]) -> Indices:
        B, Q = outputs["pred_logits"].shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]
        cost = self.cost_matrix(outputs, targets).view(B, Q, -1).cpu()  # [B, Q, T]
        if not torch.isfinite(cost).all():
            bad = int((~torch.isfinite(cost)).sum())
            raise MatchingError(
                f"matching cost has {bad} non-finite value(s): predictions contain NaN/inf "
                "(training diverged; try a lower learning rate or disable fp16 AMP)"
            )
        indices: Indices = []
        for b, chunk in enumerate(cost.split(sizes, -1)):
            if sizes[b] == 0:
                indices.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(chunk[b].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(np.asarray(cols), dtype=torch.int64)))
        return indices
