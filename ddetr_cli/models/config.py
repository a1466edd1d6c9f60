"""Model configuration: one typed dataclass, presets and variants.

Defaults are the official Deformable DETR R50 settings (fundamentalvision/
Deformable-DETR ``main.py``). ``backbone`` names a torchvision-style ResNet
(``resnet18|34|50|101``); the ``backbone_*`` overrides describe any other
ResNet (per-stage depths, block type, channels), e.g. the small ResNets of a
Hugging Face ``ResNetConfig``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

VARIANTS = ("base", "refine", "two-stage")
BLOCKS = ("basic", "bottleneck")
NORMS = ("frozen", "batch")

# name -> (block, depths); channels follow from backbone_width.
RESNETS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


@dataclass
class ModelConfig:
    """Every field that changes the architecture or its numbers."""

    num_classes: int = 91
    # backbone
    backbone: str = "resnet50"  # resnet18|resnet34|resnet50|resnet101, or "resnet" with explicit overrides
    backbone_width: int = 64  # stem channels; stage i has width * 2**i planes (x4 out channels for bottleneck)
    backbone_block: str | None = None  # override: basic|bottleneck
    backbone_depths: list[int] | None = None  # override: blocks per stage (4 stages)
    backbone_channels: list[int] | None = None  # override: output channels per stage
    backbone_stem_channels: int | None = None  # override: channels of the 7x7 stem
    dilation: bool = False  # DC5: last stage dilated, stride 32 -> 16
    train_backbone: bool = True  # False freezes the whole ResNet (official lr_backbone = 0)
    # stages that never train: 1 = stem + layer1 (official, for pretrained weights), 0 = stem, -1 = none
    backbone_frozen_stages: int = 1
    # batch norm of the trained stages: "frozen" (official, pretrained statistics) or "batch" (learnt:
    # a backbone trained from scratch); both compute the same at inference
    backbone_norm: str = "frozen"
    # transformer
    d_model: int = 256
    nheads: int = 8
    num_feature_levels: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300  # two-stage: number of top-k encoder proposals
    # variants
    with_box_refine: bool = False
    two_stage: bool = False
    aux_loss: bool = True
    # runtime
    msda_backend: str | None = None  # None/auto | native | torch

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> ModelConfig:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"model config: {key}: {msg}")

        need(self.num_classes >= 1, "num_classes", f"must be >= 1 (got {self.num_classes})")
        need(self.backbone in RESNETS or self.backbone == "resnet", "backbone",
             f"{self.backbone!r} is not one of {', '.join([*RESNETS, 'resnet'])}")
        if self.backbone == "resnet":
            need(self.backbone_block is not None and self.backbone_depths is not None, "backbone",
                 "'resnet' needs backbone_block and backbone_depths")
        need(self.backbone_block is None or self.backbone_block in BLOCKS, "backbone_block",
             f"{self.backbone_block!r} is not one of {', '.join(BLOCKS)}")
        need(self.backbone_depths is None or (len(self.backbone_depths) == 4 and min(self.backbone_depths) >= 1),
             "backbone_depths", f"needs 4 stages of >= 1 blocks (got {self.backbone_depths})")
        need(self.backbone_channels is None or len(self.backbone_channels) == 4, "backbone_channels",
             f"needs 4 entries (got {self.backbone_channels})")
        need(self.backbone_width >= 1, "backbone_width", f"must be >= 1 (got {self.backbone_width})")
        need(-1 <= self.backbone_frozen_stages <= 4, "backbone_frozen_stages",
             f"must be -1 (none) .. 4 (got {self.backbone_frozen_stages})")
        need(self.backbone_norm in NORMS, "backbone_norm", f"{self.backbone_norm!r} is not one of {', '.join(NORMS)}")
        need(self.d_model % self.nheads == 0, "d_model", f"{self.d_model} is not divisible by nheads {self.nheads}")
        need(self.d_model % 32 == 0, "d_model", f"{self.d_model} must be a multiple of 32 (GroupNorm(32, d_model))")
        need(self.num_feature_levels == 1 or self.num_feature_levels >= 3, "num_feature_levels",
             f"must be 1 (C5 only) or >= 3 (C3-C5 + extra levels), got {self.num_feature_levels}")
        need(self.enc_layers >= 1 and self.dec_layers >= 1, "enc_layers/dec_layers", "must be >= 1")
        need(self.enc_n_points >= 1 and self.dec_n_points >= 1, "enc_n_points/dec_n_points", "must be >= 1")
        need(self.num_queries >= 1, "num_queries", f"must be >= 1 (got {self.num_queries})")
        need(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1) (got {self.dropout})")
        need(not self.two_stage or self.with_box_refine, "two_stage",
             "two-stage Deformable DETR needs with_box_refine=True (as the official release)")
        need(self.msda_backend in (None, "auto", "native", "torch"), "msda_backend",
             f"{self.msda_backend!r} is not one of auto, native, torch")
        return self

    @property
    def variant(self) -> str:
        return "two-stage" if self.two_stage else ("refine" if self.with_box_refine else "base")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model config") -> ModelConfig:
        """Unknown keys raise ValueError naming the key (and ``source``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown model config key {unknown[0]!r}"
                             + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        values = dict(data)
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for key, value in values.items():
            values[key] = _typed(key, value, types[key], source)
        return cls(**values)

    def replace(self, **changes: Any) -> ModelConfig:
        types = {f.name: str(f.type) for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - set(types))
        if unknown:
            raise ValueError(f"model config: unknown key {unknown[0]!r}")
        changes = {k: _typed(k, v, types[k], "model config") for k, v in changes.items()}
        return dataclasses.replace(copy.deepcopy(self), **changes)


def _typed(key: str, value: Any, ftype: str, source: str) -> Any:
    """``value`` checked against the field's annotation (bool, int, float, str,
    lists of int, optional); a wrong type raises ValueError naming the key."""
    if value is None:
        if "None" in ftype:
            return None
        raise ValueError(f"{source}: {key}: must not be empty")
    base = ftype.split("|")[0].strip()

    def bad(expected: str) -> ValueError:
        return ValueError(f"{source}: {key}: expected {expected}, got {value!r}")

    if base == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if base == "int":
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise bad("an integer")
        return int(value)
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if base.startswith(("list[int]", "tuple[int")):
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise bad("a list of integers")
        return [int(v) for v in value]
    return value


def apply_variant(cfg: ModelConfig, name: str) -> ModelConfig:
    """``base`` | ``refine`` (iterative box refinement) | ``two-stage`` (refine + two-stage)."""
    key = name.strip().lower().replace("_", "-")
    aliases = {"base": "base", "refine": "refine", "box-refine": "refine", "two-stage": "two-stage", "twostage": "two-stage"}
    if key not in aliases:
        raise ValueError(f"variant: {name!r} is not one of {', '.join(VARIANTS)}")
    key = aliases[key]
    return cfg.replace(with_box_refine=key in ("refine", "two-stage"), two_stage=key == "two-stage")


def _r50(**changes: Any) -> ModelConfig:
    return ModelConfig(**changes)


PRESETS: dict[str, ModelConfig] = {
    # official Deformable DETR (R50, 4 levels, 300 queries)
    "r50": _r50(),
    "r50-refine": _r50(with_box_refine=True),
    "r50-two-stage": _r50(with_box_refine=True, two_stage=True),
    "r50-single-scale": _r50(num_feature_levels=1),
    "r50-single-scale-dc5": _r50(num_feature_levels=1, dilation=True),
    "r101": _r50(backbone="resnet101"),
    # CPU-sized: ResNet-18 basic blocks with width 32 (channels 32..256), d_model 128,
    # 3+3 layers, 50 two-stage queries with box refinement; trains on 128-px images.
    "tiny": ModelConfig(
        backbone="resnet18", backbone_width=32, d_model=128, nheads=8, enc_layers=3, dec_layers=3,
        dim_feedforward=512, dropout=0.0, num_queries=50, with_box_refine=True, two_stage=True,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh copy of ``PRESETS[name]`` with ``overrides`` applied (unknown keys raise)."""
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
