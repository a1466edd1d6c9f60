"""torchvision ImageNet ResNet weights (``resnet50-0676ba61.pth`` and the like)
into the backbone of a model (``backbone.0.body``).

``fc.*`` is dropped; BatchNorm statistics and affine parameters become the
frozen batch-norm buffers (``num_batches_tracked`` is dropped).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .io import CheckpointError, safe_torch_load


def _unwrap(obj, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping) and "conv1.weight" not in obj:
                obj = obj[key]
                break
        return obj
    raise CheckpointError(f"{path}: expected a ResNet state dict, got {type(obj).__name__}")


def load_backbone_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Loads ImageNet ResNet weights into ``model.backbone[0].body``; returns ``model``."""
    path = Path(path)
    sd = {}
    for k, v in _unwrap(safe_torch_load(path), path).items():
        k = k[len("module."):] if k.startswith("module.") else k
        for prefix in ("backbone.0.body.", "body.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        if k.startswith("fc.") or k.endswith("num_batches_tracked") or not isinstance(v, torch.Tensor):
            continue
        sd[k] = v
    body = model.backbone[0].body
    expected = body.state_dict()
    if "conv1.weight" not in sd:
        raise CheckpointError(f"{path}: not ResNet weights (no 'conv1.weight')")
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs backbone {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch (" + "; ".join(shapes[:3]) + ("; ..." if len(shapes) > 3 else "") + ")")
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}" + (f", ... ({len(missing)} in all)" if len(missing) > 4 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}" + (f", ... ({len(unexpected)} in all)" if len(unexpected) > 4 else ""))
        raise CheckpointError(f"{path}: does not fit the {model.config.backbone} backbone: " + "; ".join(parts))
    with torch.no_grad():
        body.load_state_dict(sd, strict=True)
    return model
