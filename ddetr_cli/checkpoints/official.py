"""The official Deformable DETR checkpoint layout (fundamentalvision/Deformable-DETR).

Our module names are the official ones, so this layout is also ours: loading
is key hygiene (``module.`` prefixes, ``num_batches_tracked``, tied head
aliases) plus a checked ``load_state_dict``. Release files are
``{"model": state_dict, "args": argparse.Namespace, ...}``; the architecture is
inferred from the weights (classes, levels, layers, variant, ResNet shape) and,
where weights cannot tell (heads vs points, dilation, two-stage queries), from
``args``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models.config import RESNETS, ModelConfig
from .coco_names import COCO_CATEGORY_IDS, COCO_CLASS_NAMES, COCO_NUM_CLASSES
from .io import CheckpointError, safe_torch_load

OFFICIAL_URL = "https://github.com/fundamentalvision/Deformable-DETR (README 'Main Results': release checkpoint links)"
HF_URL = "https://huggingface.co/SenseTime/deformable-detr (also -with-box-refine, -with-box-refine-two-stage, -single-scale)"


def _numpy_scalar_globals() -> list:
    """Globals a numpy float in a pickled ``args`` Namespace refers to (the
    official ``--position_embedding_scale`` default is ``2 * np.pi``)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return []
    try:
        scalar = np._core.multiarray.scalar  # numpy >= 2
    except AttributeError:  # pragma: no cover
        scalar = np.core.multiarray.scalar
    allowed: list = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    for name in ("Float64DType", "Float32DType", "Int64DType", "BoolDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            allowed.append(getattr(np.dtypes, name))
    return allowed


def official_allow_list() -> tuple:
    """The classes a release checkpoint's ``args`` needs under ``weights_only=True``."""
    return (argparse.Namespace, *_numpy_scalar_globals())


_HEAD = re.compile(r"^(transformer\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)$")
_IGNORED_SUFFIXES = ("num_batches_tracked", "total_params", "total_ops")


def is_official_state_dict(sd: Mapping[str, Any]) -> bool:
    keys = {k[7:] if k.startswith("module.") else k for k in sd}
    return "transformer.level_embed" in keys and any(k.startswith("backbone.0.body.") for k in keys)


def clean_state_dict(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Strips DDP ``module.`` prefixes and drops counters that carry no weights."""
    out = {}
    for k, v in sd.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if k.endswith(_IGNORED_SUFFIXES) or not isinstance(v, torch.Tensor):
            continue
        out[k] = v
    return out


def infer_backbone(sd: Mapping[str, torch.Tensor], path: str | Path, prefix: str = "backbone.0.body.") -> dict[str, Any]:
    """ResNet fields of :class:`ModelConfig` read from the body's weight shapes."""
    def get(key: str) -> torch.Tensor:
        if prefix + key not in sd:
            raise CheckpointError(f"{path}: missing backbone weight {prefix + key!r}")
        return sd[prefix + key]

    stem = int(get("conv1.weight").shape[0])
    block = "bottleneck" if prefix + "layer1.0.conv3.weight" in sd else "basic"
    last_conv = "conv3" if block == "bottleneck" else "conv2"
    depths, channels = [], []
    for s in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(f"{prefix}layer{s}.") + r"(\d+)\.", k))}
        if not idx:
            raise CheckpointError(f"{path}: no weights for backbone stage layer{s} (keys {prefix}layer{s}.*)")
        depths.append(max(idx) + 1)
        channels.append(int(get(f"layer{s}.0.{last_conv}.weight").shape[0]))
    expansion = 4 if block == "bottleneck" else 1
    for name, (b, d) in RESNETS.items():
        if b == block and list(d) == depths and channels == [stem * 2**i * expansion for i in range(4)]:
            return {"backbone": name, "backbone_width": stem}
    return {"backbone": "resnet", "backbone_width": stem, "backbone_block": block, "backbone_depths": depths,
            "backbone_channels": channels, "backbone_stem_channels": stem}


def _layer_count(sd: Mapping[str, Any], prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def infer_config(sd: Mapping[str, torch.Tensor], args: Mapping[str, Any] | None, path: str | Path) -> ModelConfig:
    """A :class:`ModelConfig` for a cleaned official-layout state dict."""
    args = dict(args or {})
    for key in ("transformer.level_embed", "class_embed.0.weight"):
        if key not in sd:
            raise CheckpointError(f"{path}: not a Deformable DETR checkpoint (no {key!r})")
    if any(k.startswith("detr.") or k.startswith("bbox_attention.") for k in sd):
        raise CheckpointError(f"{path}: segmentation (DETRsegm) checkpoints are not supported")
    levels, d_model = (int(x) for x in sd["transformer.level_embed"].shape)
    num_classes = int(sd["class_embed.0.weight"].shape[0])
    two_stage = "transformer.enc_output.weight" in sd
    refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in sd)
    enc_layers = _layer_count(sd, "transformer.encoder.layers.")
    dec_layers = _layer_count(sd, "transformer.decoder.layers.")
    if enc_layers == 0 or dec_layers == 0:
        raise CheckpointError(f"{path}: no transformer encoder/decoder layers found")
    ffn = int(sd["transformer.encoder.layers.0.linear1.weight"].shape[0])
    nheads = int(args.get("nheads", 8))

    def points(kind: str, arg: str) -> int:
        rows = int(sd[f"transformer.{kind}.layers.0.{'self_attn' if kind == 'encoder' else 'cross_attn'}.attention_weights.weight"].shape[0])
        if arg in args:
            return int(args[arg])
        if rows % (nheads * levels):
            raise CheckpointError(f"{path}: {kind} attention_weights has {rows} rows, not a multiple of "
                                  f"heads x levels = {nheads} x {levels}; pass the official args (nheads)")
        return rows // (nheads * levels)

    if "query_embed.weight" in sd:
        num_queries = int(sd["query_embed.weight"].shape[0])
    else:
        num_queries = int(args.get("num_queries", 300))
    if args.get("position_embedding", "sine") not in ("sine", "v2"):
        raise CheckpointError(f"{path}: position_embedding {args['position_embedding']!r} is not supported (sine only)")
    if "hidden_dim" in args and int(args["hidden_dim"]) != d_model:
        raise CheckpointError(f"{path}: args.hidden_dim {args['hidden_dim']} != level_embed width {d_model}")
    fields: dict[str, Any] = dict(
        num_classes=num_classes, d_model=d_model, nheads=nheads, num_feature_levels=levels,
        enc_layers=enc_layers, dec_layers=dec_layers, dim_feedforward=ffn,
        enc_n_points=points("encoder", "enc_n_points"), dec_n_points=points("decoder", "dec_n_points"),
        num_queries=num_queries, with_box_refine=refine or two_stage, two_stage=two_stage,
        dilation=bool(args.get("dilation", False)), dropout=float(args.get("dropout", 0.1)),
        aux_loss=bool(args.get("aux_loss", True)),
        **infer_backbone(sd, path),
    )
    try:
        return ModelConfig(**fields)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def fill_head_aliases(sd: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], cfg: ModelConfig,
                      *, tied_fallback: bool = False) -> None:
    """Fills the head keys the model expects but ``sd`` lacks from their aliases:
    ``class_embed.i`` <-> ``transformer.decoder.class_embed.i`` (same for
    ``bbox_embed``), and from index 0 for shared (non-refine) heads, or for any
    head when ``tied_fallback`` (files saved with tied heads, as transformers 5
    does for ``class_embed`` with box refinement)."""
    shared = not cfg.with_box_refine
    for key in expected:
        if key in sd or not (m := _HEAD.match(key)):
            continue
        _, kind, idx, suffix = m.groups()
        cands = [f"{kind}.{idx}.{suffix}", f"transformer.decoder.{kind}.{idx}.{suffix}"]
        if shared or tied_fallback:
            cands += [f"{kind}.0.{suffix}", f"transformer.decoder.{kind}.0.{suffix}"]
        for c in cands:
            if c in sd:
                sd[key] = sd[c]
                break


def _preview(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: str | Path, *,
                 tied_fallback: bool = False) -> None:
    """Loads an official-layout state dict strictly; mismatches raise
    :class:`CheckpointError` naming the file and a few keys."""
    expected = model.state_dict()
    sd = dict(sd)
    fill_head_aliases(sd, expected, model.config, tied_fallback=tied_fallback)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if shapes:
        problems.append(f"shape mismatch in {len(shapes)} tensors ({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''})")
    if missing:
        problems.append(f"missing {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {_preview(unexpected)}")
    if problems:
        cfg = model.config
        raise CheckpointError(f"{path}: weights do not match a {cfg.variant} model with {cfg.num_classes} classes: "
                              + "; ".join(problems))
    with torch.no_grad():
        model.load_state_dict({k: sd[k] for k in expected}, strict=True)


def coco_labels(num_classes: int) -> tuple[list[str], list[int] | None]:
    """Class names and category ids: COCO's when there are 91 classes."""
    if num_classes == COCO_NUM_CLASSES:
        return list(COCO_CLASS_NAMES), list(COCO_CATEGORY_IDS)
    return [str(i) for i in range(num_classes)], None


def args_to_dict(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, Mapping):
        return dict(args)
    return {}


def load_official(path: str | Path, payload: Any = None, *, msda_backend: str | None = None):
    """Builds the model described by an official checkpoint (``{"model", "args"}``
    or a bare state dict) and loads its weights."""
    from ..models.deformable_detr import DeformableDETR

    if payload is None:
        payload = safe_torch_load(path, allow=official_allow_list())
    if isinstance(payload, Mapping) and isinstance(payload.get("model"), Mapping):
        sd, args = payload["model"], args_to_dict(payload.get("args"))
    elif isinstance(payload, Mapping):
        sd, args = payload, {}
    else:
        raise CheckpointError(f"{path}: expected a dict of weights, got {type(payload).__name__}")
    sd = clean_state_dict(sd)
    cfg = infer_config(sd, args, path)
    if msda_backend is not None:
        cfg = cfg.replace(msda_backend=msda_backend)
    model = DeformableDETR(cfg)
    load_weights(model, sd, path)
    model.class_names, model.category_ids = coco_labels(cfg.num_classes)
    return model


def official_payload(model: torch.nn.Module, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """``{"model": state_dict, "args": Namespace}`` in the official layout (for tools that expect it)."""
    cfg = model.config
    if args is None:
        args = argparse.Namespace(
            backbone=cfg.backbone, dilation=cfg.dilation, position_embedding="sine", num_feature_levels=cfg.num_feature_levels,
            enc_layers=cfg.enc_layers, dec_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward,
            hidden_dim=cfg.d_model, dropout=cfg.dropout, nheads=cfg.nheads, num_queries=cfg.num_queries,
            dec_n_points=cfg.dec_n_points, enc_n_points=cfg.enc_n_points, with_box_refine=cfg.with_box_refine,
            two_stage=cfg.two_stage, aux_loss=cfg.aux_loss, masks=False,
        )
    return {"model": model.state_dict(), "args": args}
