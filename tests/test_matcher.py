"""HungarianMatcher: hand-checked costs, batched == per-image, empty targets, NaN."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ddetr_cli.models.matcher import HungarianMatcher, MatchingError


def _outputs(B=3, Q=7, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, Q, C, generator=g)
    cxcy = torch.rand(B, Q, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(B, Q, 2, generator=g) * 0.3 + 0.05
    return {"pred_logits": logits, "pred_boxes": torch.cat([cxcy, wh], -1)}


def _targets(sizes, C=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        out.append({"labels": torch.randint(0, C, (n,), generator=g), "boxes": torch.cat([cxcy, wh], -1)})
    return out


def test_cost_matches_hand_computation():
    m = HungarianMatcher()
    outputs = {"pred_logits": torch.tensor([[[0.0, 2.0]]]), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]])}]
    p = 1 / (1 + math.exp(-2.0))
    pos = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8)
    neg = 0.75 * p**2 * -math.log(1 - p + 1e-8)
    l1 = 0.1
    # boxes [0.4,0.4,0.6,0.6] and [0.5,0.4,0.7,0.6]: inter 0.02, union 0.06, hull 0.06
    giou = 0.02 / 0.06
    expected = 2 * (pos - neg) + 5 * l1 - 2 * giou
    got = m.cost_matrix(outputs, targets)
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_batched_equals_per_image():
    m = HungarianMatcher()
    outputs = _outputs()
    targets = _targets([2, 0, 5])
    batched = m(outputs, targets)
    for b, (src, tgt) in enumerate(batched):
        single = m({k: v[b : b + 1] for k, v in outputs.items()}, [targets[b]])[0]
        assert torch.equal(src, single[0]) and torch.equal(tgt, single[1])
        assert src.dtype == torch.int64 and tgt.dtype == torch.int64
        assert len(src) == len(targets[b]["labels"])
        if len(src):  # optimal: equals scipy on the per-image cost directly
            cost = m.cost_matrix({k: v[b : b + 1] for k, v in outputs.items()}, [targets[b]])
            r, c = linear_sum_assignment(cost.numpy())
            assert cost[src, tgt].sum().item() == pytest.approx(cost[r, c].sum().item(), rel=1e-6)


def test_all_empty_targets():
    m = HungarianMatcher()
    res = m(_outputs(B=2), _targets([0, 0]))
    assert [len(s) for s, _ in res] == [0, 0]
    assert all(s.dtype == torch.int64 for s, _ in res)


def test_more_targets_than_queries():
    m = HungarianMatcher()
    res = m(_outputs(B=1, Q=3), _targets([5]))
    src, tgt = res[0]
    assert len(src) == 3 and len(set(tgt.tolist())) == 3


def test_non_finite_costs_raise_clear_error():
    m = HungarianMatcher()
    outputs = _outputs(B=1)
    outputs["pred_boxes"][0, 2, 0] = float("nan")
    with pytest.raises(MatchingError, match="non-finite"):
        m(outputs, _targets([2]))
