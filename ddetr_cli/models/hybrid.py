"""Hybrid matching (H-DETR, Jia et al., CVPR 2023): a training-only
one-to-many branch.

Next to the usual (one-to-one) queries the decoder runs an extra group of
``num_queries`` one-to-many queries. They share every weight with the
one-to-one queries, never see them in self-attention (and are never seen by
them), and are matched by the same Hungarian matcher against the targets
repeated ``k`` times, so several queries learn from each object: denser
supervision, faster convergence. Two-stage models take the extra queries from
the next encoder proposals (no new weights); other models learn one extra
query embedding, held here, outside the detector.

Nothing of the branch is in the detector's state dict: the model trained with
it saves, loads and exports as a plain Deformable DETR, and its outputs are
those of that model (the one-to-one queries' view is unchanged by the masked
extra group).
"""

from __future__ import annotations

import torch
from torch import nn

from .criterion import BranchCriterion, SetCriterion

SUFFIX = "_one2many"


class HybridQueries(nn.Module):
    """The one-to-many query group of ``model`` (a DeformableDETR): call it as
    the model, ``hybrid(images, mask)``; outputs carry ``"one2many"`` in training."""

    def __init__(self, model: nn.Module, num_queries: int) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"hybrid matching needs >= 1 one-to-many queries (got {num_queries})")
        self.model = model
        self.num_queries = num_queries
        self.query_embed: nn.Embedding | None = None
        if not model.config.two_stage:
            self.query_embed = nn.Embedding(num_queries, 2 * model.config.d_model)
            nn.init.normal_(self.query_embed.weight)  # as nn.Embedding (and the detector's own query_embed)

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters that are not the detector's (trained, checkpointed for resume, never exported)."""
        return [] if self.query_embed is None else [self.query_embed.weight]

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None) -> dict:
        if not self.training:
            return self.model(images, padding_mask)
        embed = None if self.query_embed is None else self.query_embed.weight  # [Q2, 2C]
        return self.model(images, padding_mask, one2many=self.num_queries, one2many_embed=embed)


class HybridCriterion(BranchCriterion):
    """``SetCriterion`` on the one-to-one outputs plus, weighted by ``weight``,
    the same losses (keys suffixed ``_one2many``) on ``outputs["one2many"]``
    against every target repeated ``k`` times."""

    suffix = SUFFIX

    def __init__(self, base: SetCriterion, k: int = 6, weight: float = 1.0) -> None:
        super().__init__(base, weight)
        self.k = k

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        one2many = outputs.get("one2many")
        losses = self.base({k: v for k, v in outputs.items() if k != "one2many"}, targets)
        if one2many is not None:
            repeated = [{**t, "labels": t["labels"].repeat(self.k), "boxes": t["boxes"].repeat(self.k, 1)} for t in targets]
            for key, value in self.base(one2many, repeated).items():
                losses[key + SUFFIX] = value
        return losses


def default_one2many_queries(num_queries: int, requested: int = 0) -> int:
    """``requested``, or H-DETR's ratio: 6 one-to-many queries per one-to-one query."""
    return requested if requested > 0 else 6 * num_queries
