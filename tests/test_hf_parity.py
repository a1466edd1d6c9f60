"""Exactness against transformers' DeformableDetrForObjectDetection.

Small randomly initialised HF models (a transformers ResNet backbone, no timm,
nothing downloaded), every parameter and buffer perturbed so that a wrong
mapping cannot hide behind an init constant, saved with ``save_pretrained``
and loaded with :func:`load_model`; eval outputs on a padded batch of two
images of different sizes must match to 1e-4, with both op backends. The same
weights also go through the official layout (a ``.pth`` with an ``args``
Namespace) and through hub-style timm backbone names.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from ddetr_cli.checkpoints import load_model  # noqa: E402

TOL = 1e-4
VARIANTS = {
    "base": dict(with_box_refine=False, two_stage=False, num_feature_levels=4),
    "box-refine": dict(with_box_refine=True, two_stage=False, num_feature_levels=4),
    "two-stage": dict(with_box_refine=True, two_stage=True, num_feature_levels=4),
    "single-scale": dict(with_box_refine=False, two_stage=False, num_feature_levels=1),
    # a bottleneck ResNet (the ResNet-50 block), with box refinement
    "bottleneck-refine": dict(with_box_refine=True, two_stage=False, num_feature_levels=4, layer_type="bottleneck"),
}
_CACHE: dict[str, tuple] = {}


def build_hf(variant: str):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    opts = dict(VARIANTS[variant])
    layer_type = opts.pop("layer_type", "basic")
    out_features = ["stage2", "stage3", "stage4"] if opts["num_feature_levels"] > 1 else ["stage4"]
    sizes = [16, 32, 64, 96] if layer_type == "basic" else [32, 64, 128, 192]
    backbone = ResNetConfig(layer_type=layer_type, depths=[1, 2, 1, 1], hidden_sizes=sizes,
                            embedding_size=16, out_features=out_features)
    config = DeformableDetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=96, decoder_ffn_dim=96,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_n_points=3, decoder_n_points=2,
        num_queries=15, two_stage_num_proposals=15, num_labels=6, **opts,
    )
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.copy_(noise.abs() + 0.5)
            else:
                t.add_(noise * 0.05 if t.dim() > 1 else noise * 0.2)
    return model


def padded_batch():
    gen = torch.Generator().manual_seed(2)
    big = torch.randn(3, 96, 128, generator=gen)
    small = torch.randn(3, 70, 90, generator=gen)
    images = torch.zeros(2, 3, 96, 128)
    mask = torch.ones(2, 96, 128, dtype=torch.bool)  # True = padding
    images[0], mask[0] = big, False
    images[1, :, :70, :90], mask[1, :70, :90] = small, False
    return images, mask


def hf_case(variant: str, tmp_path_factory):
    if variant not in _CACHE:
        model = build_hf(variant)
        directory = tmp_path_factory.mktemp(f"hf-{variant}")
        model.save_pretrained(directory)
        images, mask = padded_batch()
        with torch.no_grad():
            ref = model(pixel_values=images, pixel_mask=(~mask).long())
        _CACHE[variant] = (model, directory, ref.logits, ref.pred_boxes)
    return _CACHE[variant]


def max_diffs(model, ref_logits, ref_boxes):
    images, mask = padded_batch()
    with torch.no_grad():
        out = model(images, mask)
    return (out["pred_logits"] - ref_logits).abs().max().item(), (out["pred_boxes"] - ref_boxes).abs().max().item()


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_directory_matches_transformers(variant, backend, tmp_path_factory):
    hf, directory, ref_logits, ref_boxes = hf_case(variant, tmp_path_factory)
    model = load_model(directory, msda_backend=backend)
    expected = {"box-refine": "refine", "single-scale": "base", "bottleneck-refine": "refine"}.get(variant, variant)
    assert model.config.variant == expected
    assert model.config.num_feature_levels == VARIANTS[variant]["num_feature_levels"]
    assert model.config.backbone_depths == [1, 2, 1, 1]
    assert model.config.backbone_block == VARIANTS[variant].get("layer_type", "basic")
    assert model.class_names == [hf.config.id2label[i] for i in range(6)]
    d_logits, d_boxes = max_diffs(model, ref_logits, ref_boxes)
    assert d_logits <= TOL and d_boxes <= TOL, (variant, backend, d_logits, d_boxes)


@pytest.mark.parametrize("variant", ["two-stage", "bottleneck-refine"])
def test_fused_model_matches_transformers(variant, tmp_path_factory):
    """What predict and eval run: the loaded model fused for inference (batch norm
    folded into the convolutions, backbone in channels_last)."""
    from ddetr_cli.engine.loops.runner import load_runner
    from ddetr_cli.models.fuse import is_fused

    _, directory, ref_logits, ref_boxes = hf_case(variant, tmp_path_factory)
    model = load_runner(directory, "cpu").model
    assert is_fused(model)
    d_logits, d_boxes = max_diffs(model, ref_logits, ref_boxes)
    assert d_logits <= TOL and d_boxes <= TOL, (variant, d_logits, d_boxes)


# --- the official layout, written from the HF model by an independent renaming ---

_OFFICIAL_RULES = [
    (r"^model\.backbone\.model\.embedder\.embedder\.convolution\.", "backbone.0.body.conv1."),
    (r"^model\.backbone\.model\.embedder\.embedder\.normalization\.", "backbone.0.body.bn1."),
    (r"^model\.backbone\.model\.encoder\.stages\.(\d)\.layers\.(\d)\.shortcut\.convolution\.", "backbone.0.body.layer<\\1>.\\2.downsample.0."),
    (r"^model\.backbone\.model\.encoder\.stages\.(\d)\.layers\.(\d)\.shortcut\.normalization\.", "backbone.0.body.layer<\\1>.\\2.downsample.1."),
    (r"^model\.backbone\.model\.encoder\.stages\.(\d)\.layers\.(\d)\.layer\.(\d)\.convolution\.", "backbone.0.body.layer<\\1>.\\2.conv<\\3>."),
    (r"^model\.backbone\.model\.encoder\.stages\.(\d)\.layers\.(\d)\.layer\.(\d)\.normalization\.", "backbone.0.body.layer<\\1>.\\2.bn<\\3>."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.", "transformer.encoder.layers.\\1.norm1."),
    (r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.", "transformer.encoder.layers.\\1.norm2."),
    (r"^model\.encoder\.layers\.(\d+)\.mlp\.fc1\.", "transformer.encoder.layers.\\1.linear1."),
    (r"^model\.encoder\.layers\.(\d+)\.mlp\.fc2\.", "transformer.encoder.layers.\\1.linear2."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn\.", "transformer.encoder.layers.\\1.self_attn."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", "transformer.decoder.layers.\\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", "transformer.decoder.layers.\\1.norm1."),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.", "transformer.decoder.layers.\\1.norm3."),
    (r"^model\.decoder\.layers\.(\d+)\.mlp\.fc1\.", "transformer.decoder.layers.\\1.linear1."),
    (r"^model\.decoder\.layers\.(\d+)\.mlp\.fc2\.", "transformer.decoder.layers.\\1.linear2."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.", "transformer.decoder.layers.\\1.cross_attn."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.o_proj\.", "transformer.decoder.layers.\\1.self_attn.out_proj."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", "transformer.decoder.layers.\\1.self_attn.\\2_proj."),
    (r"^model\.decoder\.(bbox_embed|class_embed)\.", "transformer.decoder.\\1."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.input_proj\.", "input_proj."),
    (r"^model\.(level_embed|reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\b", "transformer.\\1"),
    (r"^(class_embed|bbox_embed)\.", "\\1."),
]


def to_official(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF in-memory names (transformers 5) -> official release keys, every alias included."""
    out = {}
    for key, value in hf_state.items():
        for pattern, template in _OFFICIAL_RULES:
            if re.match(pattern, key):
                new = re.sub(pattern, template, key)
                # torchvision counts stages and convs from 1
                new = re.sub(r"<(\d)>", lambda m: str(int(m.group(1)) + 1), new)
                out[new] = value.clone()
                break
        else:
            raise AssertionError(f"no official name for {key}")
    for key in [k for k in out if k.endswith("self_attn.q_proj.weight") or k.endswith("self_attn.q_proj.bias")]:
        stem, kind = key.rsplit(".q_proj.", 1)
        out[f"{stem}.in_proj_{kind}"] = torch.cat([out.pop(f"{stem}.{p}_proj.{kind}") for p in "qkv"])
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_layout_matches_transformers(variant, tmp_path, tmp_path_factory):
    hf, _, ref_logits, ref_boxes = hf_case(variant, tmp_path_factory)
    cfg = hf.config
    args = argparse.Namespace(
        backbone="resnet50", dilation=False, position_embedding="sine", position_embedding_scale=np.float64(2 * math.pi),
        num_feature_levels=cfg.num_feature_levels, enc_layers=2, dec_layers=2, dim_feedforward=96, hidden_dim=64,
        dropout=0.1, nheads=4, num_queries=15, dec_n_points=2, enc_n_points=3, with_box_refine=cfg.with_box_refine,
        two_stage=cfg.two_stage, masks=False, aux_loss=True,
    )
    torch.save({"model": to_official(hf.state_dict()), "args": args, "epoch": 49}, tmp_path / "checkpoint.pth")
    for backend in ("native", "torch"):
        model = load_model(tmp_path / "checkpoint.pth", msda_backend=backend)
        d_logits, d_boxes = max_diffs(model, ref_logits, ref_boxes)
        assert d_logits <= TOL and d_boxes <= TOL, (variant, backend, d_logits, d_boxes)


def test_hub_style_timm_backbone_names(tmp_path, tmp_path_factory):
    """``model.backbone.conv_encoder.model.conv1.weight``, ``...layer1.0.conv1.weight``,
    ``...bn1.running_mean`` (the names of the SenseTime hub checkpoints) load too,
    here from a ``pytorch_model.bin`` (read with weights_only=True)."""
    from safetensors.torch import load_file

    _, directory, ref_logits, ref_boxes = hf_case("base", tmp_path_factory)
    saved = load_file(str(directory / "model.safetensors"))
    assert any(k.startswith("model.backbone.conv_encoder.model.embedder.") for k in saved)
    renamed = {}
    for key, value in saved.items():
        m = re.match(r"^model\.backbone\.conv_encoder\.model\.(.+)$", key)
        if m:
            rest = m.group(1)
            rest = re.sub(r"^embedder\.embedder\.convolution\.", "conv1.", rest)
            rest = re.sub(r"^embedder\.embedder\.normalization\.", "bn1.", rest)
            rest = re.sub(r"^encoder\.stages\.(\d)\.layers\.(\d)\.shortcut\.convolution\.",
                          lambda g: f"layer{int(g.group(1)) + 1}.{g.group(2)}.downsample.0.", rest)
            rest = re.sub(r"^encoder\.stages\.(\d)\.layers\.(\d)\.shortcut\.normalization\.",
                          lambda g: f"layer{int(g.group(1)) + 1}.{g.group(2)}.downsample.1.", rest)
            rest = re.sub(r"^encoder\.stages\.(\d)\.layers\.(\d)\.layer\.(\d)\.convolution\.",
                          lambda g: f"layer{int(g.group(1)) + 1}.{g.group(2)}.conv{int(g.group(3)) + 1}.", rest)
            rest = re.sub(r"^encoder\.stages\.(\d)\.layers\.(\d)\.layer\.(\d)\.normalization\.",
                          lambda g: f"layer{int(g.group(1)) + 1}.{g.group(2)}.bn{int(g.group(3)) + 1}.", rest)
            key = "model.backbone.conv_encoder.model." + rest
        renamed[key] = value
    for key in ("model.backbone.conv_encoder.model.conv1.weight", "model.backbone.conv_encoder.model.layer1.0.conv1.weight",
                "model.backbone.conv_encoder.model.bn1.running_mean"):
        assert key in renamed
    renamed["model.backbone.conv_encoder.model.bn1.num_batches_tracked"] = torch.tensor(0)
    hub = tmp_path / "hub"
    hub.mkdir()
    shutil.copy(directory / "config.json", hub / "config.json")
    torch.save(renamed, hub / "pytorch_model.bin")
    model = load_model(hub)
    d_logits, d_boxes = max_diffs(model, ref_logits, ref_boxes)
    assert d_logits <= TOL and d_boxes <= TOL, (d_logits, d_boxes)


def test_hf_mismatch_is_a_clear_error(tmp_path, tmp_path_factory):
    from safetensors.torch import load_file, save_file

    _, directory, _, _ = hf_case("base", tmp_path_factory)
    sd = load_file(str(directory / "model.safetensors"))
    sd["class_embed.0.weight"] = torch.zeros(9, 64)
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(Exception, match=r"class_embed\.0\.bias: checkpoint \(6,\) vs model \(9,\)"):
        load_model(tmp_path)
