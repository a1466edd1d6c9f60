"""Random inputs for the deformable-attention tests."""

from __future__ import annotations

import torch


def level_geometry(shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    spatial = torch.tensor(shapes, dtype=torch.int64)
    hw = spatial[:, 0] * spatial[:, 1]
    start = torch.cat([hw.new_zeros(1), hw.cumsum(0)[:-1]])
    return spatial, start


def make_case(
    shapes, N=2, Lq=5, M=2, D=8, P=4, dtype=torch.float64, device="cpu", seed=0, loc_range=(-0.2, 1.2)
):
    g = torch.Generator().manual_seed(seed)
    spatial, start = level_geometry(shapes)
    S = int((spatial[:, 0] * spatial[:, 1]).sum())
    L = len(shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    lo, hi = loc_range
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return (
        value.to(device=device, dtype=dtype),
        spatial,
        start,
        loc.to(device=device, dtype=dtype),
        attn.to(device=device, dtype=dtype),
    )


def naive_msda(value, spatial, start, loc, attn):
    """Loops over every point in float64: the plainest possible statement of the op."""
    value, loc, attn = value.double().cpu(), loc.double().cpu(), attn.double().cpu()
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = torch.zeros(N, Lq, M, D, dtype=torch.float64)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for lvl in range(L):
                    H, W = (int(x) for x in spatial[lvl])
                    s0 = int(start[lvl])
                    for p in range(P):
                        x = float(loc[n, q, m, lvl, p, 0]) * W - 0.5
                        y = float(loc[n, q, m, lvl, p, 1]) * H - 0.5
                        if not (-1 < x < W and -1 < y < H):
                            continue
                        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < H and 0 <= xx < W:
                                    out[n, q, m] += attn[n, q, m, lvl, p] * wy * wx * value[n, s0 + yy * W + xx, m]
    return out.reshape(N, Lq, M * D)
