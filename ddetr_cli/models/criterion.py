"""Set-prediction loss of Deformable DETR.

The matcher assigns queries to targets once per decoder layer; each ``loss_*``
method then computes unweighted terms with one signature
``(outputs, targets, indices, num_boxes) -> dict``. Weights live in
``weight_dict`` and are applied by :meth:`SetCriterion.weighted_total`, outside
the loss functions. Auxiliary decoder layers get the suffix ``_{i}``; the
two-stage encoder proposals get ``_enc`` and class-agnostic targets (every
label 0, as in the official implementation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from .matcher import HungarianMatcher, Indices

CLASS_LOSSES = ("focal", "varifocal")


def sigmoid_focal_loss(logits: torch.Tensor, onehot: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Element-wise focal loss. logits, onehot [B, Q, C] -> loss [B, Q, C]."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * onehot + (1 - alpha) * (1 - onehot)) * loss
    return loss


def varifocal_loss(logits: torch.Tensor, quality: torch.Tensor, alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """Element-wise IoU-aware (varifocal) loss. logits [B, Q, C]; quality [B, Q, C]:
    the matched query's IoU with its target at the target's class, else 0.
    Positives learn their IoU as the score (weighted by it); negatives are
    down-weighted as in the focal loss, alpha * p^gamma."""
    prob = logits.sigmoid().detach()
    positive = (quality > 0).to(logits.dtype)
    weight = alpha * prob.pow(gamma) * (1 - positive) + quality
    return F.binary_cross_entropy_with_logits(logits, quality, weight=weight, reduction="none")


def default_weight_dict(cls: float = 2.0, bbox: float = 5.0, giou: float = 2.0) -> dict[str, float]:
    return {"loss_ce": cls, "loss_bbox": bbox, "loss_giou": giou}


def count_boxes(targets: list[dict], device: torch.device) -> float:
    """Number of target boxes averaged over processes (all-reduced under DDP), >= 1."""
    n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        world = torch.distributed.get_world_size()
    return max(float(n.item()) / world, 1.0)


class SetCriterion(nn.Module):
    """``criterion(outputs, targets) -> {name: unweighted scalar}``.

    outputs: ``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4] cxcywh, optional
    ``aux_outputs`` (list of the same per earlier decoder layer) and
    ``enc_outputs`` (two-stage proposals). targets: B dicts with ``labels``
    [T_b] and ``boxes`` [T_b, 4] cxcywh normalized. Outputs are cast to fp32.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        weight_dict: dict[str, float] | None = None,
        losses: tuple[str, ...] = ("labels", "boxes", "cardinality"),
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        class_loss: str = "focal",
    ) -> None:
        super().__init__()
        if class_loss not in CLASS_LOSSES:
            raise ValueError(f"class loss {class_loss!r} is not one of {', '.join(CLASS_LOSSES)}")
        self.class_loss = class_loss
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        base = dict(weight_dict or default_weight_dict())
        self.base_weights = base
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.loss_table: dict[str, Callable[..., dict]] = {
            "labels": self.loss_labels,
            "boxes": self.loss_boxes,
            "cardinality": self.loss_cardinality,
        }
        unknown = [name for name in losses if name not in self.loss_table]
        if unknown:
            raise ValueError(f"unknown loss(es): {', '.join(unknown)} (known: {', '.join(self.loss_table)})")
        self.losses = tuple(losses)

    # ----------------------------------------------------------------- terms
    @staticmethod
    def _matched(indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src = torch.cat([src for src, _ in indices])
        return batch, src

    def loss_labels(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float) -> dict:
        """Sigmoid focal loss summed over [B, Q, C], / num_boxes (official:
        mean over queries * Q / num_boxes). Under ``class_loss="varifocal"`` the
        matched class's target is the (detached) IoU of the query's box with its
        target, so scores rank boxes by localisation quality (VarifocalNet;
        RT-DETR's IoU-aware query selection when applied to the encoder)."""
        logits = outputs["pred_logits"]  # [B, Q, C]
        B, Q, C = logits.shape
        batch, src = self._matched(indices)
        batch, src = batch.to(logits.device), src.to(logits.device)
        tgt = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device).long()  # [M]
        onehot = torch.zeros_like(logits)  # [B, Q, C]
        onehot[batch, src, tgt] = 1.0
        if self.class_loss == "varifocal":
            with torch.no_grad():
                pred = outputs["pred_boxes"][batch, src]  # [M, 4]
                boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(pred)  # [M, 4]
                iou = torch.diag(box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(boxes))[0]) if len(tgt) else pred.new_zeros(0)
            quality = torch.zeros_like(logits)  # [B, Q, C]
            quality[batch, src, tgt] = iou.clamp(min=1e-6).to(logits.dtype)
            loss = varifocal_loss(logits, quality, gamma=self.focal_gamma)  # [B, Q, C]
        else:
            loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma)  # [B, Q, C]
        out = {"loss_ce": loss.mean(1).sum() / num_boxes * Q}
        with torch.no_grad():
            if len(tgt):
                acc = (logits[batch, src].argmax(-1) == tgt).float().mean() * 100
                out["class_error"] = 100 - acc
            else:
                out["class_error"] = logits.new_zeros(())
        return out

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float) -> dict:
        """L1 on cxcywh and 1 - GIoU for matched pairs, each summed / num_boxes."""
        batch, src = self._matched(indices)
        pred = outputs["pred_boxes"][batch.to(outputs["pred_boxes"].device), src.to(outputs["pred_boxes"].device)]  # [M, 4]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(pred).float()  # [M, 4]
        l1 = F.l1_loss(pred, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt)))  # [M]
        return {"loss_bbox": l1, "loss_giou": (1 - giou).sum() / num_boxes}

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float) -> dict:
        """Logging only: |#queries with max score > 0.5 - #targets|, mean over images."""
        logits = outputs["pred_logits"]
        n_pred = (logits.sigmoid().amax(-1) > 0.5).sum(1).float()  # [B]
        n_tgt = torch.as_tensor([float(len(t["labels"])) for t in targets], device=logits.device)  # [B]
        return {"cardinality_error": (n_pred - n_tgt).abs().mean()}

    # --------------------------------------------------------------- driver
    @property
    def weight_dict(self) -> dict[str, float]:
        return self.base_weights

    def weight_for(self, key: str) -> float:
        """Weight of a (possibly suffixed) loss key; 0 for logging-only terms."""
        for base, w in self.base_weights.items():
            rest = key[len(base) + 1 :] if key.startswith(base + "_") else None
            if key == base or (rest is not None and (rest.isdigit() or rest == "enc")):
                return w
        return 0.0

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of weight * term over every weighted key (aux and enc included)."""
        terms = [losses[k] * self.weight_for(k) for k in losses if self.weight_for(k) != 0]
        return torch.stack(terms).sum()

    def _apply(self, outputs: dict, targets: list[dict], num_boxes: float, suffix: str) -> dict:
        indices = self.matcher(outputs, targets)
        out: dict[str, torch.Tensor] = {}
        for name in self.losses:
            for key, value in self.loss_table[name](outputs, targets, indices, num_boxes).items():
                out[key + suffix] = value
        return out

    def losses_for(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float) -> dict:
        """The class and box terms under a known assignment (no matching), e.g.
        for denoising queries."""
        outputs = _to_float(outputs)
        out: dict[str, torch.Tensor] = {}
        for name in ("labels", "boxes"):
            if name in self.losses:
                out.update(self.loss_table[name](outputs, targets, indices, num_boxes))
        return out

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        outputs = _to_float(outputs)
        device = outputs["pred_logits"].device
        num_boxes = count_boxes(targets, device)
        losses = self._apply(outputs, targets, num_boxes, "")
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            losses.update(self._apply(aux, targets, num_boxes, f"_{i}"))
        if outputs.get("enc_outputs") is not None:
            agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._apply(outputs["enc_outputs"], agnostic, num_boxes, "_enc"))
        return losses


class BranchCriterion(nn.Module):
    """A :class:`SetCriterion` plus the losses of a training-only query branch,
    whose keys end in ``suffix`` and are weighted ``weight`` x the base weight.
    Subclasses compute the branch's terms in ``forward``."""

    suffix = ""

    def __init__(self, base: SetCriterion, weight: float = 1.0) -> None:
        super().__init__()
        self.base = base
        self.weight = weight

    @property
    def weight_dict(self) -> dict[str, float]:
        return self.base.weight_dict

    def weight_for(self, key: str) -> float:
        if key.endswith(self.suffix):
            return self.weight * self.base.weight_for(key[: -len(self.suffix)])
        return self.base.weight_for(key)

    weighted_total = SetCriterion.weighted_total  # the same sum, over this class's weight_for


def _to_float(outputs: dict) -> dict:
    out = {}
    for k, v in outputs.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.float()
        elif isinstance(v, dict):
            out[k] = _to_float(v)
        elif isinstance(v, list):
            out[k] = [_to_float(x) if isinstance(x, dict) else x for x in v]
        else:
            out[k] = v
    return out
