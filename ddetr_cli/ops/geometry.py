"""The level geometry of a multi-scale feature map, made once per model forward.

Every deformable-attention call of a forward (6 encoder + 6 decoder layers in
R50) sees the same levels. :class:`LevelGeometry` holds them in every form the
layers need, computed once: Python ints (what the kernels take, so no call reads
a tensor back to the host), the official CPU tensors (``spatial_shapes``,
``level_start_index``) and the offset normaliser on the model's device. The
model keeps one per (sizes, device), so a CUDA forward after the first makes no
host-to-device copy (CUDA-graph capture needs that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class LevelGeometry:
    shapes: tuple[tuple[int, int], ...]  # (H, W) per level; symbolic sizes under torch.export
    starts: tuple[int, ...]  # offset of each level in the flattened S (cumulative H*W)
    total: int  # S = sum of H*W
    hw: tuple[int, ...]  # (H0, W0, H1, W1, ...): the sizes as the custom op takes them
    offset_normalizer: torch.Tensor  # [L, 2] float32 (W, H) on the model's device
    spatial_shapes: torch.Tensor | None = None  # [L, 2] int64 on the CPU; None when symbolic
    level_start_index: torch.Tensor | None = None  # [L] int64 on the CPU; None when symbolic

    @property
    def num_levels(self) -> int:
        return len(self.shapes)

    @property
    def symbolic(self) -> bool:
        """Sizes are symbolic (``torch.export``): only the pure-PyTorch op applies."""
        return self.spatial_shapes is None

    @classmethod
    def build(cls, shapes, device: torch.device | str) -> LevelGeometry:
        """``shapes``: (H, W) per level, each >= 1; ``device``: where the offset
        normaliser goes (one host-to-device copy)."""
        sizes = tuple((int(h), int(w)) for h, w in shapes)
        if not sizes:
            raise ValueError("spatial_shapes: expected at least one level")
        for lvl, (h, w) in enumerate(sizes):
            if h < 1 or w < 1:
                raise ValueError(f"spatial_shapes: level {lvl} has size {h}x{w}; sizes must be >= 1")
        starts, total = level_starts(sizes)
        return cls(
            shapes=sizes, starts=starts, total=total, hw=tuple(x for hw in sizes for x in hw),
            offset_normalizer=torch.tensor([[w, h] for h, w in sizes], dtype=torch.float32, device=device),  # [L, 2]
            spatial_shapes=torch.tensor(sizes, dtype=torch.int64),  # [L, 2]
            level_start_index=torch.tensor(starts, dtype=torch.int64),  # [L]
        )

    @classmethod
    def traced(cls, shapes, offset_normalizer: torch.Tensor) -> LevelGeometry:
        """Symbolic sizes (``torch.export`` with dynamic shapes): no ``int()`` on a
        size and no tensors made from them; ``offset_normalizer`` [L, 2] (W, H)
        is computed from tensors by the caller."""
        sizes = tuple((h, w) for h, w in shapes)
        starts, total = level_starts(sizes)
        return cls(shapes=sizes, starts=starts, total=total, hw=tuple(x for hw in sizes for x in hw),
                   offset_normalizer=offset_normalizer)


def level_starts(shapes) -> tuple[tuple, int]:
    """(H, W) per level -> (offset of each level in S, S)."""
    starts, total = [], 0
    for h, w in shapes:
        starts.append(total)
        total = total + h * w
    return tuple(starts), total
