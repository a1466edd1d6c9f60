"""Sine position encodings: of feature-map pixels (from the padding mask) and
of two-stage box proposals.

Constants are the official Deformable DETR ones: temperature 10000, scale 2*pi,
normalisation ``(cumsum - 0.5) / (last + 1e-6) * scale``, features ordered
(y, x) with sin/cos interleaved.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _frequencies(num_pos_feats: int, temperature: float, device: torch.device) -> torch.Tensor:
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)  # [F]
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)  # [F]


def _interleave_sin_cos(x: torch.Tensor) -> torch.Tensor:
    """x [..., F] -> [..., F] with sin on even and cos on odd features, interleaved."""
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """2-D sine encoding of the valid (unpadded) pixels; no parameters."""

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [B, H, W] bool (True = padding) -> [B, 2*num_pos_feats, H, W] float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # [B, H, W]
        x_embed = not_mask.cumsum(2, dtype=torch.float32)  # [B, H, W]
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = _frequencies(self.num_pos_feats, self.temperature, mask.device)  # [F]
        pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)  # [B, H, W, F]
        pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)  # [B, H, W, F]
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, 2F, H, W]

    def extra_repr(self) -> str:
        return f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, normalize={self.normalize}"


def proposal_pos_embed(proposals: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000.0,
                       scale: float = 2 * math.pi) -> torch.Tensor:
    """Sine encoding of two-stage proposals.

    proposals [B, K, 4] box logits (before sigmoid) -> [B, K, 4*num_pos_feats]
    float32 (512 = 2*d_model for the official d_model 256, num_pos_feats 128).
    """
    dim_t = _frequencies(num_pos_feats, temperature, proposals.device)  # [F]
    boxes = proposals.float().sigmoid() * scale  # [B, K, 4]
    pos = boxes[..., None] / dim_t  # [B, K, 4, F]
    return _interleave_sin_cos(pos).flatten(2)  # [B, K, 4F]
