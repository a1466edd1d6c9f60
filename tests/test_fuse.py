"""Inference fusion: batch norm folded into the convolutions (and the backbone
in channels_last) computes what the unfused model does, and stays out of
everything that saves, exports or trains a model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ddetr_cli.errors import CheckpointError, DdetrError
from ddetr_cli.models import build_model, fuse_for_inference, preset
from ddetr_cli.models.backbone import BatchNorm2d, FrozenBatchNorm2d

NORMS = (FrozenBatchNorm2d, BatchNorm2d, nn.BatchNorm2d)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics and affine parameters in every batch norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORMS):
                c = m.running_mean.shape[0]
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
    return model


def padded_batch(h: int = 128, w: int = 160) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, h, w, generator=g)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[1, :, w * 3 // 4:] = True
    images[1][:, mask[1]] = 0.0
    return images, mask


def assert_same_outputs(a: nn.Module, b: nn.Module, images, mask, atol: float = 1e-5) -> None:
    with torch.inference_mode():
        want, got = a(images, mask), b(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol)


@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_r50_matches_unfused(channels_last):
    torch.manual_seed(0)
    model = randomize_norms(build_model(preset("r50"))).eval()
    fused = fuse_for_inference(copy.deepcopy(model), channels_last=channels_last)
    assert not any(isinstance(m, NORMS) for m in fused.modules())
    convs = [m for m in fused.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53 and all(c.bias is not None for c in convs)  # R50: every conv had a batch norm
    assert convs[0].weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert_same_outputs(model, fused, *padded_batch())


def test_fused_tiny_with_learnt_batch_norm_matches_unfused():
    """The tiny preset learns its batch norm: after some training-mode steps its
    running statistics are its own, and in eval mode the fused model agrees."""
    torch.manual_seed(0)
    model = build_model(preset("tiny", num_classes=3, backbone_norm="batch", backbone_frozen_stages=-1))
    assert any(isinstance(m, BatchNorm2d) for m in model.modules())
    model.train()
    with torch.no_grad():
        for seed in range(3):  # moves the running statistics away from (0, 1)
            model(torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5)
    model.eval()
    fused = fuse_for_inference(copy.deepcopy(model))
    assert not any(isinstance(m, NORMS) for m in fused.modules())
    assert_same_outputs(model, fused, *padded_batch(96, 128))


def test_fused_model_is_inference_only():
    model = build_model(preset("tiny", num_classes=3)).eval()
    with pytest.raises(DdetrError, match="eval mode") as err:
        fuse_for_inference(build_model(preset("tiny", num_classes=3)))  # still in training mode
    assert err.value.param == "model"
    fused = fuse_for_inference(model)
    assert fuse_for_inference(fused) is fused  # a second call does nothing
    fused.eval()  # eval mode stays allowed
    with pytest.raises(DdetrError, match="fused for inference"):
        fused.train()


def test_fused_model_cannot_be_saved(tmp_path):
    from ddetr_cli.checkpoints import model_payload, save_model

    fused = fuse_for_inference(build_model(preset("tiny", num_classes=3)).eval())
    for call in (lambda: save_model(fused, tmp_path / "m.pt"), lambda: save_model(fused, tmp_path / "m.safetensors"),
                 lambda: model_payload(fused)):
        with pytest.raises(CheckpointError, match="fused for inference"):
            call()
    assert not list(tmp_path.iterdir())


def test_inference_runner_fuses_but_load_model_keeps_the_official_layout(tmp_path):
    """predict/eval (load_runner) run a fused copy; load_model, which export,
    fine-tuning and saving read, returns the official layout."""
    from ddetr_cli.checkpoints import load_model, save_model
    from ddetr_cli.engine.loops.runner import load_runner
    from ddetr_cli.models.fuse import is_fused

    torch.manual_seed(0)
    model = randomize_norms(build_model(preset("tiny", num_classes=3))).eval()
    path = save_model(model, tmp_path / "m.pt")
    keys = set(model.state_dict())
    assert any(k.endswith("bn1.running_var") for k in keys)

    loaded = load_model(path)
    assert not is_fused(loaded) and set(loaded.state_dict()) == keys
    runner = load_runner(path, "cpu")
    assert is_fused(runner.model) and runner.model is not loaded
    assert runner.model.backbone[0].body.channels_last  # the default on a CPU
    assert not any(k.endswith("running_var") for k in runner.model.state_dict())
    images, mask = padded_batch(96, 128)
    got = runner(images, mask)
    with torch.inference_mode():
        want = loaded(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)
    save_model(loaded, tmp_path / "again.pt")  # the unfused model saves as before
    assert set(load_model(tmp_path / "again.pt").state_dict()) == keys
