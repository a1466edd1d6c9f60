"""Denoising queries (DN-DETR, Li et al., CVPR 2022, in the contrastive form of
DINO, Zhang et al., ICLR 2023): a training-only auxiliary task.

Next to the usual queries the decoder runs ``groups`` groups of queries made
from the ground truth: each target gives a positive (its box with small corner
noise; it must reconstruct the box and the class) and a negative (larger noise;
it must say "no object"), and a class label that is replaced by a random one
with probability ``label_noise / 2``. The assignment is known, so these
queries need no matching: they give the decoder a stable target from the first
step, where the bipartite matching of the usual queries still flips.

Two-stage models only: the denoising queries take their position and content
embeddings from their boxes exactly as the encoder proposals do (the detector's
``pos_trans``), plus a training-only label embedding held here. The usual
queries never see the denoising queries in self-attention, and the groups never
see each other; nothing of the branch is in the detector's state dict, so the
model trained with it saves, loads and exports as a plain Deformable DETR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .criterion import BranchCriterion, count_boxes

SUFFIX = "_dn"


@dataclass
class DenoiseQueries:
    """What the transformer appends after the usual queries.

    boxes [B, N, 4] cxcywh in (0, 1); content [B, N, C]; N = groups * group_size
    (each group: ``group_size // 2`` positive then as many negative slots, padded
    to the batch's largest target count)."""

    boxes: torch.Tensor
    content: torch.Tensor
    groups: int
    group_size: int

    @property
    def num_queries(self) -> int:
        return self.groups * self.group_size

    def extend_self_attn_mask(self, mask: torch.Tensor | None, first: int) -> torch.Tensor:
        """The decoder's self-attention mask [first + N, first + N] (True: may not
        attend) from the usual queries' mask [first, first] (or None)."""
        total = first + self.num_queries
        out = torch.zeros((total, total), dtype=torch.bool, device=self.boxes.device)
        if mask is not None:
            out[:first, :first] = mask
        out[:first, first:] = True  # the usual queries never see the denoising ones
        for g in range(self.groups):
            start, end = first + g * self.group_size, first + (g + 1) * self.group_size
            out[start:end, first:start] = True  # nor one group another
            out[start:end, end:] = True
        return out


def noised_queries(targets: list[dict], label_embed: nn.Embedding, groups: int, box_noise: float,
                   label_noise: float) -> tuple[DenoiseQueries, list[tuple[torch.Tensor, torch.Tensor]]]:
    """DINO's contrastive denoising groups for ``targets`` (B dicts of ``labels``
    [T_b], ``boxes`` [T_b, 4] cxcywh). Returns the queries and, per image, the
    (query index, target index) pairs of its positives. Uses the torch RNG."""
    device = label_embed.weight.device
    counts = [len(t["labels"]) for t in targets]
    P = max(max(counts), 1)  # positive slots per group
    S = 2 * P  # group size: positives, then negatives
    B, C = len(targets), label_embed.embedding_dim
    num_classes = label_embed.num_embeddings
    boxes = torch.full((B, groups * S, 4), 0.5, device=device)  # padding slots: a neutral box
    content = torch.zeros((B, groups * S, C), device=device, dtype=label_embed.weight.dtype)
    indices = []
    for b, t in enumerate(targets):
        n = counts[b]
        if n == 0:
            indices.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
            continue
        gt = t["boxes"].to(device).float()  # [n, 4]
        labels = t["labels"].to(device).long()  # [n]
        reps = gt.repeat(groups * 2, 1)  # [2Gn, 4]: group-major, positives then negatives
        xyxy = box_cxcywh_to_xyxy(reps)
        half = torch.cat([reps[:, 2:], reps[:, 2:]], 1) / 2  # [2Gn, 4]
        size = torch.rand_like(xyxy)  # [0, 1) for positives, [1, 2) for negatives
        # slot of each row: group g, half h (0 positive, 1 negative), target j -> g*S + h*P + j
        # (index arithmetic on the CPU: the positives' indices go to the loss without a device sync)
        block, j = torch.arange(2 * groups).repeat_interleave(n), torch.arange(n).repeat(2 * groups)  # [2Gn]
        negative = block % 2 == 1  # [2Gn]
        slot = (block // 2) * S + (block % 2) * P + j  # [2Gn]
        size = size + negative.to(device)[:, None].float()
        sign = torch.randint_like(xyxy, 0, 2) * 2 - 1
        xyxy = (xyxy + sign * size * half * box_noise).clamp(0.0, 1.0)
        lo, hi = torch.minimum(xyxy[:, :2], xyxy[:, 2:]), torch.maximum(xyxy[:, :2], xyxy[:, 2:])
        noisy = box_xyxy_to_cxcywh(torch.cat([lo, hi], 1))
        noisy = torch.cat([noisy[:, :2].clamp(1e-3, 1 - 1e-3), noisy[:, 2:].clamp(1e-3, 1.0)], 1)  # [2Gn, 4]
        noisy_labels = labels.repeat(groups * 2)  # [2Gn]
        flip = torch.rand(noisy_labels.shape, device=device) < label_noise * 0.5
        noisy_labels = torch.where(flip, torch.randint_like(noisy_labels, 0, num_classes), noisy_labels)
        boxes[b, slot.to(device)] = noisy
        content[b, slot.to(device)] = label_embed(noisy_labels)
        indices.append((slot[~negative], torch.arange(n).repeat(groups)))
    if not any(counts):  # keep the embedding in the graph (a zero gradient), as DDP expects every step
        content = content + 0.0 * label_embed.weight.sum()
    return DenoiseQueries(boxes, content, groups, S), indices


class DenoisingQueries(nn.Module):
    """The denoising groups of ``model`` (a two-stage DeformableDETR): call it as
    ``module(images, mask, targets)``; in training the outputs carry ``"denoise"``
    (the groups' predictions, with ``indices`` and ``groups`` for the loss)."""

    wants_targets = True

    def __init__(self, model: nn.Module, num_classes: int, groups: int = 5, box_noise: float = 1.0,
                 label_noise: float = 0.5) -> None:
        super().__init__()
        if not model.config.two_stage:
            raise ValueError("denoising queries need a two-stage model (their queries are made from boxes "
                             "as the encoder proposals are)")
        if groups < 1:
            raise ValueError(f"denoising needs >= 1 group (got {groups})")
        self.model = model
        self.groups, self.box_noise, self.label_noise = groups, box_noise, label_noise
        self.label_embed = nn.Embedding(num_classes, model.config.d_model)

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters that are not the detector's (trained, checkpointed for resume, never exported)."""
        return [self.label_embed.weight]

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None,
                targets: list[dict] | None = None) -> dict:
        if not self.training or not targets:
            return self.model(images, padding_mask)
        queries, indices = noised_queries(targets, self.label_embed, self.groups, self.box_noise, self.label_noise)
        out = self.model(images, padding_mask, denoise=queries)
        out["denoise"].update(indices=indices, groups=self.groups)
        return out


class DenoisingCriterion(BranchCriterion):
    """``SetCriterion`` on the usual outputs plus, weighted by ``weight``, its
    class and box losses (keys suffixed ``_dn``) on ``outputs["denoise"]`` with
    the known assignment, normalised by the targets times the groups. The
    negatives (and padding slots) learn "no object"."""

    suffix = SUFFIX

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        branch = outputs.get("denoise")
        losses = self.base({k: v for k, v in outputs.items() if k != "denoise"}, targets)
        if branch is not None:
            indices, groups = branch["indices"], branch["groups"]
            num_boxes = count_boxes(targets, branch["pred_logits"].device) * groups
            layers = [("", branch)] + [(f"_{i}", aux) for i, aux in enumerate(branch.get("aux_outputs") or [])]
            for suffix, out in layers:
                for key, value in self.base.losses_for(out, targets, indices, num_boxes).items():
                    losses[key + suffix + SUFFIX] = value
        return losses
