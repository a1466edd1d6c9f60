"""SetCriterion against hand-computed focal / L1 / GIoU values."""

from __future__ import annotations

import math

import pytest
import torch

from ddetr_cli.models.criterion import SetCriterion, sigmoid_focal_loss


class FixedMatcher:
    def __init__(self, indices):
        self.indices = indices

    def __call__(self, outputs, targets):
        return self.indices


def _focal(x: float, t: int, a=0.25, g=2.0) -> float:
    p = 1 / (1 + math.exp(-x))
    if t:
        return a * (1 - p) ** g * -math.log(p)
    return (1 - a) * p**g * -math.log(1 - p)


def test_sigmoid_focal_elementwise():
    logits = torch.tensor([[[0.5, -1.0]]])
    onehot = torch.tensor([[[1.0, 0.0]]])
    got = sigmoid_focal_loss(logits, onehot)
    assert got[0, 0, 0].item() == pytest.approx(_focal(0.5, 1), rel=1e-5)
    assert got[0, 0, 1].item() == pytest.approx(_focal(-1.0, 0), rel=1e-5)


def _setup():
    # B=1, Q=2, C=2; query 1 matched to target 0 (class 1)
    logits = torch.tensor([[[0.2, -0.3], [-1.0, 1.5]]])
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.6, 0.4, 0.2]])}]
    indices = [(torch.tensor([1]), torch.tensor([0]))]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets, indices


def test_loss_values_by_hand():
    outputs, targets, indices = _setup()
    crit = SetCriterion(2, FixedMatcher(indices))
    losses = crit(outputs, targets)
    # focal summed over all [Q, C] entries / num_boxes (=1): official mean(1).sum()/nb * Q
    focal = _focal(0.2, 0) + _focal(-0.3, 0) + _focal(-1.0, 0) + _focal(1.5, 1)
    assert losses["loss_ce"].item() == pytest.approx(focal, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0 + 0.1 + 0 + 0.2, rel=1e-5)
    # pred xyxy [0.3,0.3,0.7,0.7], tgt [0.3,0.5,0.7,0.7]: inter 0.08, union 0.16, hull 0.16
    assert losses["loss_giou"].item() == pytest.approx(1 - 0.5, rel=1e-5)
    assert losses["class_error"].item() == pytest.approx(0.0)
    # queries with max score > 0.5: query 0 (0.2 -> .55) and query 1 -> 2; targets 1
    assert losses["cardinality_error"].item() == pytest.approx(1.0)
    total = crit.weighted_total(losses)
    assert total.item() == pytest.approx(2 * focal + 5 * 0.3 + 2 * 0.5, rel=1e-5)


def test_num_boxes_normalisation_and_aux_enc_keys():
    outputs, targets, indices = _setup()
    base = dict(outputs)
    outputs["aux_outputs"] = [dict(base), dict(base)]
    outputs["enc_outputs"] = dict(base)
    targets2 = [targets[0], {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    out2 = {k: (torch.cat([v, v]) if torch.is_tensor(v) else v) for k, v in outputs.items()}
    out2["aux_outputs"] = [{k: torch.cat([v, v]) for k, v in a.items()} for a in outputs["aux_outputs"]]
    out2["enc_outputs"] = {k: torch.cat([v, v]) for k, v in outputs["enc_outputs"].items()}
    empty = torch.zeros(0, dtype=torch.long)
    crit = SetCriterion(2, FixedMatcher(indices + [(empty, empty)]))
    losses = crit(out2, targets2)
    for suffix in ("", "_0", "_1", "_enc"):
        for k in ("loss_ce", "loss_bbox", "loss_giou"):
            assert k + suffix in losses
    assert crit.weight_for("loss_ce_enc") == 2 and crit.weight_for("loss_bbox_1") == 5
    assert crit.weight_for("class_error") == 0 and crit.weight_for("cardinality_error_0") == 0
    # the 2nd image has no targets: its queries only add negative focal terms
    extra = _focal(0.2, 0) + _focal(-0.3, 0) + _focal(-1.0, 0) + _focal(1.5, 0)
    focal = _focal(0.2, 0) + _focal(-0.3, 0) + _focal(-1.0, 0) + _focal(1.5, 1)
    assert losses["loss_ce"].item() == pytest.approx(focal + extra, rel=1e-5)
    # enc targets are class-agnostic: label 0 for the matched query
    enc = _focal(0.2, 0) + _focal(-0.3, 0) + _focal(-1.0, 1) + _focal(1.5, 0) + extra
    assert losses["loss_ce_enc"].item() == pytest.approx(enc, rel=1e-5)
    assert len(losses) == 4 * 5  # 5 terms x (main, 2 aux, enc)


def test_no_targets_gives_finite_zero_box_losses():
    outputs, _, _ = _setup()
    empty = torch.zeros(0, dtype=torch.long)
    targets = [{"labels": empty, "boxes": torch.zeros(0, 4)}]
    crit = SetCriterion(2)
    losses = crit(outputs, targets)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert torch.isfinite(crit.weighted_total(losses))


def test_fp16_outputs_are_cast_to_fp32_and_grad_flows():
    outputs, targets, indices = _setup()
    logits = outputs["pred_logits"].clone().requires_grad_(True)
    crit = SetCriterion(2)
    losses = crit({"pred_logits": logits.to(torch.bfloat16), "pred_boxes": outputs["pred_boxes"].to(torch.bfloat16)}, targets)
    assert losses["loss_ce"].dtype == torch.float32
    crit.weighted_total(losses).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
