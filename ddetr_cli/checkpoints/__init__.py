"""Model weights in every supported layout, and :func:`load_model`.

Accepted sources (never downloaded: pass a local path):

* a ddetr file: ``.pt``/``.pth`` payload or ``.safetensors`` + ``<stem>.json``
  (also training checkpoints, whose ``model`` weights are used);
* an official Deformable DETR release ``.pth`` (``{"model", "args"}``);
* a Hugging Face ``DeformableDetrForObjectDetection`` directory.

ImageNet ResNet weights are not a detector: load them into a model's
backbone with :func:`load_backbone_weights`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .huggingface import load_huggingface
from .io import CheckpointError, safe_torch_load
from .native import is_native_payload, load_safetensors_model, model_from_payload, model_payload, save_model
from .official import HF_URL, OFFICIAL_URL, is_official_state_dict, load_official, official_allow_list
from .torchvision import load_backbone_weights

__all__ = ["CheckpointError", "load_backbone_weights", "load_model", "model_payload", "save_model"]


def _missing_message(path: Path) -> str:
    return (f"{path}: no such file or directory. ddetr never downloads weights at run time; get them first: "
            f"official release .pth files from {OFFICIAL_URL}, Hugging Face directories from {HF_URL} "
            f"(e.g. `huggingface-cli download SenseTime/deformable-detr --local-dir DIR`)")


def load_model(source: str | Path, device: str | torch.device = "cpu", *, msda_backend: str | None = None):
    """The :class:`~ddetr_cli.models.DeformableDETR` stored at ``source``, on
    ``device``, in eval mode. ``msda_backend`` (auto | native | torch) overrides
    the stored choice. Raises :class:`CheckpointError` naming the file."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(_missing_message(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            model = load_huggingface(path, msda_backend=msda_backend)
        else:
            raise CheckpointError(f"{path}: a directory without config.json (expected a Hugging Face model directory)")
    elif path.suffix == ".safetensors":
        model = load_safetensors_model(path, msda_backend=msda_backend)
    elif path.name == "config.json":
        model = load_huggingface(path.parent, msda_backend=msda_backend)
    else:
        obj = safe_torch_load(path, allow=official_allow_list())
        if is_native_payload(obj):
            model = model_from_payload(obj, path, msda_backend=msda_backend)
        elif isinstance(obj, Mapping) and (
            isinstance(obj.get("model"), Mapping) and is_official_state_dict(obj["model"]) or is_official_state_dict(obj)
        ):
            model = load_official(path, obj, msda_backend=msda_backend)
        elif isinstance(obj, Mapping) and "conv1.weight" in obj and "layer1.0.conv1.weight" in obj:
            raise CheckpointError(f"{path}: ImageNet ResNet weights, not a detector; use them as backbone weights "
                                  "(load_backbone_weights / the training option for a pretrained backbone)")
        else:
            what = f"a dict with keys {', '.join(list(map(str, obj))[:5])}" if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{path}: not a Deformable DETR checkpoint (found {what})")
    return model.to(device).eval()
