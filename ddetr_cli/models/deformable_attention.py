"""Multi-scale deformable attention module (MSDeformAttn).

Parameter names and initialisation follow the official module: a zero
``sampling_offsets`` weight with the radial grid bias (head h points at angle
2*pi*h/M, point p at distance p+1), zero ``attention_weights``, xavier
``value_proj``/``output_proj`` with zero bias. Sampling locations and attention
weights are computed in float32 (also under bf16/fp16 autocast).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.geometry import LevelGeometry
from ..ops.msda import ms_deform_attn_levels


def grid_bias(n_heads: int, n_levels: int, n_points: int) -> torch.Tensor:
    """The official sampling-offset bias init -> [M*L*P*2]."""
    thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)  # [M]
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [M, 2]
    grid = grid / grid.abs().max(-1, keepdim=True)[0]  # on the unit square
    grid = grid.view(n_heads, 1, 1, 2).repeat(1, n_levels, n_points, 1)  # [M, L, P, 2]
    grid = grid * torch.arange(1, n_points + 1, dtype=torch.float32).view(1, 1, n_points, 1)
    return grid.flatten()


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 backend: str | None = None) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.zeros_(self.sampling_offsets.weight)
            self.sampling_offsets.bias.copy_(grid_bias(self.n_heads, self.n_levels, self.n_points))
            nn.init.zeros_(self.attention_weights.weight)
            nn.init.zeros_(self.attention_weights.bias)
            nn.init.xavier_uniform_(self.value_proj.weight)
            nn.init.zeros_(self.value_proj.bias)
            nn.init.xavier_uniform_(self.output_proj.weight)
            nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        geometry: LevelGeometry,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [N, Lq, C] (position embedding already added).
            reference_points: [N, Lq, L, 2] normalized (x, y) in [0, 1], or
                [N, Lq, L, 4] boxes (cx, cy, w, h) whose w, h scale the offsets.
            input_flatten: [N, S, C] values of all levels, flattened.
            geometry: the level sizes, offsets and offset normaliser, made once per
                model forward (:meth:`LevelGeometry.build`).
            input_padding_mask: [N, S] bool, True = padding (its values are zeroed).

        Returns:
            [N, Lq, C].
        """
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)  # [N, S, C]
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)  # [N, S, M, D]
        offsets = self.sampling_offsets(query).float().view(N, Lq, M, L, P, 2)  # [N, Lq, M, L, P, 2]
        weights = self.attention_weights(query).float().view(N, Lq, M, L * P)
        weights = F.softmax(weights, -1).view(N, Lq, M, L, P)  # [N, Lq, M, L, P]
        ref = reference_points.float()
        if ref.shape[-1] == 2:
            # ref + offsets / (W, H), in one pass
            locations = torch.addcdiv(ref[:, :, None, :, None, :], offsets,
                                      geometry.offset_normalizer[None, None, None, :, None, :])
        elif ref.shape[-1] == 4:
            locations = ref[:, :, None, :, None, :2] + offsets / P * ref[:, :, None, :, None, 2:] * 0.5
        else:
            raise ValueError(f"reference_points: last dim must be 2 or 4, got {tuple(reference_points.shape)}")
        # locations [N, Lq, M, L, P, 2]
        if geometry.symbolic:  # torch.export / ONNX export with dynamic sizes
            out = ms_deform_attn_symbolic(value, geometry.shapes, locations, weights)  # [N, Lq, C]
        else:
            out = ms_deform_attn_levels(value, geometry, locations, weights, backend=self.backend)  # [N, Lq, C]
        return self.output_proj(out)


def ms_deform_attn_symbolic(value: torch.Tensor, shapes, sampling_locations: torch.Tensor,
                            attention_weights: torch.Tensor) -> torch.Tensor:
    """The pure-PyTorch op (:func:`ddetr_cli.ops.msda_torch.ms_deform_attn_torch`,
    same arithmetic) for level sizes that are symbolic (``torch.export`` with
    dynamic shapes): no ``int()`` on a size, no host-side checks. Float32 only.

    value [N, S, M, D]; shapes: L (H, W) pairs; sampling_locations [N, Lq, M, L, P, 2];
    attention_weights [N, Lq, M, L, P] -> [N, Lq, M*D]."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    loc = sampling_locations
    loc = torch.where(torch.isfinite(loc), loc, torch.full_like(loc, -1.0)).clamp(-1.0, 2.0)
    grids = 2 * loc - 1  # [N, Lq, M, L, P, 2]
    sampled, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)  # [N*M, D, H, W]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1).to(v.dtype)  # [N*M, Lq, P, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))  # [N*M, D, Lq, P]
        start = start + h * w
    attn = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P).to(value.dtype)  # [N*M, 1, Lq, L*P]
    out = (torch.stack(sampled, dim=-2).flatten(-2) * attn).sum(-1)  # [N*M, D, Lq]
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()  # [N, Lq, M*D]
