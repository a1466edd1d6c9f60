"""Argument checks of the deformable-attention op, in Python, once per call
(the compiled boundary checks sizes, buffers and pointers again).

:func:`check_arguments` checks the official arguments (level geometry as
tensors, read once); :func:`check_levels` checks the three data tensors against
a :class:`~ddetr_cli.ops.geometry.LevelGeometry` whose sizes were checked when
it was made, so it reads no tensor. Errors are ``TypeError``/``ValueError``
naming the argument at fault.
"""

from __future__ import annotations

import torch

from .geometry import LevelGeometry


def _level_geometry(
    spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, num_levels: int
) -> tuple[list[tuple[int, int]], list[int]]:
    if not isinstance(spatial_shapes, torch.Tensor):
        raise TypeError(f"spatial_shapes: expected a tensor, got {type(spatial_shapes).__name__}")
    if not isinstance(level_start_index, torch.Tensor):
        raise TypeError(f"level_start_index: expected a tensor, got {type(level_start_index).__name__}")
    if spatial_shapes.dtype.is_floating_point or spatial_shapes.dtype.is_complex or spatial_shapes.dtype == torch.bool:
        raise TypeError(f"spatial_shapes: expected an integer tensor, got {spatial_shapes.dtype}")
    if level_start_index.dtype.is_floating_point or level_start_index.dtype.is_complex or level_start_index.dtype == torch.bool:
        raise TypeError(f"level_start_index: expected an integer tensor, got {level_start_index.dtype}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] < 1:
        raise ValueError(f"spatial_shapes: expected shape (L, 2) with L >= 1, got {tuple(spatial_shapes.shape)}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"{name}: pass a CPU tensor under CUDA-graph capture (reading a CUDA one needs a host sync)")
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if len(shapes) != num_levels:
        raise ValueError(f"spatial_shapes: has {len(shapes)} levels, but sampling_locations has L = {num_levels}")
    starts = [int(s) for s in level_start_index.reshape(-1).tolist()]
    if level_start_index.dim() != 1 or len(starts) != len(shapes):
        raise ValueError(f"level_start_index: expected shape ({len(shapes)},), got {tuple(level_start_index.shape)}")
    total = 0
    for lvl, ((h, w), start) in enumerate(zip(shapes, starts)):
        if h < 1 or w < 1:
            raise ValueError(f"spatial_shapes: level {lvl} has size {h}x{w}; sizes must be >= 1")
        if start != total:
            raise ValueError(f"level_start_index: entry {lvl} is {start}, expected {total} (cumulative H*W of spatial_shapes)")
        total += h * w
    return shapes, starts


def _check_tensors(value, sampling_locations, attention_weights) -> tuple[int, int, int]:
    """Types, ranks and sizes of the three data tensors; returns (S, L, P)."""
    for name, t in (("value", value), ("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if value.dim() != 4:
        raise ValueError(f"value: expected shape (N, S, M, D), got {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations: expected shape (N, Lq, M, L, P, 2), got {tuple(sampling_locations.shape)}")
    if attention_weights.dim() != 5:
        raise ValueError(f"attention_weights: expected shape (N, Lq, M, L, P), got {tuple(attention_weights.shape)}")
    N, S, M, D = value.shape
    n2, Lq, m2, L, P, _ = sampling_locations.shape
    if M < 1 or D < 1:
        raise ValueError(f"value: heads and channels must be >= 1, got shape {tuple(value.shape)}")
    if P < 1:
        raise ValueError(f"sampling_locations: P (points) must be >= 1, got shape {tuple(sampling_locations.shape)}")
    if n2 != N or m2 != M:
        raise ValueError(
            f"sampling_locations: batch/heads {n2}/{m2} do not match value's {N}/{M} "
            f"(value {tuple(value.shape)}, sampling_locations {tuple(sampling_locations.shape)})"
        )
    if tuple(attention_weights.shape) != (N, Lq, M, L, P):
        raise ValueError(f"attention_weights: expected shape {(N, Lq, M, L, P)}, got {tuple(attention_weights.shape)}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.device != value.device:
            raise ValueError(f"{name}: on {t.device}, but value is on {value.device}")
    return S, L, P


def _check_total(S: int, total: int) -> None:
    if total != S:
        raise ValueError(f"value: S = {S}, but spatial_shapes sum to {total} (sum of H*W)")


def check_arguments(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[list[tuple[int, int]], list[int]]:
    """Raises TypeError/ValueError naming the offending argument; returns the
    level sizes and start offsets as Python ints."""
    S, L, _ = _check_tensors(value, sampling_locations, attention_weights)
    shapes, starts = _level_geometry(spatial_shapes, level_start_index, L)
    _check_total(S, sum(h * w for h, w in shapes))
    return shapes, starts


def check_levels(value: torch.Tensor, geometry: LevelGeometry, sampling_locations: torch.Tensor,
                 attention_weights: torch.Tensor) -> None:
    """:func:`check_arguments` for a :class:`LevelGeometry`, whose sizes were
    checked when it was built: no tensor is read."""
    S, L, _ = _check_tensors(value, sampling_locations, attention_weights)
    if L != geometry.num_levels:
        raise ValueError(f"spatial_shapes: has {geometry.num_levels} levels, but sampling_locations has L = {L}")
    _check_total(S, geometry.total)
