"""Operators: multi-scale deformable attention with native and PyTorch backends."""

from .geometry import LevelGeometry
from .msda import (BACKENDS, ENV_BACKEND, extension, extension_error, ms_deform_attn, ms_deform_attn_levels,
                   native_supports, resolve_backend)
from .msda_torch import ms_deform_attn_torch

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "LevelGeometry",
    "extension",
    "extension_error",
    "ms_deform_attn",
    "ms_deform_attn_levels",
    "ms_deform_attn_torch",
    "native_supports",
    "resolve_backend",
]
