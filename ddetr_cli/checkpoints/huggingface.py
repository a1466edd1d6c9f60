"""Hugging Face ``DeformableDetrForObjectDetection`` directories
(``config.json`` + ``model.safetensors`` | sharded safetensors | ``pytorch_model.bin``).

Weights are renamed to the official layout and loaded by
:func:`ddetr_cli.checkpoints.official.load_weights`. Both naming generations
are accepted: transformers 4.x / saved-by-5.x (``backbone.conv_encoder``,
``fc1``, ``self_attn.out_proj``) and 5.x in-memory names (``backbone.model``,
``mlp.fc1``, ``self_attn.o_proj``); the backbone may use timm/torchvision names
(``conv1``, ``layer1.0.conv1``) or transformers' ResNet names
(``embedder.embedder.convolution``, ``encoder.stages.i.layers.j.layer.k``). The
decoder's separate ``q_proj/k_proj/v_proj`` are packed into
``nn.MultiheadAttention``'s ``in_proj_weight/bias`` (q, k, v order).

The ResNet shape is read from the weights; ``config.json`` gives the rest
(layers, heads, points, queries, variant, dilation, ``id2label``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models.config import ModelConfig
from .coco_names import COCO_CATEGORY_IDS, COCO_NUM_CLASSES
from .io import CheckpointError, safe_torch_load
from .official import infer_backbone, load_weights

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

_BACKBONE = re.compile(r"^model\.backbone\.(?:conv_encoder\.)?model\.(.+)$")
_ENC = re.compile(r"^model\.encoder\.layers\.(\d+)\.(.+)$")
_DEC = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.+)$")

_RESNET_RULES = [  # transformers ResNet names -> torchvision names
    (re.compile(r"^embedder\.embedder\.convolution\.(.+)$"), r"conv1.\1"),
    (re.compile(r"^embedder\.embedder\.normalization\.(.+)$"), r"bn1.\1"),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.(.+)$"), "layer{s}.{1}.downsample.0.{2}"),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.(.+)$"), "layer{s}.{1}.downsample.1.{2}"),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.(.+)$"), "layer{s}.{1}.conv{k}.{3}"),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.(.+)$"), "layer{s}.{1}.bn{k}.{3}"),
]

_ENC_RULES = [("self_attn_layer_norm.", "norm1."), ("mlp.fc1.", "linear1."), ("fc1.", "linear1."),
              ("mlp.fc2.", "linear2."), ("fc2.", "linear2."), ("final_layer_norm.", "norm2."), ("self_attn.", "self_attn.")]
_DEC_RULES = [("self_attn_layer_norm.", "norm2."), ("self_attn.o_proj.", "self_attn.out_proj."),
              ("self_attn.out_proj.", "self_attn.out_proj."), ("encoder_attn_layer_norm.", "norm1."),
              ("encoder_attn.", "cross_attn."), ("mlp.fc1.", "linear1."), ("fc1.", "linear1."),
              ("mlp.fc2.", "linear2."), ("fc2.", "linear2."), ("final_layer_norm.", "norm3."),
              ("self_attn.q_proj.", "self_attn.q_proj."), ("self_attn.k_proj.", "self_attn.k_proj."),
              ("self_attn.v_proj.", "self_attn.v_proj.")]
_TOP = [("model.input_proj.", "input_proj."), ("model.level_embed", "transformer.level_embed"),
        ("model.query_position_embeddings.", "query_embed."), ("model.reference_points.", "transformer.reference_points."),
        ("model.enc_output_norm.", "transformer.enc_output_norm."), ("model.enc_output.", "transformer.enc_output."),
        ("model.pos_trans_norm.", "transformer.pos_trans_norm."), ("model.pos_trans.", "transformer.pos_trans."),
        ("model.decoder.bbox_embed.", "transformer.decoder.bbox_embed."),
        ("model.decoder.class_embed.", "transformer.decoder.class_embed."),
        ("class_embed.", "class_embed."), ("bbox_embed.", "bbox_embed.")]


def _backbone_key(rest: str) -> str:
    for pattern, template in _RESNET_RULES:
        m = pattern.match(rest)
        if m:
            g = m.groups()
            if template.startswith("layer"):
                return template.format(*g, s=int(g[0]) + 1, k=int(g[2]) + 1 if len(g) > 3 else 0)
            return m.expand(template)
    return rest  # timm / torchvision names already


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for old, new in rules:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def hf_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a ``DeformableDetrForObjectDetection`` state dict to the official
    layout. Keys it does not know are kept as they are (so they surface as
    unexpected keys when loading)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        new: str | None = None
        if m := _BACKBONE.match(key):
            new = "backbone.0.body." + _backbone_key(m.group(1))
        elif m := _ENC.match(key):
            rest = _rename(m.group(2), _ENC_RULES)
            new = None if rest is None else f"transformer.encoder.layers.{m.group(1)}.{rest}"
        elif m := _DEC.match(key):
            rest = _rename(m.group(2), _DEC_RULES)
            new = None if rest is None else f"transformer.decoder.layers.{m.group(1)}.{rest}"
        else:
            new = _rename(key, _TOP)
        out[new if new is not None else key] = value
    # pack the decoder self-attention projections as nn.MultiheadAttention's in_proj
    for key in [k for k in out if re.match(r"^transformer\.decoder\.layers\.\d+\.self_attn\.q_proj\.", k)]:
        prefix, kind = key.rsplit(".q_proj.", 1)
        parts = [f"{prefix}.{p}_proj.{kind}" for p in "qkv"]
        if all(p in out for p in parts):
            out[f"{prefix}.in_proj_{kind}"] = torch.cat([out.pop(p) for p in parts], 0)
    return out


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def st(path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None

    if (directory / "model.safetensors").is_file():
        return st(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
        sd: dict[str, torch.Tensor] = {}
        for name in files:
            sd.update(st(directory / name))
        return sd
    if (directory / "pytorch_model.bin").is_file():
        obj = safe_torch_load(directory / "pytorch_model.bin")
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{directory / 'pytorch_model.bin'}: expected a state dict, got {type(obj).__name__}")
        return dict(obj)
    raise CheckpointError(f"{directory}: has config.json but none of {', '.join(WEIGHT_FILES)}")


def config_from_hf(conf: Mapping[str, Any], sd: Mapping[str, torch.Tensor], path: str | Path) -> ModelConfig:
    """Our :class:`ModelConfig` for a transformers config and its (renamed) weights."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise CheckpointError(f"{path}: {msg}")

    mt = conf.get("model_type")
    need(mt in (None, "deformable_detr"), f"model_type {mt!r} is not 'deformable_detr'")
    need(conf.get("activation_function", "relu") == "relu", f"activation_function {conf.get('activation_function')!r} is not supported (relu only)")
    need(conf.get("position_embedding_type", "sine") == "sine", f"position_embedding_type {conf.get('position_embedding_type')!r} is not supported (sine only)")
    enc_heads, dec_heads = conf.get("encoder_attention_heads", 8), conf.get("decoder_attention_heads", 8)
    need(enc_heads == dec_heads, f"encoder/decoder heads differ ({enc_heads} vs {dec_heads}); ddetr uses one nheads")
    enc_ffn, dec_ffn = conf.get("encoder_ffn_dim", 1024), conf.get("decoder_ffn_dim", 1024)
    need(enc_ffn == dec_ffn, f"encoder/decoder FFN sizes differ ({enc_ffn} vs {dec_ffn}); ddetr uses one dim_feedforward")
    bb = conf.get("backbone_config") or {}
    if isinstance(bb, Mapping) and bb.get("model_type") == "resnet":
        need(not bb.get("downsample_in_first_stage", False), "backbone_config.downsample_in_first_stage=True is not supported")
        need(not bb.get("downsample_in_bottleneck", False), "backbone_config.downsample_in_bottleneck=True is not supported")
        need(bb.get("hidden_act", "relu") == "relu", "backbone_config.hidden_act must be relu")
    need("class_embed.0.weight" in sd or "transformer.decoder.class_embed.0.weight" in sd, "no class_embed weights (not an object-detection model)")
    levels = int(conf.get("num_feature_levels", 4))
    one_by_one = [k for k in sd if re.match(r"^input_proj\.\d+\.0\.weight$", k) and sd[k].shape[-1] == 1]
    need(len(one_by_one) == (1 if levels == 1 else 3),
         f"the backbone feeds {len(one_by_one)} feature maps; ddetr takes C3-C5 (multi-scale) or C5 (single-scale)")
    head = sd.get("class_embed.0.weight", sd.get("transformer.decoder.class_embed.0.weight"))
    two_stage = bool(conf.get("two_stage", False))
    fields: dict[str, Any] = dict(
        num_classes=int(head.shape[0]), d_model=int(conf.get("d_model", 256)), nheads=int(enc_heads),
        num_feature_levels=levels, enc_layers=int(conf.get("encoder_layers", 6)), dec_layers=int(conf.get("decoder_layers", 6)),
        dim_feedforward=int(enc_ffn), dropout=float(conf.get("dropout", 0.1)),
        enc_n_points=int(conf.get("encoder_n_points", 4)), dec_n_points=int(conf.get("decoder_n_points", 4)),
        num_queries=int(conf.get("two_stage_num_proposals", 300) if two_stage else conf.get("num_queries", 300)),
        with_box_refine=bool(conf.get("with_box_refine", False)) or two_stage, two_stage=two_stage,
        dilation=bool(conf.get("dilation") or False), aux_loss=True,
        **infer_backbone(sd, path),
    )
    try:
        return ModelConfig(**fields)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def load_huggingface(directory: str | Path, *, msda_backend: str | None = None):
    """Builds and loads the model of a Hugging Face Deformable DETR directory."""
    from ..models.deformable_detr import DeformableDETR

    directory = Path(directory)
    cfg_path = directory / "config.json"
    try:
        conf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face model directory)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from None
    sd = hf_to_official(_read_weights(directory))
    cfg = config_from_hf(conf, sd, directory)
    if msda_backend is not None:
        cfg = cfg.replace(msda_backend=msda_backend)
    model = DeformableDETR(cfg)
    load_weights(model, sd, directory, tied_fallback=True)
    id2label = {int(k): str(v) for k, v in (conf.get("id2label") or {}).items()}
    model.class_names = [id2label.get(i, str(i)) for i in range(cfg.num_classes)]
    model.category_ids = list(COCO_CATEGORY_IDS) if cfg.num_classes == COCO_NUM_CLASSES else None
    return model
