"""The value gradient of multi-scale deformable attention, added up in a fixed
order: the deterministic replacement for the CUDA kernel's atomics when
``torch.use_deterministic_algorithms(True)`` is on.

Same bilinear rule as ``cpp/include/ddetr/bilinear.h``: pixel = loc * size -
0.5; a location outside (-1, W) x (-1, H), or not finite, contributes nothing;
each in-map corner c of a point gets ``attn * w_c * grad_output``. The sums go
through ``index_add_``, which PyTorch computes deterministically on CUDA in
deterministic mode (a sort by destination, then an ordered reduction).
"""

from __future__ import annotations

import torch


def msda_grad_value(
    grad_output: torch.Tensor,
    shapes: list[tuple[int, int]],
    starts: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_keys: int,
) -> torch.Tensor:
    """grad_output [N, Lq, M, D], sampling_locations [N, Lq, M, L, P, 2] and
    attention_weights [N, Lq, M, L, P] in the accumulation dtype ->
    grad_value [N, S, M, D] in that dtype."""
    N, Lq, M, D = grad_output.shape
    P = sampling_locations.shape[4]
    acc = sampling_locations.dtype
    device = grad_output.device
    grad_value = torch.zeros(N * num_keys * M, D, dtype=acc, device=device)  # rows (n, s, m)
    g = grad_output.to(acc)[:, :, :, None, :]  # [N, Lq, M, 1, D]
    batch_row = (torch.arange(N, device=device) * num_keys).view(N, 1, 1, 1)  # [N, 1, 1, 1]
    head = torch.arange(M, device=device).view(1, 1, M, 1)  # [1, 1, M, 1]
    for lvl, ((H, W), start) in enumerate(zip(shapes, starts)):
        x = sampling_locations[:, :, :, lvl, :, 0] * W - 0.5  # [N, Lq, M, P] pixel coordinates
        y = sampling_locations[:, :, :, lvl, :, 1] * H - 0.5
        inside = (x > -1) & (y > -1) & (x < W) & (y < H)  # False for NaN
        x = torch.where(inside, x, torch.zeros_like(x))
        y = torch.where(inside, y, torch.zeros_like(y))
        x0, y0 = x.floor(), y.floor()
        lx, ly = x - x0, y - y0
        aw = torch.where(inside, attention_weights[:, :, :, lvl], torch.zeros_like(lx))  # [N, Lq, M, P]
        for cy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
            for cx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
                in_map = (cx >= 0) & (cx <= W - 1) & (cy >= 0) & (cy <= H - 1)
                weight = torch.where(in_map, aw * wy * wx, torch.zeros_like(aw))  # [N, Lq, M, P]
                pixel = torch.where(in_map, cy * W + cx, torch.zeros_like(cx)).long() + start  # [N, Lq, M, P]
                rows = (batch_row + pixel) * M + head  # [N, Lq, M, P]
                grad_value.index_add_(0, rows.reshape(-1), (weight[..., None] * g).reshape(-1, D))
    return grad_value.view(N, num_keys, M, D)
