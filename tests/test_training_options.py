"""Training-only options: freeze only what was pretrained; hybrid matching
(H-DETR) whose checkpoint stays a plain Deformable DETR."""

from __future__ import annotations

import pytest
import torch

from ddetr_cli.engine.config import TrainConfig
from ddetr_cli.engine.runs.assemble import Datasets, build_model


def _ds(n: int = 3) -> Datasets:
    return Datasets(train=None, val=None, category_ids=list(range(1, n + 1)), class_names=[f"c{i}" for i in range(n)])


def _trainable(model, prefix: str) -> bool:
    return any(p.requires_grad for n, p in model.named_parameters() if n.startswith(prefix))


def test_from_scratch_backbone_trains_stem_layer1_and_batch_norm():
    model, _ = build_model(TrainConfig(model="tiny").validate(), _ds())
    body = model.backbone[0].body
    assert model.config.backbone_frozen_stages == -1 and model.config.backbone_norm == "batch"
    for prefix in ("backbone.0.body.conv1", "backbone.0.body.bn1", "backbone.0.body.layer1", "backbone.0.body.layer4"):
        assert _trainable(model, prefix), prefix
    assert isinstance(body.layer1[0].bn1, torch.nn.BatchNorm2d)
    # the state-dict keys stay the official ones (no num_batches_tracked)
    assert not any(k.endswith("num_batches_tracked") for k in model.state_dict())
    # eval mode: the same numbers as the frozen batch norm with those statistics
    from ddetr_cli.models import build_model as build_network

    model.train()
    x = torch.randn(2, 3, 64, 64)
    model.backbone(x, torch.zeros(2, 64, 64, dtype=torch.bool))  # updates running statistics
    frozen = build_network(model.config.replace(backbone_norm="frozen", backbone_frozen_stages=1))
    frozen.load_state_dict(model.state_dict())
    model.eval(), frozen.eval()
    with torch.no_grad():
        a, b = model(x), frozen(x)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=1e-5, atol=1e-5)


def test_pretrained_or_explicit_keeps_the_official_freeze(tmp_path):
    from ddetr_cli.models import preset

    body = build_model(TrainConfig(model="tiny").validate(), _ds())[0].backbone[0].body
    torch.save({k: v for k, v in body.state_dict().items()}, tmp_path / "r18.pth")
    model, _ = build_model(TrainConfig(model="tiny", pretrained_backbone=str(tmp_path / "r18.pth")).validate(), _ds())
    assert model.config.backbone_frozen_stages == 1 and model.config.backbone_norm == "frozen"
    assert not _trainable(model, "backbone.0.body.layer1") and _trainable(model, "backbone.0.body.layer2")
    cfg = TrainConfig(model="tiny", model_overrides={"backbone_norm": "frozen"}).validate()
    model, _ = build_model(cfg, _ds())
    assert model.config.backbone_norm == "frozen" and _trainable(model, "backbone.0.body.conv1")
    assert preset("tiny").backbone_frozen_stages == 1  # the preset itself is the official one
