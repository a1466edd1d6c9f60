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


@pytest.mark.parametrize("variant", ["base", "two-stage"])
def test_one2many_queries_leave_the_one2one_outputs_unchanged(variant):
    from ddetr_cli.models import build_model as build_network, preset
    from ddetr_cli.models.config import apply_variant
    from ddetr_cli.models.hybrid import HybridQueries

    torch.manual_seed(0)
    model = build_network(apply_variant(preset("tiny", num_classes=3, num_queries=10, dropout=0.0), variant)).train()
    hybrid = HybridQueries(model, 30).train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain, both = model(x), hybrid(x)
    assert both["one2many"]["pred_logits"].shape == (2, 30, 3) and len(both["one2many"]["aux_outputs"]) == 2
    torch.testing.assert_close(both["pred_logits"], plain["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both["pred_boxes"], plain["pred_boxes"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both["aux_outputs"][0]["pred_boxes"], plain["aux_outputs"][0]["pred_boxes"], rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(build_network(model.config).state_dict())  # nothing added to the detector


def test_hybrid_criterion_repeats_targets_and_weights_the_branch():
    from ddetr_cli.engine.loops.step import build_criterion

    crit = build_criterion(TrainConfig(hybrid=True, hybrid_k=3, hybrid_weight=0.5).validate(), 3)
    out = {"pred_logits": torch.randn(1, 4, 3), "pred_boxes": torch.rand(1, 4, 4) * 0.5 + 0.25,
           "one2many": {"pred_logits": torch.randn(1, 12, 3), "pred_boxes": torch.rand(1, 12, 4) * 0.5 + 0.25}}
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])}]
    losses = crit(out, targets)
    assert "loss_giou_one2many" in losses and crit.weight_for("loss_giou_one2many") == 0.5 * crit.weight_for("loss_giou")
    plain = build_criterion(TrainConfig().validate(), 3)
    expected = plain.weighted_total(plain({k: v for k, v in out.items() if k != "one2many"}, targets))
    extra = sum(losses[k] * crit.weight_for(k) for k in losses if k.endswith("_one2many"))
    torch.testing.assert_close(crit.weighted_total(losses), expected + extra)


def test_hybrid_training_saves_a_plain_deformable_detr(tmp_path):
    from ddetr_cli.checkpoints import load_model
    from ddetr_cli.checkpoints.official import load_official, official_payload
    from ddetr_cli.data import ensure_shapes_dataset
    from ddetr_cli.engine import run_training
    from ddetr_cli.engine.runs.checkpoint import load_train_checkpoint
    from ddetr_cli.models import build_model as build_network

    data = ensure_shapes_dataset(tmp_path / "shapes", n_train=4, n_val=2, size=64)
    out = tmp_path / "run"
    result = run_training(str(data), overrides={"hybrid": True, "model": "tiny", "variant": "refine", "imgsz": 64,
                                                "batch_size": 2, "epochs": 2, "max_iters": 2, "workers": 0,
                                                "out": str(out), "device": "cpu"})
    assert result is not None and result.global_step == 2
    last = load_train_checkpoint(out / "weights" / "last.pt")
    assert set(last["hybrid"]) == {"query_embed.weight"}  # the one-to-many queries: resume only
    best = out / "weights" / "best.pt"
    model = load_model(best)
    plain = build_network(model.config).eval()  # that architecture, never trained with the branch
    assert set(plain.state_dict()) == set(model.state_dict())
    plain.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), plain(x)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"])
    torch.save(official_payload(model), tmp_path / "official.pth")  # the official release layout
    with torch.no_grad():
        c = load_official(tmp_path / "official.pth").eval()(x)
    torch.testing.assert_close(a["pred_boxes"], c["pred_boxes"], rtol=1e-5, atol=1e-5)
    # resume restores the branch
    r = run_training(resume=out, overrides={"max_iters": 3})
    assert r is not None and r.global_step == 3
