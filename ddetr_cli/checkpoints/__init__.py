"""Model weights in every supported layout, and :func:`load_model`.

Accepted sources:

* a short name (``r50``, ``r50-refine``, ``r50-two-stage``) or a Hugging Face
  hub id ``owner/name[@revision]``: fetched into the Hugging Face cache by
  :mod:`.hub` (``huggingface_hub``), then loaded as a Hugging Face directory;
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

from ..errors import HubError
from .hub import DEFAULT_MODEL, SHORT_NAMES, resolve
from .huggingface import load_huggingface
from .io import CheckpointError, safe_torch_load
from .native import is_native_payload, load_safetensors_model, model_from_payload, model_payload, save_model
from .official import HF_URL, OFFICIAL_URL, is_official_state_dict, load_official, official_allow_list
from .torchvision import load_backbone_weights

__all__ = ["DEFAULT_MODEL", "SHORT_NAMES", "CheckpointError", "HubError", "load_backbone_weights", "load_model",
           "model_payload", "resolve", "save_model"]


def _missing_message(path: Path) -> str:
    return (f"{path}: no such file or directory. Pass a local file or folder, a short name "
            f"({', '.join(SHORT_NAMES)}) or a Hugging Face hub id such as {SHORT_NAMES[DEFAULT_MODEL]}; "
            f"official release .pth files are at {OFFICIAL_URL}, Hugging Face models at {HF_URL}")


def load_model(source: str | Path, device: str | torch.device = "cpu", *, msda_backend: str | None = None):
    """The :class:`~ddetr_cli.models.DeformableDETR` stored at ``source`` (a path,
    a short name or a hub id, see :func:`.hub.resolve`), on ``device``, in eval
    mode. ``msda_backend`` (auto | native | torch) overrides the stored choice.
    Raises :class:`CheckpointError` naming the file (:class:`HubError` for hub
    models that could not be fetched)."""
    path = resolve(source).path
    if path.suffix == ".onnx" and path.is_file():
        raise CheckpointError(f"{path}: an ONNX graph, not PyTorch weights; predict, eval and bench run it "
                              "through onnxruntime (ddetr_cli.engine.run_predict.load_runner); training and export need "
                              "PyTorch weights", param="weights")
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
