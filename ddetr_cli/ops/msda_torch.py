"""Pure-PyTorch multi-scale deformable attention (grid_sample based).

This is the reference the native kernels are tested against, the ONNX-export
path, and the backend forced with ``backend="torch"``. It computes the same
function as the official CUDA op: pixel = loc * size - 0.5 (align_corners=False),
bilinear, zero outside the map. Non-finite or far-away locations are moved to a
point that is certainly outside the map, so they contribute zero with zero
gradient, as in the native kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_torch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | list[tuple[int, int]],
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2] (x, y),
    attention_weights [N, Lq, M, L, P] -> [N, Lq, M*D]. ``level_start_index`` is
    accepted for signature parity and not needed."""
    if value.device.type == "cpu" and value.dtype in (torch.bfloat16, torch.float16):
        # PyTorch's CPU grid_sample in 16-bit returns NaN for some in-range grids
        # (seen with torch 2.13); compute in float32 and round once at the end.
        out = ms_deform_attn_torch(value.float(), spatial_shapes, level_start_index, sampling_locations, attention_weights.float())
        return out.to(value.dtype)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor) else list(spatial_shapes)
    sizes = [int(h) * int(w) for h, w in shapes]
    value_list = value.split(sizes, dim=1)
    # Anything outside [-1, 2] is outside the map; clamping keeps grid_sample's
    # index arithmetic finite and the gradient there is zero either way.
    loc = sampling_locations
    loc = torch.where(torch.isfinite(loc), loc, torch.full_like(loc, -1.0)).clamp(-1.0, 2.0)
    grids = 2 * loc - 1  # [N, Lq, M, L, P, 2]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, int(h), int(w))  # [N*M, D, H, W]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1).to(v.dtype)  # [N*M, Lq, P, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))  # [N*M, D, Lq, P]
    attn = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P).to(value.dtype)  # [N*M, 1, Lq, L*P]
    out = (torch.stack(sampled, dim=-2).flatten(-2) * attn).sum(-1)  # [N*M, D, Lq]
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()  # [N, Lq, M*D]
