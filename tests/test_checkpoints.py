"""Checkpoint files: ddetr payloads and safetensors, official release layout,
torchvision backbone weights, and the errors for bad files."""

from __future__ import annotations

import argparse
import json
import math
import os
import random

import numpy as np
import pytest
import torch

from ddetr_cli.checkpoints import CheckpointError, load_backbone_weights, load_model, model_payload, save_model
from ddetr_cli.checkpoints.coco_names import COCO_CLASS_NAMES
from ddetr_cli.checkpoints.native import sidecar_path
from ddetr_cli.checkpoints.official import official_payload
from ddetr_cli.models import ModelConfig, apply_variant, build_model


def small_model(variant: str = "base", seed: int = 0, **kw):
    base = dict(num_classes=5, backbone="resnet18", backbone_width=16, d_model=64, nheads=8, enc_layers=2,
                dec_layers=2, dim_feedforward=96, num_queries=10, dropout=0.0)
    torch.manual_seed(seed)
    model = build_model(apply_variant(ModelConfig(**{**base, **kw}), variant))
    with torch.no_grad():  # move every head away from its init so aliasing mistakes show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def outputs(model):
    torch.manual_seed(5)
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    with torch.no_grad():
        return model(images, mask)


def assert_same(a, b, atol=0.0):
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


@pytest.mark.parametrize("variant", ["base", "refine", "two-stage"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_native_round_trip(tmp_path, variant, suffix):
    model = small_model(variant)
    model.class_names = ["cat", "dog", "fox", "owl", "eel"]
    model.category_ids = [3, 5, 7, 11, 13]
    path = save_model(model, tmp_path / f"m{suffix}")
    if suffix == ".safetensors":
        meta = json.loads(sidecar_path(path).read_text())
        assert meta["format"] == "ddetr" and meta["model_config"]["two_stage"] == (variant == "two-stage")
    else:
        payload = torch.load(path, weights_only=True)  # no allow-list needed
        assert payload["format"] == "ddetr" and payload["version"] == 1
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.class_names == model.class_names and loaded.category_ids == model.category_ids
    assert_same(outputs(model), outputs(loaded))


def test_safetensors_without_sidecar_uses_header(tmp_path):
    model = small_model("refine")
    path = save_model(model, tmp_path / "m.safetensors")
    os.unlink(sidecar_path(path))
    assert_same(outputs(model), outputs(load_model(path, msda_backend="torch")), atol=1e-4)


def test_training_checkpoint_uses_model_weights(tmp_path):
    model = small_model("base")
    other = small_model("base", seed=1)
    payload = {**model_payload(model), "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
               "ema_model": other.state_dict()}
    torch.save(payload, tmp_path / "last.pt")
    assert_same(outputs(model), outputs(load_model(tmp_path / "last.pt")))


def official_args(model, **extra) -> argparse.Namespace:
    cfg = model.config
    return argparse.Namespace(
        backbone=cfg.backbone, dilation=False, position_embedding="sine", position_embedding_scale=np.float64(2 * math.pi),
        num_feature_levels=cfg.num_feature_levels, enc_layers=cfg.enc_layers, dec_layers=cfg.dec_layers,
        dim_feedforward=cfg.dim_feedforward, hidden_dim=cfg.d_model, dropout=cfg.dropout, nheads=cfg.nheads,
        num_queries=cfg.num_queries, dec_n_points=cfg.dec_n_points, enc_n_points=cfg.enc_n_points,
        with_box_refine=cfg.with_box_refine, two_stage=cfg.two_stage, masks=False, lr=2e-4, **extra)


@pytest.mark.parametrize("variant", ["base", "refine", "two-stage", "single-scale"])
def test_official_layout_round_trip(tmp_path, variant):
    kw = {"num_feature_levels": 1} if variant == "single-scale" else {}
    model = small_model("base" if variant == "single-scale" else variant, **kw)
    ckpt = {"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "lr_scheduler": {"step_size": 40}, "epoch": 49, "args": official_args(model)}
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    with pytest.raises(Exception):  # the Namespace (and numpy scalar) need the allow-list
        torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    loaded = load_model(tmp_path / "checkpoint.pth")
    assert loaded.config.variant == model.config.variant
    assert loaded.config.num_feature_levels == model.config.num_feature_levels
    assert loaded.config.num_queries == 10 and loaded.config.enc_layers == 2 and loaded.config.backbone == "resnet18"
    assert_same(outputs(model), outputs(loaded))


def test_official_ddp_prefix_and_bare_state_dict(tmp_path):
    model = small_model("refine")
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "bare.pth")
    loaded = load_model(tmp_path / "bare.pth")  # no args: 8 heads assumed, points from shapes
    assert_same(outputs(model), outputs(loaded))


def test_official_coco_labels(tmp_path):
    model = small_model("base", num_classes=91)
    torch.save(official_payload(model), tmp_path / "coco.pth")
    loaded = load_model(tmp_path / "coco.pth")
    assert loaded.class_names == COCO_CLASS_NAMES and loaded.class_names[1] == "person"
    assert loaded.class_names[90] == "toothbrush" and loaded.class_names[12] == "N/A"
    assert loaded.category_ids == list(range(91))
    assert sum(n != "N/A" for n in COCO_CLASS_NAMES) == 80


def test_corrupt_and_truncated_files(tmp_path):
    model = small_model("base")
    good = save_model(model, tmp_path / "good.pt")
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    for name in ("trunc.pt",):
        with pytest.raises(CheckpointError, match=name):
            load_model(tmp_path / name)
    # Random bytes fail inside the unpickler in many ways (IndexError, KeyError, ...): always one clean error.
    for seed in range(40):
        (tmp_path / "noise.pth").write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(CheckpointError, match="noise.pth"):
            load_model(tmp_path / "noise.pth")
    st = save_model(model, tmp_path / "good.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(st.read_bytes()[:1000])
    (tmp_path / "bad.json").write_text(sidecar_path(st).read_text())
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_model(tmp_path / "bad.safetensors")


class _Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())


def test_disallowed_global_is_refused(tmp_path):
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Sneaky()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth.*weights_only"):
        load_model(tmp_path / "evil.pth")


def test_missing_file_says_where_weights_come_from(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "r50_deformable_detr-checkpoint.pth")
    msg = str(info.value)
    assert "r50_deformable_detr-checkpoint.pth" in msg and "github.com/fundamentalvision/Deformable-DETR" in msg
    assert "huggingface.co/SenseTime/deformable-detr" in msg and "r50-two-stage" in msg


def test_class_count_mismatch_lists_the_key(tmp_path):
    payload = model_payload(small_model("base"))
    payload["model_config"] = {**payload["model_config"], "num_classes": 9}
    payload["class_names"] = [str(i) for i in range(9)]
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match=r"mismatch\.pt.*class_embed\.0\.weight: checkpoint \(5, 64\) vs model \(9, 64\)"):
        load_model(tmp_path / "mismatch.pt")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    model = small_model("base")
    sd = model.state_dict()
    sd.pop("transformer.level_embed")
    payload = {**model_payload(model), "model": {**sd, "extra.weight": torch.zeros(1)}}
    payload["model"].pop("transformer.encoder.layers.0.norm1.weight")
    torch.save(payload, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError, match=r"keys\.pt.*missing .*norm1\.weight.*unexpected extra\.weight"):
        load_model(tmp_path / "keys.pt")


def test_unknown_config_key_is_named(tmp_path):
    payload = model_payload(small_model("base"))
    payload["model_config"] = {**payload["model_config"], "hidden_dim": 64}
    torch.save(payload, tmp_path / "cfg.pt")
    with pytest.raises(CheckpointError, match="cfg.pt.*'hidden_dim'"):
        load_model(tmp_path / "cfg.pt")


def torchvision_style(model) -> dict[str, torch.Tensor]:
    """What torchvision's resnet state dict looks like: BatchNorm with num_batches_tracked, plus fc."""
    sd = {}
    for k, v in model.backbone[0].body.state_dict().items():
        sd[k] = v.clone() + torch.randn_like(v).abs() * 0.1
        if k.endswith("running_var"):
            sd[k.replace("running_var", "num_batches_tracked")] = torch.tensor(100)
    sd["fc.weight"] = torch.randn(1000, 128)
    sd["fc.bias"] = torch.randn(1000)
    return sd


def test_torchvision_backbone_weights(tmp_path):
    model = small_model("base")
    sd = torchvision_style(model)
    torch.save(sd, tmp_path / "resnet18-f37072fd.pth")
    fresh = small_model("base", seed=3)
    assert load_backbone_weights(fresh, tmp_path / "resnet18-f37072fd.pth") is fresh
    body = fresh.backbone[0].body.state_dict()
    for k, v in body.items():
        torch.testing.assert_close(v, sd[k])
    assert fresh.backbone[0].body.layer1[0].conv1.weight.requires_grad is False
    # the wrong depth: a ResNet-50 layout into a ResNet-18 backbone
    r50 = small_model("base", backbone="resnet50", backbone_width=8)
    torch.save(torchvision_style(r50), tmp_path / "resnet50.pth")
    with pytest.raises(CheckpointError, match="resnet50.pth.*(missing|unexpected|shape)"):
        load_backbone_weights(fresh, tmp_path / "resnet50.pth")
    # and as a detector it is refused with a hint
    with pytest.raises(CheckpointError, match="backbone"):
        load_model(tmp_path / "resnet18-f37072fd.pth")


def test_hf_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deformable_detr"}))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_input_size_round_trip(tmp_path, suffix):
    from ddetr_cli.checkpoints import load_model
    from ddetr_cli.checkpoints.native import save_model
    from ddetr_cli.models import build_model, preset

    model = build_model(preset("tiny", num_classes=2))
    assert load_model(save_model(model, tmp_path / f"none{suffix}")).input_size is None
    model.input_size = (128, 160)
    assert load_model(save_model(model, tmp_path / f"m{suffix}")).input_size == (128, 160)


def test_input_size_from_an_older_training_checkpoint(tmp_path):
    import torch

    from ddetr_cli.checkpoints import CheckpointError, load_model
    from ddetr_cli.checkpoints.native import model_payload
    from ddetr_cli.models import build_model, preset

    payload = model_payload(build_model(preset("tiny", num_classes=2)))
    del payload["input_size"]
    payload["train_config"] = {"eval_size": 96, "eval_max_size": 120}
    torch.save(payload, tmp_path / "last.pt")
    assert load_model(tmp_path / "last.pt").input_size == (96, 120)
    payload["input_size"] = [96, "big"]
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt: input_size"):
        load_model(tmp_path / "bad.pt")
