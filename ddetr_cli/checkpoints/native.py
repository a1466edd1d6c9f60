"""The project's own model files.

* ``.pt``/``.pth`` (any suffix but ``.safetensors``): a ``torch.save`` of
  :func:`model_payload` — ``format="ddetr"``, ``version``, ``model`` (the
  official-layout state dict), ``model_config`` (dict), ``class_names``,
  ``category_ids``. Only tensors and plain Python values, so
  ``torch.load(weights_only=True)`` needs no allow-list.
* ``.safetensors``: the weights (tied head aliases stored once) plus a sidecar
  ``<stem>.json`` with the same metadata; the metadata is also written into the
  safetensors header, used when the sidecar is missing.

Training checkpoints are this payload plus training state (``optimizer``,
``epoch``, ``ema_model``, ...). Loading them as a model uses ``model`` — the
weights being trained — never ``ema_model``; the trainer decides which weights
it exports as ``model`` in ``best.pt``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models.config import ModelConfig
from ..models.fuse import is_fused
from .io import CheckpointError, atomic_torch_save, atomic_write, atomic_write_text
from .official import clean_state_dict, load_weights

FORMAT = "ddetr"
VERSION = 1
_META_KEY = "ddetr"


def model_metadata(model: torch.nn.Module) -> dict[str, Any]:
    """The metadata of a model file; refuses a model fused for inference (its
    state dict is not the official layout that every reader expects)."""
    if is_fused(model):
        raise CheckpointError("this model was fused for inference (fuse_for_inference) and has no official-layout "
                              "state dict to save; save the model before fusing it", param="model")
    return {
        "format": FORMAT,
        "version": VERSION,
        # the op backend is a run-time choice of the machine that loads the file
        "model_config": {**model.config.to_dict(), "msda_backend": None},
        "class_names": [str(n) for n in model.class_names],
        "category_ids": None if model.category_ids is None else [int(c) for c in model.category_ids],
        "input_size": None if getattr(model, "input_size", None) is None else [int(v) for v in model.input_size],
    }


def model_payload(model: torch.nn.Module) -> dict[str, Any]:
    """The checkpoint dict of ``model`` (CPU tensors and plain values only)."""
    meta = model_metadata(model)
    return {**meta, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".json")


def _dedup(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One key per shared tensor (safetensors refuses aliases); loading refills them."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for k, v in sd.items():
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ident in seen:
            continue
        seen.add(ident)
        out[k] = v.detach().cpu().contiguous()
    return out


def save_model(model: torch.nn.Module, path: str | Path) -> Path:
    """Writes ``model`` atomically: ``.safetensors`` (+ ``<stem>.json``) or a torch payload."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = model_metadata(model)
        tensors = _dedup(model.state_dict())
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)}))
        atomic_write_text(sidecar_path(path), json.dumps(meta, indent=2) + "\n")
        return path
    return atomic_torch_save(model_payload(model), path)


def is_native_payload(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def model_from_payload(payload: Mapping[str, Any], path: str | Path, *, msda_backend: str | None = None):
    """Builds the model of a native payload (or training checkpoint) and loads ``model``."""
    from ..models.deformable_detr import DeformableDETR

    version = payload.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{path}: ddetr checkpoint version {version!r} is not supported (this ddetr reads <= {VERSION})")
    for key in ("model", "model_config"):
        if not isinstance(payload.get(key), Mapping):
            raise CheckpointError(f"{path}: ddetr checkpoint has no {key!r} dict")
    try:
        cfg = ModelConfig.from_dict(dict(payload["model_config"]), source=f"{path}: model_config")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(str(exc) if str(exc).startswith(str(path)) else f"{path}: model_config: {exc}") from None
    if msda_backend is not None:
        cfg = cfg.replace(msda_backend=msda_backend)
    model = DeformableDETR(cfg)
    load_weights(model, clean_state_dict(payload["model"]), path)
    names = payload.get("class_names")
    if names is not None:
        if len(names) != cfg.num_classes:
            raise CheckpointError(f"{path}: class_names has {len(names)} entries, the model {cfg.num_classes} classes")
        model.class_names = [str(n) for n in names]
    ids = payload.get("category_ids")
    if ids is not None:
        if len(ids) != cfg.num_classes:
            raise CheckpointError(f"{path}: category_ids has {len(ids)} entries, the model {cfg.num_classes} classes")
        model.category_ids = [int(i) for i in ids]
    model.input_size = _input_size(payload, path)
    return model


def _input_size(payload: Mapping[str, Any], path: str | Path) -> tuple[int, int] | None:
    """The (size, max_size) recorded by training; older training checkpoints only
    carry it in their train_config."""
    size = payload.get("input_size")
    if size is None and isinstance(payload.get("train_config"), Mapping):
        tc = payload["train_config"]
        size = [tc.get("eval_size"), tc.get("eval_max_size")] if tc.get("eval_size") else None
    if size is None:
        return None
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise CheckpointError(f"{path}: input_size must be [size, max_size] positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def load_safetensors_model(path: str | Path, *, msda_backend: str | None = None):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            header_meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    side = sidecar_path(path)
    if side.is_file():
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{side}: not valid JSON ({exc})") from None
        where: Path = side
    elif _META_KEY in header_meta:
        meta, where = json.loads(header_meta[_META_KEY]), path
    else:
        raise CheckpointError(f"{path}: no {side.name} next to it and no ddetr metadata inside: cannot tell the model config")
    if not is_native_payload(meta):
        raise CheckpointError(f"{where}: not ddetr model metadata (format is not {FORMAT!r})")
    return model_from_payload({**meta, "model": tensors}, path, msda_backend=msda_backend)
