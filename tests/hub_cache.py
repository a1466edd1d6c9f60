"""A Hugging Face hub cache built on disk, for tests that must not touch the network.

``make_hub_cache(root, repo_id, variant)`` writes the layout ``huggingface_hub``
reads offline::

    root/models--Owner--name/refs/main                     (the commit hash)
    root/models--Owner--name/snapshots/<hash>/config.json
    root/models--Owner--name/snapshots/<hash>/pytorch_model.bin

The weights are a randomly initialised small transformers
``DeformableDetrForObjectDetection`` whose backbone is saved under timm names
(``...conv_encoder.model.conv1.weight``, ``layer1.0.conv1.weight``), as the
SenseTime hub repositories have them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

VARIANTS = {
    "base": dict(with_box_refine=False, two_stage=False, num_feature_levels=4),
    "refine": dict(with_box_refine=True, two_stage=False, num_feature_levels=4),
    "two-stage": dict(with_box_refine=True, two_stage=True, num_feature_levels=4),
}
LABELS = ["N/A", "person", "bicycle", "car", "motorcycle", "airplane"]


def build_hf(variant: str, seed: int = 0):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(layer_type="basic", depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], embedding_size=16,
                            out_features=["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=48, decoder_ffn_dim=48,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_n_points=2, decoder_n_points=2,
        num_queries=10, two_stage_num_proposals=10, num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}, **VARIANTS[variant],
    )
    torch.manual_seed(seed)
    model = DeformableDetrForObjectDetection(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen)
                t.copy_(noise.abs() + 0.5) if name.endswith("running_var") else t.add_(noise * 0.05)
    return model


def timm_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ResNet backbone keys -> timm keys (the hub checkpoints' layout)."""
    out = {}
    for key, value in sd.items():
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
        out[key] = value
    return out


def make_hub_cache(root: Path, repo_id: str, variant: str = "two-stage", seed: int = 0):
    """Writes ``repo_id`` (main) into the hub cache at ``root``; returns (snapshot folder, the transformers model)."""
    from safetensors.torch import load_file

    model = build_hf(variant, seed)
    tmp = root / f".build-{repo_id.replace('/', '--')}"
    model.save_pretrained(tmp)
    sd = timm_names(load_file(str(tmp / "model.safetensors")))
    commit = hashlib.sha1(f"{repo_id}-{variant}-{seed}".encode()).hexdigest()
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "config.json").write_text((tmp / "config.json").read_text())
    torch.save(sd, snap / "pytorch_model.bin")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    json.loads((snap / "config.json").read_text())  # sanity
    return snap, model
