"""What the hardware allows, to set measured times against: FLOP counts of the
op and of the model's dense layers, and the machine's measured matmul rate
and copy bandwidth.

The op's count is one fused multiply-add (2 FLOP) per corner and channel of
every sampling point in the forward (the bilinear gather, attention weight
folded in), and two more per corner and channel in the backward (the dot
product with grad_output and the scatter into grad_value). The dense layers'
count is PyTorch's own (``torch.utils.flop_counter``: convolutions, matmuls).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .timing import measure


def op_flops(batch: int, queries: int, heads: int, levels: int, points: int, channels: int, backward: bool) -> int:
    """FLOPs of one ms_deform_attn call (forward, or forward + backward)."""
    per_channel_corner = 2 + (4 if backward else 0)
    return batch * queries * heads * levels * points * 4 * channels * per_channel_corner


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None) -> float:
    """Measured GFLOP/s of an n x n x n matmul: the practical ceiling of the dense layers."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = measure(lambda: a @ b, device, warmup=2, repeats=5)
    return 2 * n**3 / (t.median_ms / 1e3) / 1e9


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes/s of a large device-to-device (or RAM-to-RAM) copy, read + write:
    the practical DRAM ceiling an op's byte floor is measured against."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)  # touched: the first copy does not time page faults
    t = measure(lambda: dst.copy_(src), device, warmup=2, repeats=10)
    del src, dst
    return 2 * nbytes / (t.median_ms / 1e3)


def part_flops(root: nn.Module, parts: dict[str, nn.Module], run: Callable[[], object]) -> dict[str, int]:
    """FLOPs of the dense layers inside each named sub-module of ``root`` during one ``run()``."""
    from torch.utils.flop_counter import FlopCounterMode

    paths = {id(m): path for path, m in root.named_modules()}
    # The counter's module tracker hooks the backward of tensors that require
    # grad, which fails inside inference_mode: count with the weights frozen.
    trainable = [p for p in root.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with FlopCounterMode(display=False) as counter:
            run()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    counts = counter.get_flop_counts()
    prefix = type(root).__name__
    out = {}
    for name, module in parts.items():
        path = paths.get(id(module))
        key = prefix if not path else f"{prefix}.{path}"
        out[name] = int(sum(counts.get(key, {}).values()))
    return out
