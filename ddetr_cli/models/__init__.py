"""Deformable DETR model: config, presets, builder and post-processing."""

from .config import PRESETS, VARIANTS, ModelConfig, apply_variant, preset
from .deformable_detr import DeformableDETR, build_model
from .fuse import fuse_for_inference
from .postprocess import postprocess

__all__ = [
    "PRESETS",
    "VARIANTS",
    "DeformableDETR",
    "ModelConfig",
    "apply_variant",
    "build_model",
    "fuse_for_inference",
    "postprocess",
    "preset",
]
