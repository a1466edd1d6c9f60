"""The CPU kernels: a backward bitwise independent of the thread count."""

from __future__ import annotations

import pytest
import torch

from ddetr_cli.ops import ms_deform_attn, ms_deform_attn_torch
from msda_cases import level_geometry, make_case

def native(*args):
    return ms_deform_attn(*args, backend="native")


def encoder_like(D: int, dtype=torch.float32, seed=0):
    """Every token queries, points a few pixels around each query's reference
    point (as a trained encoder samples): dense levels, packed tiles, several
    bands per level, chunks that phase 2 skips. The last level is one row; a
    few locations are NaN, infinite or far outside."""
    shapes = [(24, 200), (12, 100), (6, 50), (1, 25)]
    spatial, start = level_geometry(shapes)
    S = int((spatial[:, 0] * spatial[:, 1]).sum())
    N, M, L, P = 1, 2, len(shapes), 4
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(N, S, 1, 1, 1, 2, generator=g, dtype=torch.float64)
    ref, _ = ref.sort(dim=1)  # queries in raster-like order, as the encoder's tokens
    loc = ref + torch.randn(N, S, M, L, P, 2, generator=g, dtype=torch.float64) * 0.03
    flat = loc.view(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -5.0, 3.0], dtype=torch.float64)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    attn = torch.rand(N, S, M, L, P, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in (value, spatial, start, loc, attn))


def decoder_like(D: int, dtype=torch.float32, seed=0):
    """A few queries at random places: sparse levels, accumulated in place."""
    return make_case([(24, 200), (12, 100), (6, 50), (1, 25)], N=2, Lq=37, M=3, D=D, P=4, dtype=dtype, seed=seed)


def upstream(shape) -> torch.Tensor:
    """The gradient fed back: float64, rounded through bf16 so it is exact in every dtype."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(torch.bfloat16).double()


def grads(args):
    """Output and the gradients of value, locations and weights of the native op."""
    value, spatial, start, loc, attn = (a.clone().requires_grad_() if a.is_floating_point() else a for a in args)
    out = native(value, spatial, start, loc, attn)
    out.backward(upstream(out.shape).to(out.dtype))
    return out.detach(), value.grad, loc.grad, attn.grad


def reference(args):
    """The same from the float64 grid_sample reference."""
    value, spatial, start, loc, attn = (a.double().requires_grad_() if a.is_floating_point() else a for a in args)
    out = ms_deform_attn_torch(value, spatial, start, loc, attn)
    out.backward(upstream(out.shape))
    return out.detach(), value.grad, loc.grad, attn.grad


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@pytest.mark.parametrize("case", [encoder_like, decoder_like])
@pytest.mark.parametrize("D", [32, 33])
def test_backward_bitwise_equal_for_any_thread_count(case, D, threads):
    args = case(D)
    results = []
    for n in (1, 2, 3, 8):
        threads(n)
        results.append(grads(args))
    for n, other in zip((2, 3, 8), results[1:]):
        for name, a, b in zip(("output", "value", "loc", "attn"), results[0], other):
            assert torch.equal(a, b), f"grad {name} differs between 1 and {n} threads"


@pytest.mark.parametrize("case", [encoder_like, decoder_like])
def test_backward_of_many_bands_matches_float64_reference(case, threads):
    threads(3)
    args = case(7, dtype=torch.float64, seed=4)
    for name, g, r in zip(("output", "value", "loc", "attn"), grads(args), reference(args)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
