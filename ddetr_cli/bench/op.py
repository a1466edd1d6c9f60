"""Benchmark of the multi-scale deformable attention op: the native kernel and
the pure-PyTorch (grid_sample) path side by side, forward and forward+backward,
at the shapes a real Deformable DETR sees."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.deformable_transformer import encoder_reference_points
from ..ops import ms_deform_attn
from .roofline import copy_bandwidth, op_flops
from .timing import measure

M_HEADS, D_HEAD, N_LEVELS, N_POINTS = 8, 32, 4, 4


@dataclass(frozen=True)
class OpCase:
    name: str
    image: tuple[int, int]  # (H, W) of the input image
    queries: int | None  # None: every token queries (encoder)
    # Reference points: "pixels" (the encoder's: query i sits at the centre of
    # its own pixel, so neighbouring queries sample neighbouring places) or
    # "random" (uniform over the image, as the decoder's learnt ones are spread).
    refs: str = "pixels"


CASES = {
    "encoder": OpCase("encoder 800x1066", (800, 1066), None),
    "encoder-1333": OpCase("encoder 800x1333", (800, 1333), None),
    "decoder": OpCase("decoder 300 queries", (800, 1066), 300, refs="random"),
    # The encoder's shapes with scattered references: no locality between
    # neighbouring queries (the inputs of the op tables before pixel references).
    "encoder-random": OpCase("encoder 800x1066, random refs", (800, 1066), None, refs="random"),
    "encoder-1333-random": OpCase("encoder 800x1333, random refs", (800, 1333), None, refs="random"),
}


DEFAULT_CASES = ("encoder", "encoder-1333", "decoder")


def level_shapes(image_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Feature-map sizes at strides 8/16/32/64 as the ResNet + stride-2 conv give them."""
    h, w = image_hw
    shapes = []
    for _ in range(N_LEVELS):
        h, w = (h + 1) // 2 if shapes else -(-h // 8), (w + 1) // 2 if shapes else -(-w // 8)
        shapes.append((h, w))
    return shapes


def make_inputs(case: OpCase, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = level_shapes(case.image)
    spatial = torch.tensor(shapes, dtype=torch.int64)
    hw = spatial[:, 0] * spatial[:, 1]
    start = torch.cat([hw.new_zeros(1), hw.cumsum(0)[:-1]])
    S = int(hw.sum())
    Lq = S if case.queries is None else case.queries
    value = torch.randn(batch, S, M_HEADS, D_HEAD, generator=g).to(device, dtype)
    # Points scattered around each query's reference, a few pixels away, as after training.
    if case.refs == "pixels" and case.queries is None:
        # The encoder's own reference points (no padding: valid ratios 1).
        ref = encoder_reference_points(shapes, torch.ones(1, N_LEVELS, 2))[:, :, 0]  # [1, S, 2]
        ref = ref.view(1, Lq, 1, 1, 1, 2).expand(batch, -1, -1, -1, -1, -1)
        torch.rand(batch, Lq, 1, 1, 1, 2, generator=g)  # keeps the generator's stream as with random refs
    else:
        ref = torch.rand(batch, Lq, 1, 1, 1, 2, generator=g)
    offsets = torch.randn(batch, Lq, M_HEADS, N_LEVELS, N_POINTS, 2, generator=g) * 0.02
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # the op's accumulation dtype
    loc = (ref + offsets).to(device, acc)  # float32 for 16-bit values: locations keep full precision
    attn = torch.randn(batch, Lq, M_HEADS, N_LEVELS * N_POINTS, generator=g).softmax(-1)
    # Weights in that dtype too, as the model passes them: a 16-bit copy would
    # only add casts to and from float32 around each call.
    attn = attn.view(batch, Lq, M_HEADS, N_LEVELS, N_POINTS).to(device, acc)
    return value, spatial, start, loc, attn


def _step(backend: str, inputs, backward: bool) -> Callable[[], object]:
    value, spatial, start, loc, attn = inputs
    if not backward:

        def fwd():
            with torch.no_grad():
                return ms_deform_attn(value, spatial, start, loc, attn, backend=backend)

        return fwd
    v, lo, a = (t.detach().clone().requires_grad_() for t in (value, loc, attn))

    def fwd_bwd():
        out = ms_deform_attn(v, spatial, start, lo, a, backend=backend)
        grads = torch.autograd.grad(out, (v, lo, a), torch.ones_like(out))
        return grads

    return fwd_bwd


def min_bytes(inputs, backward: bool) -> int:
    """Bytes the op must move at the least: every input read once and every
    output written once (the backward also reads grad_output and writes the
    three gradients, in the accumulation dtype)."""
    value, _, _, loc, attn = inputs
    out = loc.shape[0] * loc.shape[1] * value.shape[2] * value.shape[3] * value.element_size()
    acc = 8 if value.dtype == torch.float64 else 4
    fwd = value.numel() * value.element_size() + loc.numel() * loc.element_size() + attn.numel() * attn.element_size()
    if not backward:
        return fwd + out
    grads = value.numel() * acc + (loc.numel() + attn.numel()) * acc
    return fwd + out + grads


def bench_op(
    device: torch.device,
    *,
    dtype: torch.dtype = torch.float32,
    cases: list[str] | None = None,
    batches: tuple[int, ...] = (1, 2),
    backends: tuple[str, ...] = ("native", "torch"),
    warmup: int = 1,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """One row per (case, batch, pass) with the median ms of every backend,
    the speed-up of the first over the others, the extra peak memory, and the
    first backend's roofline: achieved GFLOP/s (:func:`op_flops`) and time
    against the byte floor (:func:`min_bytes` at the measured copy rate)."""
    rows = []
    bandwidth = copy_bandwidth(device)
    for key in cases or DEFAULT_CASES:
        case = CASES[key]
        for batch in batches:
            inputs = make_inputs(case, batch, dtype, device)
            out_bytes = inputs[3].shape[0] * inputs[3].shape[1] * M_HEADS * D_HEAD * inputs[0].element_size()
            for backward in (False, True):
                row = {
                    "case": case.name, "batch": batch, "pass": "fwd+bwd" if backward else "fwd",
                    "tokens": int(inputs[0].shape[1]), "queries": int(inputs[3].shape[1]),
                    "dtype": str(dtype).replace("torch.", ""), "output_mb": out_bytes / 2**20,
                    "threads": torch.get_num_threads(),
                }
                for backend in backends:
                    if progress:
                        progress(f"{case.name} b{batch} {row['pass']} {backend}")
                    t = measure(_step(backend, inputs, backward), device, warmup=warmup, repeats=repeats)
                    row[f"{backend}_ms"] = t.median_ms
                    row[f"{backend}_times_ms"] = t.times_ms
                    row[f"{backend}_peak_mb"] = None if t.peak_extra_bytes is None else t.peak_extra_bytes / 2**20
                if len(backends) > 1:
                    for other in backends[1:]:
                        row[f"speedup_vs_{other}"] = row[f"{other}_ms"] / row[f"{backends[0]}_ms"]
                value, _, _, loc, _ = inputs
                N, Lq, M, L, P, _ = loc.shape
                flops = op_flops(N, Lq, M, L, P, value.shape[3], backward)
                row["gflop"] = flops / 1e9
                row["gflops"] = flops / (row[f"{backends[0]}_ms"] / 1e3) / 1e9
                row["copy_gb_s"] = bandwidth / 1e9
                row["floor_ms"] = min_bytes(inputs, backward) / bandwidth * 1e3
                row["x_floor"] = row[f"{backends[0]}_ms"] / row["floor_ms"]
                rows.append(row)
            del inputs
    return rows
