"""Training-only options: freeze only what was pretrained; hybrid matching
(H-DETR) and denoising queries (DINO) whose checkpoints stay a plain Deformable
DETR; the IoU-aware (varifocal) class loss."""

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


def _two_stage(num_queries: int = 10):
    from ddetr_cli.models import build_model as build_network, preset

    torch.manual_seed(0)
    return build_network(preset("tiny", num_classes=3, num_queries=num_queries, dropout=0.0)).train()


_TARGETS = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
            {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])}]


def test_denoising_groups_follow_the_targets():
    from ddetr_cli.models.box_ops import box_cxcywh_to_xyxy
    from ddetr_cli.models.denoising import noised_queries

    torch.manual_seed(0)
    embed = torch.nn.Embedding(3, 8)
    q, indices = noised_queries(_TARGETS, embed, groups=4, box_noise=1.0, label_noise=0.0)
    assert q.group_size == 4 and q.boxes.shape == (2, 16, 4) and q.content.shape == (2, 16, 8)
    # positives: the first two slots of each group; negatives the next two; image 1 pads one of each
    assert indices[0][0].tolist() == [0, 1, 4, 5, 8, 9, 12, 13] and indices[0][1].tolist() == [0, 1] * 4
    assert indices[1][0].tolist() == [0, 4, 8, 12] and indices[1][1].tolist() == [0] * 4
    torch.testing.assert_close(q.content[0, [0, 2, 5, 7]], embed(torch.tensor([0, 0, 2, 2])))  # no label noise
    assert q.content[1, [1, 3]].abs().sum() == 0  # padding slots carry nothing
    # corner noise in half box sizes: positives < 1, negatives 1-2 (crossed corners are swapped)
    gt = box_cxcywh_to_xyxy(_TARGETS[0]["boxes"])  # [2, 4]
    half = _TARGETS[0]["boxes"][:, 2:].repeat(1, 2) / 2  # [2, 4]
    pos = torch.stack([(box_cxcywh_to_xyxy(q.boxes[0, g * 4:g * 4 + 2]) - gt).abs() / half for g in range(4)])
    neg = torch.stack([(box_cxcywh_to_xyxy(q.boxes[0, g * 4 + 2:g * 4 + 4]) - gt).abs() / half for g in range(4)])
    assert pos.max() < 1 + 1e-4 and neg.max() < 2 + 1e-4 and neg.mean() > 2 * pos.mean()
    _, _ = noised_queries(_TARGETS, embed, groups=2, box_noise=0.0, label_noise=1.0)
    q0, _ = noised_queries(_TARGETS, embed, groups=2, box_noise=0.0, label_noise=0.0)
    torch.testing.assert_close(q0.boxes[0, :2], _TARGETS[0]["boxes"])  # no box noise: the targets


def test_denoising_queries_are_unseen_by_the_usual_ones_and_each_other():
    from ddetr_cli.models.denoising import DenoisingQueries, noised_queries

    model = _two_stage()
    branch = DenoisingQueries(model, 3, groups=3).train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    queries, _ = noised_queries(_TARGETS, branch.label_embed, 3, 1.0, 0.5)
    with torch.no_grad():
        plain = model(x)
        both = model(x, denoise=queries)
        moved = queries.boxes.clone()
        moved[:, 4:] = torch.rand_like(moved[:, 4:]) * 0.5 + 0.25  # every group but the first
        other = model(x, denoise=type(queries)(moved, queries.content, 3, 4))
    assert both["denoise"]["pred_logits"].shape == (2, 12, 3) and len(both["denoise"]["aux_outputs"]) == 2
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(both[key], plain[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(both["aux_outputs"][0][key], plain["aux_outputs"][0][key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other["denoise"][key][:, :4], both["denoise"][key][:, :4], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(other["denoise"][key][:, 4:], both["denoise"][key][:, 4:])
    out = branch(x, None, _TARGETS)
    assert out["denoise"]["groups"] == 3 and len(out["denoise"]["indices"]) == 2
    assert "denoise" not in branch.eval()(x, None, _TARGETS)  # inference: the plain model


def test_denoising_criterion_uses_the_known_assignment():
    from ddetr_cli.engine.loops.step import build_criterion

    crit = build_criterion(TrainConfig(denoise=True, denoise_weight=0.5).validate(), 3)
    boxes = torch.rand(2, 8, 4) * 0.5 + 0.25
    boxes[0, [0, 1, 4, 5]] = _TARGETS[0]["boxes"].repeat(2, 1)  # exact boxes at the positives
    boxes[1, [0, 4]] = _TARGETS[1]["boxes"].repeat(2, 1)
    dn = {"pred_logits": torch.randn(2, 8, 3), "pred_boxes": boxes, "groups": 2,
          "indices": [(torch.tensor([0, 1, 4, 5]), torch.tensor([0, 1, 0, 1])), (torch.tensor([0, 4]), torch.tensor([0, 0]))]}
    out = {"pred_logits": torch.randn(2, 5, 3), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.25, "denoise": dn}
    losses = crit(out, _TARGETS)
    assert losses["loss_bbox_dn"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou_dn"].item() == pytest.approx(0.0, abs=1e-6)
    assert crit.weight_for("loss_ce_dn") == 0.5 * crit.weight_for("loss_ce")
    assert crit.weight_for("loss_giou_1_dn") == 0.5 * crit.weight_for("loss_giou")
    plain = build_criterion(TrainConfig().validate(), 3)
    base = plain({k: v for k, v in out.items() if k != "denoise"}, _TARGETS)
    for k, v in base.items():
        torch.testing.assert_close(losses[k], v)
    # class loss: the positives' own classes, every other slot "no object", over 3 targets x 2 groups
    from ddetr_cli.models.criterion import sigmoid_focal_loss

    onehot = torch.zeros(2, 8, 3)
    onehot[0, [0, 4], 0] = onehot[0, [1, 5], 2] = onehot[1, [0, 4], 1] = 1
    expected = sigmoid_focal_loss(dn["pred_logits"], onehot).mean(1).sum() / 6 * 8
    torch.testing.assert_close(losses["loss_ce_dn"], expected)


def test_denoise_needs_a_two_stage_model_and_no_hybrid():
    from ddetr_cli.engine.loops.step import build_train_module
    from ddetr_cli.errors import TrainConfigError
    from ddetr_cli.models import build_model as build_network, preset

    with pytest.raises(TrainConfigError, match="hybrid"):
        TrainConfig(denoise=True, hybrid=True).validate()
    from ddetr_cli.engine.config import resolve

    def shapes(**cli):
        return resolve(dataset_source="shapes", dataset_train=None, dataset_model=None, config_path=None, cli=cli)

    assert shapes().denoise and not shapes(hybrid=True).denoise  # the recipe's denoising gives way to --hybrid
    with pytest.raises(TrainConfigError, match="hybrid"):
        shapes(hybrid=True, denoise=True)  # both asked for: refused
    model = build_network(preset("tiny", num_classes=3, two_stage=False))
    cfg = TrainConfig(denoise=True).validate()
    with pytest.raises(TrainConfigError, match="two-stage"):
        build_train_module(model, cfg, torch.optim.SGD(model.parameters(), lr=0.1))


def test_denoise_training_saves_a_plain_deformable_detr_and_resumes(tmp_path):
    from ddetr_cli.checkpoints import load_model
    from ddetr_cli.data import ensure_shapes_dataset
    from ddetr_cli.engine import run_training
    from ddetr_cli.engine.runs.checkpoint import load_train_checkpoint
    from ddetr_cli.models import build_model as build_network

    data = ensure_shapes_dataset(tmp_path / "shapes", n_train=4, n_val=2, size=64)
    out = tmp_path / "run"
    result = run_training(str(data), overrides={"denoise": True, "class_loss": "varifocal", "model": "tiny",
                                                "imgsz": 64, "batch_size": 2, "epochs": 2, "max_iters": 2,
                                                "workers": 0, "out": str(out), "device": "cpu"})
    assert result is not None and result.global_step == 2
    last = load_train_checkpoint(out / "weights" / "last.pt")
    assert set(last["hybrid"]) == {"label_embed.weight"}  # the denoising label embedding: resume only
    model = load_model(out / "weights" / "best.pt")
    plain = build_network(model.config).eval()
    assert set(plain.state_dict()) == set(model.state_dict())
    r = run_training(resume=out, overrides={"max_iters": 3})
    assert r is not None and r.global_step == 3
    resumed = load_train_checkpoint(out / "weights" / "last.pt")
    assert not torch.equal(resumed["hybrid"]["label_embed.weight"], last["hybrid"]["label_embed.weight"])  # trained on


def test_varifocal_loss_learns_the_iou_as_the_score():
    from ddetr_cli.models.criterion import SetCriterion, varifocal_loss
    from ddetr_cli.models.matcher import HungarianMatcher

    # element-wise: a positive's gradient vanishes where its score equals its IoU; negatives
    # are down-weighted as alpha * p^gamma
    logits = torch.tensor([[[0.4054651, -1.0, 2.0]]], dtype=torch.float64, requires_grad=True)  # sigmoid(l0) = 0.6
    quality = torch.tensor([[[0.6, 0.0, 0.0]]], dtype=torch.float64)
    loss = varifocal_loss(logits, quality, alpha=0.75, gamma=2.0)
    loss.sum().backward()
    assert abs(logits.grad[0, 0, 0].item()) < 1e-6
    p = torch.sigmoid(torch.tensor([-1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(loss[0, 0, 1:].detach(), 0.75 * p**2 * -torch.log(1 - p))
    # in the criterion: the matched class's target is the box's IoU with its target
    crit = SetCriterion(3, HungarianMatcher(), class_loss="varifocal")
    target = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    pred = torch.tensor([[[0.5, 0.5, 0.4, 0.2], [0.1, 0.1, 0.05, 0.05]]])  # IoU 0.5 with the target
    good = torch.full((1, 2, 3), -8.0)
    good[0, 0, 1] = 0.0  # sigmoid 0.5: the IoU
    bad = good.clone()
    bad[0, 0, 1] = 4.0  # over-confident for a box of IoU 0.5
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    a = crit.loss_labels({"pred_logits": good, "pred_boxes": pred}, target, indices, 1.0)["loss_ce"]
    b = crit.loss_labels({"pred_logits": bad, "pred_boxes": pred}, target, indices, 1.0)["loss_ce"]
    assert b > a
    focal = SetCriterion(3, HungarianMatcher()).loss_labels({"pred_logits": bad, "pred_boxes": pred}, target, indices, 1.0)
    assert focal["loss_ce"] < b  # the focal loss rewards the over-confident score
    with pytest.raises(ValueError, match="class loss"):
        SetCriterion(3, class_loss="bce")
    from ddetr_cli.errors import TrainConfigError

    with pytest.raises(TrainConfigError, match="class_loss"):
        TrainConfig(class_loss="bce").validate()


def test_time_limit_drops_the_lr_at_the_chosen_share_and_leaves_room_for_validation(monkeypatch):
    # A time-boxed run drops the lr once `time_lr_drop` of its budget (less the final validation) is
    # spent, and stops when one more step would not leave time for that validation.
    import ddetr_cli.engine.runs.budget as budget_mod

    clock = [1000.0]
    monkeypatch.setattr(budget_mod.time, "perf_counter", lambda: clock[0])
    for share, drop_after in ((0.8, 470.0), (0.9, 530.0)):
        clock[0] = 1000.0
        budget = budget_mod.TimeBudget(10, val_batches=10, drop_at=share)  # 600 s
        budget.note_steps(0.5)
        budget.note_eval(10.0)
        budget.note_steps(0.5)  # the timed validation (10 s) replaces the guess
        clock[0] += drop_after - 1
        assert not budget.drop_due()
        clock[0] += 2
        assert budget.drop_due() and not budget.exhausted()
    clock[0] = 1000.0 + 591
    assert budget.exhausted()
    assert not budget_mod.TimeBudget(None, 10).drop_due()  # no limit: the epoch schedule alone
    with pytest.raises(ValueError, match="time_lr_drop"):
        TrainConfig(time_lr_drop=1.5).validate()


def test_time_limit_reached_by_an_epoch_end_validation_makes_it_the_final_one(tmp_path, monkeypatch):
    # The budget keeps time for one final validation. When it runs out during the validation at an epoch's
    # end, that validation is the final one: no further step, and no second validation past the limit.
    import ddetr_cli.engine.runs.budget as budget_mod
    from ddetr_cli.data import ensure_shapes_dataset
    from ddetr_cli.engine import run_training

    monkeypatch.setattr(budget_mod.TimeBudget, "exhausted", lambda self: self.eval_cost > 0)  # spent once validated
    data = ensure_shapes_dataset(tmp_path / "shapes", n_train=4, n_val=2, size=64)
    result = run_training(str(data), overrides={"model": "tiny", "imgsz": 64, "batch_size": 2, "epochs": 3,
                                                "time_limit": 60, "workers": 0, "out": str(tmp_path / "run"),
                                                "device": "cpu"})
    assert result is not None and result.stopped_early == "time limit"
    assert (result.epochs_done, result.global_step) == (1, 2)  # the first epoch's two steps, none after its validation
    assert len(result.history) == 1 and "AP" in result.history[0]
    assert (tmp_path / "run" / "weights" / "best.pt").exists()
