"""The Deformable DETR model: shapes, variants, official init and key names,
masking, backends, config and post-processing."""

from __future__ import annotations

import math

import pytest
import torch

from ddetr_cli.models import PRESETS, DeformableDETR, ModelConfig, apply_variant, build_model, postprocess, preset
from ddetr_cli.models.backbone import resnet_spec
from ddetr_cli.models.box_ops import box_cxcywh_to_xyxy

VARIANTS = ["base", "refine", "two-stage", "single-scale"]


def small_cfg(variant: str = "base", **kw) -> ModelConfig:
    base = dict(num_classes=7, backbone="resnet18", backbone_width=16, d_model=64, nheads=4, enc_layers=2,
                dec_layers=3, dim_feedforward=128, num_queries=12, dropout=0.0)
    cfg = ModelConfig(**{**base, **kw})
    if variant == "single-scale":
        return cfg.replace(num_feature_levels=1)
    return apply_variant(cfg, variant)


def make_model(variant: str = "base", seed: int = 0, **kw) -> DeformableDETR:
    torch.manual_seed(seed)
    return build_model(small_cfg(variant, **kw))


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:, :] = True
    mask[1, :, 96:] = True
    images[1][:, mask[1]] = 0.0
    return images, mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shapes(variant):
    model = make_model(variant)
    images, mask = padded_batch()
    model.train()
    out = model(images, mask)
    assert out["pred_logits"].shape == (2, 12, 7)
    assert out["pred_boxes"].shape == (2, 12, 4)
    assert out["pred_boxes"].min() >= 0 and out["pred_boxes"].max() <= 1
    assert len(out["aux_outputs"]) == 2  # dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 12, 7) and aux["pred_boxes"].shape == (2, 12, 4)
    if variant == "two-stage":
        # all encoder tokens: 4 levels of a 96x128 input (strides 8, 16, 32, 64)
        S = 12 * 16 + 6 * 8 + 3 * 4 + 2 * 2
        assert out["enc_outputs"]["pred_logits"].shape == (2, S, 7)
        assert out["enc_outputs"]["pred_boxes"].shape == (2, S, 4)
    else:
        assert "enc_outputs" not in out
    model.eval()
    with torch.no_grad():
        out = model(images, mask)
    assert set(out) == {"pred_logits", "pred_boxes"}
    with torch.no_grad():
        out = model(images, mask, return_aux=True)
    assert len(out["aux_outputs"]) == 2


def test_no_aux_loss_and_no_mask():
    model = make_model("base", aux_loss=False).train()
    out = model(torch.randn(1, 3, 64, 64))
    assert "aux_outputs" not in out
    assert out["pred_logits"].shape == (1, 12, 7)


def test_bad_inputs_raise():
    model = make_model().eval()
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="padding_mask"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 32, 32, dtype=torch.bool))


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_state_dict_keys(variant):
    model = make_model(variant)
    keys = set(model.state_dict())
    must = {
        "backbone.0.body.conv1.weight", "backbone.0.body.bn1.weight", "backbone.0.body.bn1.running_var",
        "backbone.0.body.layer1.0.bn1.weight", "backbone.0.body.layer2.0.downsample.0.weight",
        "backbone.0.body.layer2.0.downsample.1.running_mean",
        "transformer.level_embed",
        "transformer.encoder.layers.1.self_attn.sampling_offsets.weight",
        "transformer.encoder.layers.1.self_attn.attention_weights.bias",
        "transformer.encoder.layers.1.self_attn.value_proj.weight",
        "transformer.encoder.layers.1.self_attn.output_proj.bias",
        "transformer.encoder.layers.0.norm1.weight", "transformer.encoder.layers.0.linear1.weight",
        "transformer.encoder.layers.0.linear2.bias", "transformer.encoder.layers.0.norm2.bias",
        "transformer.decoder.layers.2.self_attn.in_proj_weight", "transformer.decoder.layers.2.self_attn.in_proj_bias",
        "transformer.decoder.layers.2.self_attn.out_proj.weight",
        "transformer.decoder.layers.2.cross_attn.sampling_offsets.bias",
        "transformer.decoder.layers.2.norm1.weight", "transformer.decoder.layers.2.norm2.weight",
        "transformer.decoder.layers.2.norm3.weight", "transformer.decoder.layers.2.linear1.weight",
        "class_embed.0.weight", "class_embed.2.bias", "bbox_embed.2.layers.2.weight", "input_proj.0.0.weight",
        "input_proj.0.1.weight",
    }
    assert must <= keys, sorted(must - keys)
    assert not any("num_batches_tracked" in k for k in keys)
    # FrozenBatchNorm2d statistics are buffers, not parameters
    assert "backbone.0.body.bn1.weight" not in dict(model.named_parameters())
    levels = 1 if variant == "single-scale" else 4
    assert {f"input_proj.{i}.0.weight" for i in range(levels)} <= keys and f"input_proj.{levels}.0.weight" not in keys
    if variant == "two-stage":
        assert "query_embed.weight" not in keys and "transformer.reference_points.weight" not in keys
        assert {"transformer.enc_output.weight", "transformer.enc_output_norm.weight", "transformer.pos_trans.weight",
                "transformer.pos_trans_norm.bias", "class_embed.3.weight", "transformer.decoder.class_embed.3.weight",
                "transformer.decoder.bbox_embed.3.layers.0.weight"} <= keys
        assert "class_embed.4.weight" not in keys
    else:
        assert model.state_dict()["query_embed.weight"].shape == (12, 128)  # [Q, 2 * d_model]
        assert "transformer.reference_points.weight" in keys and "transformer.enc_output.weight" not in keys
        assert "class_embed.3.weight" not in keys
    if variant in ("refine", "two-stage"):
        assert "transformer.decoder.bbox_embed.0.layers.2.bias" in keys
        assert model.transformer.decoder.bbox_embed is model.bbox_embed
        assert model.bbox_embed[0] is not model.bbox_embed[1]
    else:
        assert not any(k.startswith("transformer.decoder.bbox_embed") for k in keys)
        assert model.bbox_embed[0] is model.bbox_embed[1] and model.class_embed[0] is model.class_embed[2]


@pytest.mark.parametrize("variant", ["base", "refine", "two-stage"])
def test_head_init_constants(variant):
    model = make_model(variant)
    prior = -math.log((1 - 0.01) / 0.01)
    assert prior == pytest.approx(-4.59512, abs=1e-5)
    for head in model.class_embed:
        torch.testing.assert_close(head.bias, torch.full_like(head.bias, prior))
    for i, head in enumerate(model.bbox_embed):
        last = head.layers[-1]
        assert torch.count_nonzero(last.weight) == 0
        assert torch.count_nonzero(last.bias[:2]) == 0
        expected = -2.0 if (variant == "base" or (variant == "refine" and i == 0)) else 0.0
        torch.testing.assert_close(last.bias[2:], torch.full((2,), expected))
    for proj in model.input_proj:
        assert torch.count_nonzero(proj[0].bias) == 0


def test_deformable_attention_init_pattern():
    model = make_model("base", nheads=8)
    attn = model.transformer.encoder.layers[0].self_attn
    M, L, P = 8, 4, 4
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    assert torch.count_nonzero(attn.value_proj.bias) == 0 and torch.count_nonzero(attn.output_proj.bias) == 0
    bias = attn.sampling_offsets.bias.detach().view(M, L, P, 2)
    # head h points along angle 2*pi*h/M, scaled onto the unit square; point p at distance p + 1
    unit = {0: (1, 0), 1: (1, 1), 2: (0, 1), 3: (-1, 1), 4: (-1, 0), 5: (-1, -1), 6: (0, -1), 7: (1, -1)}
    for h, (x, y) in unit.items():
        for p in range(P):
            for lvl in range(L):
                torch.testing.assert_close(bias[h, lvl, p], torch.tensor([x, y], dtype=torch.float32) * (p + 1),
                                           atol=1e-5, rtol=0)


def test_frozen_backbone_parts():
    model = make_model("base")
    params = dict(model.named_parameters())
    body = {k: p for k, p in params.items() if k.startswith("backbone.0.body.")}
    assert body, "the ResNet has parameters"
    for name, p in body.items():
        trainable = name.startswith(("backbone.0.body.layer2", "backbone.0.body.layer3", "backbone.0.body.layer4"))
        assert p.requires_grad == trainable, name
    frozen = make_model("base", train_backbone=False)
    assert not any(p.requires_grad for k, p in frozen.named_parameters() if k.startswith("backbone."))
    assert all(p.requires_grad for k, p in frozen.named_parameters() if not k.startswith("backbone."))


def test_batch_independence_with_padding():
    """An image padded inside a batch gives the same outputs as that padded image alone."""
    for variant in ("base", "two-stage"):
        model = make_model(variant).eval()
        images, mask = padded_batch()
        with torch.no_grad():
            both = model(images, mask)
            alone = model(images[1:], mask[1:])
            first = model(images[:1], mask[:1])
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(both[key][1:], alone[key], atol=1e-4, rtol=0)
            torch.testing.assert_close(both[key][:1], first[key], atol=1e-4, rtol=0)
        # and the mask is used: without it the padded image is read differently
        with torch.no_grad():
            unmasked = model(images[1:])
        assert (unmasked["pred_logits"] - alone["pred_logits"]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["base", "refine", "two-stage"])
def test_transformer_ignores_padded_content(variant):
    """Whatever the padded feature positions hold, valid positions and queries see only zeros there."""
    model = make_model(variant).eval()
    torch.manual_seed(3)
    shapes = [(12, 16), (6, 8), (3, 4), (2, 2)]
    masks = []
    for h, w in shapes:
        m = torch.zeros(2, h, w, dtype=torch.bool)
        m[1, (h + 1) // 2:, :] = True
        m[1, :, (w + 1) // 2:] = True
        masks.append(m)
    srcs = [torch.randn(2, 64, h, w) for h, w in shapes]
    pos = [model.backbone[1](m) for m in masks]
    garbage = [torch.where(m[:, None], torch.randn_like(s) * 100, s) for s, m in zip(srcs, masks)]
    query = None if variant == "two-stage" else model.query_embed.weight
    with torch.no_grad():
        hs_a, ref_a, inter_a, _, _ = model.transformer(srcs, masks, pos, query)
        hs_b, ref_b, inter_b, _, _ = model.transformer(garbage, masks, pos, query)
    torch.testing.assert_close(hs_a[-1], hs_b[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(inter_a[-1], inter_b[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_native_and_torch_backends_agree(variant):
    model = make_model(variant).eval()
    images, mask = padded_batch()
    with torch.no_grad():
        model.set_msda_backend("native")
        a = model(images, mask)
        model.set_msda_backend("torch")
        b = model(images, mask)
    assert model.config.msda_backend == "torch"
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=0)


def test_backward_reaches_every_trainable_part():
    model = make_model("two-stage").train()
    images, mask = padded_batch()
    out = model(images, mask)
    loss = out["pred_logits"].sum() + out["pred_boxes"].sum() + out["enc_outputs"]["pred_logits"].sum()
    loss = loss + sum(a["pred_boxes"].sum() for a in out["aux_outputs"])
    loss.backward()
    for name in ("transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
                 "transformer.encoder.layers.0.self_attn.value_proj.weight",
                 "transformer.decoder.layers.0.cross_attn.attention_weights.weight",
                 "transformer.pos_trans.weight", "input_proj.3.0.weight", "backbone.0.body.layer4.0.conv1.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert model.backbone[0].body.conv1.weight.grad is None


def test_dilation_and_custom_resnet():
    cfg = small_cfg("base").replace(backbone="resnet50", backbone_width=8, dilation=True, num_feature_levels=1)
    model = build_model(cfg).eval()
    assert model.backbone.strides == [16]
    feats, _, _ = model.backbone(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert feats[-1].shape == (1, 256, 4, 4)  # C5 at stride 16, 32 * 8 channels
    with pytest.raises(ValueError, match="dilation"):
        build_model(small_cfg("base").replace(dilation=True))
    spec = resnet_spec(ModelConfig(backbone="resnet", backbone_block="basic", backbone_depths=[1, 2, 1, 1],
                                   backbone_channels=[16, 32, 64, 128], backbone_stem_channels=8))
    assert spec.depths == (1, 2, 1, 1) and spec.channels == (16, 32, 64, 128) and spec.stem_channels == 8


def test_config_round_trip_and_errors():
    cfg = small_cfg("two-stage")
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.variant == "two-stage"
    with pytest.raises(ValueError, match="'bogus'"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="two_stage"):
        ModelConfig(two_stage=True)
    with pytest.raises(ValueError, match="variant"):
        apply_variant(cfg, "three-stage")
    with pytest.raises(ValueError, match="num_feature_levels"):
        ModelConfig(num_feature_levels=2)
    with pytest.raises(ValueError, match="preset"):
        preset("r51")
    assert apply_variant(cfg, "base").variant == "base" and apply_variant(cfg, "refine").variant == "refine"


def test_presets():
    assert {"r50", "r50-refine", "r50-two-stage", "tiny"} <= set(PRESETS)
    r50 = preset("r50")
    assert (r50.num_classes, r50.d_model, r50.nheads, r50.num_feature_levels, r50.enc_layers, r50.dec_layers,
            r50.dim_feedforward, r50.num_queries, r50.dropout) == (91, 256, 8, 4, 6, 6, 1024, 300, 0.1)
    assert preset("r50-two-stage").variant == "two-stage" and preset("r50-refine").variant == "refine"
    tiny = preset("tiny", num_classes=3)
    assert tiny.num_classes == 3 and PRESETS["tiny"].num_classes == 91
    spec = resnet_spec(tiny)
    assert spec.block == "basic" and spec.channels == (32, 64, 128, 256)
    model = build_model(tiny).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
    assert out["pred_logits"].shape == (1, tiny.num_queries, 3)
    assert sum(p.numel() for p in model.parameters()) < 10_000_000


def test_postprocess_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3)
    boxes = torch.rand(2, 5, 4) * 0.5 + 0.25
    sizes = torch.tensor([[100, 200], [50, 40]])
    res = postprocess({"pred_logits": logits, "pred_boxes": boxes}, sizes, top_k=4)
    for b in range(2):
        prob = logits[b].sigmoid()
        flat = [(prob[q, c].item(), q, c) for q in range(5) for c in range(3)]
        flat.sort(reverse=True)
        h, w = sizes[b].tolist()
        for k, (score, q, c) in enumerate(flat[:4]):
            assert res[b]["scores"][k].item() == pytest.approx(score)
            assert res[b]["labels"][k].item() == c and res[b]["labels"].dtype == torch.int64
            expected = box_cxcywh_to_xyxy(boxes[b, q]) * torch.tensor([w, h, w, h])
            torch.testing.assert_close(res[b]["boxes"][k], expected)
    thr = postprocess({"pred_logits": logits, "pred_boxes": boxes}, sizes, top_k=100, score_threshold=0.5)
    for b in range(2):
        assert len(thr[b]["scores"]) == int((logits[b].sigmoid() >= 0.5).sum())
        assert (thr[b]["scores"] >= 0.5).all()
    with pytest.raises(ValueError, match="target_sizes"):
        postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[1, 2]]))


@pytest.mark.parametrize("variant", ["base", "two-stage"])
def test_bf16_autocast_forward_backward(variant):
    model = make_model(variant).train()
    images, mask = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, mask)
    ref = make_model(variant).eval()
    with torch.no_grad():
        fp32 = ref(images, mask)
    assert out["pred_boxes"].dtype == torch.float32  # boxes come out of float32 reference-point math
    assert torch.isfinite(out["pred_logits"].float()).all() and torch.isfinite(out["pred_boxes"]).all()
    if variant == "base":  # (two-stage picks its top-k proposals from near-tied scores at init)
        assert (out["pred_boxes"] - fp32["pred_boxes"]).abs().max() < 0.05
    (out["pred_logits"].float().sum() + out["pred_boxes"].sum()).backward()
    grad = model.transformer.encoder.layers[0].self_attn.sampling_offsets.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
