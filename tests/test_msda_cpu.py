"""The CPU kernels: a backward bitwise independent of the thread count, the
instruction-set builds against each other and the float64 reference, the
DDETR_CPU_ISA override, and bfloat16 storage."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ddetr_cli.ops import ms_deform_attn, ms_deform_attn_torch
from ddetr_cli.ops import msda as msda_mod
from msda_cases import level_geometry, make_case, naive_msda

EXT = msda_mod.extension()
RUNNABLE = EXT.cpu_isas(runnable=True) if EXT is not None else []


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
@pytest.mark.parametrize("D", [32, 33, 48])  # 33 and 48 differed on an AVX-512 CPU while the compiler fused by itself
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


# ------------------------------------------------------------ instruction sets


@pytest.fixture
def isa():
    """Switches the CPU build for one test and restores the one in use."""
    old = EXT.cpu_isa()
    yield EXT.set_cpu_isa
    EXT.set_cpu_isa(old)


def test_compiled_builds_and_the_default_choice():
    compiled = EXT.cpu_isas()
    assert compiled[-1] == "baseline" and set(RUNNABLE) <= set(compiled)
    assert set(compiled) <= {"baseline", "avx2", "avx512", "avx512bf16"}
    if "DDETR_CPU_ISA" not in os.environ:
        assert EXT.cpu_isa() == RUNNABLE[0]  # the widest this processor runs


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("name", RUNNABLE)
def test_each_runnable_build_matches_float64(name, dtype, tol, isa):
    """Relative (Frobenius) error of the output and each gradient. The location
    gradient jumps where a point crosses a pixel boundary, and in float32 the
    pixel coordinate loc * W - 0.5 rounds differently with and without FMA (the
    baseline build has none): the few points within ~1e-5 px of a boundary flip
    sides, so it gets 1e-2 below float64."""
    assert isa(name) == name
    args = encoder_like(33, dtype=dtype, seed=2)
    if dtype == torch.bfloat16:  # locations and weights stay float32 (as the model passes them)
        args = args[:3] + (args[3].float(), args[4].float())
    for what, g, r in zip(("output", "value", "loc", "attn"), grads(args), reference(args)):
        g = g.double()
        assert torch.isfinite(g).all(), what
        rel = (g - r).norm() / r.norm()
        limit = max(tol, 1e-2) if what == "loc" and dtype != torch.float64 else tol
        assert rel < limit, f"{name} {dtype} {what}: relative error {rel:.2e}"


@pytest.mark.skipif(len(RUNNABLE) < 2, reason="one runnable build")
def test_runnable_builds_agree(isa):
    """In float64, where FMA or not moves no point across a pixel boundary."""
    args = encoder_like(32, dtype=torch.float64, seed=3)
    results = {}
    for name in RUNNABLE:
        isa(name)
        results[name] = grads(args)
    first, *others = RUNNABLE
    for name in others:
        for a, b in zip(results[first], results[name]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_set_cpu_isa_rejects_unknown_names(isa):
    with pytest.raises(ValueError, match="isa: unknown instruction set 'sse9'"):
        isa("sse9")


_ISA_CHILD = textwrap.dedent(
    """
    import torch
    from ddetr_cli.ops import ms_deform_attn, msda
    from msda_cases import make_case
    args = make_case([(4, 5), (2, 3)], N=1, Lq=3, M=2, D=4, P=2, dtype=torch.float32)
    try:
        for _ in range(2):
            ms_deform_attn(*args, backend="native")
        print("isa", msda.extension().cpu_isa())
    except ValueError as exc:
        print("error", exc)
    """
)


def _child(isa_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DDETR_CPU_ISA": isa_env}
    here = os.path.dirname(__file__)
    return subprocess.run([sys.executable, "-c", _ISA_CHILD], env=env, cwd=here, capture_output=True, text=True, timeout=120)


def test_environment_lowers_the_choice():
    proc = _child("baseline")
    assert proc.stdout.strip() == "isa baseline" and proc.stderr == "", proc


def test_environment_above_what_runs_falls_back_with_one_warning():
    wanted = next((n for n in ("avx512bf16", "avx512", "avx2") if n not in RUNNABLE), None)
    if wanted is None:
        pytest.skip("this processor runs every build")
    proc = _child(wanted)
    assert proc.stdout.strip() == f"isa {RUNNABLE[0]}", proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"DDETR_CPU_ISA={wanted} is not available" in lines[0], proc.stderr


def test_environment_unknown_name_is_a_one_line_error():
    proc = _child("avx1024")
    assert proc.stdout.strip().startswith("error DDETR_CPU_ISA: unknown instruction set 'avx1024'"), proc
    assert len(proc.stdout.strip().splitlines()) == 1


def hostile_locations(shapes, N, Lq, M, P, seed):
    """Locations drawn per level from pixel centres, the map's edges, points
    just inside and just outside, and NaN, +-inf and huge values."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.empty(N, Lq, M, len(shapes), P, 2, dtype=torch.float64)
    bad = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3.0e9]
    for lvl, (H, W) in enumerate(shapes):
        for axis, side in ((0, W), (1, H)):
            pool = [(i + 0.5) / side for i in range(side)]
            pool += [0.0, 1.0, -0.5 / side, 1 + 0.5 / side, -1.0 / side, 1 + 1.0 / side, -0.499 / side, 1 + 0.499 / side]
            pool += bad + list(torch.rand(8, generator=g, dtype=torch.float64).tolist())
            pick = torch.randint(len(pool), (N, Lq, M, P), generator=g)
            loc[:, :, :, lvl, :, axis] = torch.tensor(pool, dtype=torch.float64)[pick]
    return loc


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("D", [32, 33])
@pytest.mark.parametrize("name", RUNNABLE)
def test_eight_point_taps_at_borders_and_hostile_locations(name, D, dtype, tol, isa):
    """The AVX2 and AVX-512 builds compute the forward's taps eight points at a
    time when a query's L * P points fill groups of eight, and the backward's
    for two queries at a time when P = 4 (4 x 4 here, 2 x 4 in the second
    case): every build against the float64 per-point loop (forward) and the
    float64 reference (gradients of value and weights), on points at pixel
    centres, on the edges, just inside and outside, and NaN, infinite or huge."""
    isa(name)
    for shapes, Lq in (([(5, 7), (3, 4), (2, 2), (1, 3)], 11), ([(4, 9), (1, 1)], 7)):
        spatial, start = level_geometry(shapes)
        S = int((spatial[:, 0] * spatial[:, 1]).sum())
        N, M, P = 2, 2, 4
        g = torch.Generator().manual_seed(D)
        value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64).to(dtype).double()
        loc = hostile_locations(shapes, N, Lq, M, P, seed=D).float().double()  # float32 locations, as the op gets them
        attn = torch.rand(N, Lq, M, len(shapes), P, generator=g, dtype=torch.float64).float().double()
        args = (value.to(dtype), spatial, start, loc.float(), attn.float())
        out = native(*args)
        expected = naive_msda(value, spatial, start, loc, attn)
        assert torch.isfinite(out).all()
        rel = (out.double() - expected).norm() / expected.norm()
        assert rel < tol, f"{name} {dtype} {shapes}: output relative error {rel:.2e}"
        ours, ref = grads(args), reference((value, spatial, start, loc, attn))
        for what, i in (("value", 1), ("attn", 3)):
            assert torch.isfinite(ours[i]).all(), what
            rel = (ours[i].double() - ref[i]).norm() / ref[i].norm()
            assert rel < tol, f"{name} {dtype} {shapes}: {what} gradient relative error {rel:.2e}"
        nonfinite = ~torch.isfinite(loc).all(-1)  # [N, Lq, M, L, P]: no gradient at all
        assert (ours[2].abs().sum(-1)[nonfinite] == 0).all() and (ours[3][nonfinite] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", RUNNABLE)
def test_pixel_major_query_order_changes_no_bit(name, dtype, isa):
    """With one query per pixel of the levels (Lq == S, the encoder) the forward
    visits the queries pixel-major, merging the coarser levels' queries into the
    finest level's raster; with any other count, in query order. No output may
    depend on that: the S queries alone and with one more query appended give
    the same bits, at batch 2, on levels coarser than level 0 (L * P = 16: the
    eight-point taps) and with a level finer than level 0 (whose raster the
    merge does not see in key order; L * P = 12: the per-point taps)."""
    isa(name)
    for shapes in ([(9, 13), (5, 7), (3, 4), (1, 2)], [(4, 5), (8, 10), (2, 3)]):
        spatial, start = level_geometry(shapes)
        S = int((spatial[:, 0] * spatial[:, 1]).sum())
        N, M, P, D = 2, 2, 4, 32
        g = torch.Generator().manual_seed(S)
        value = torch.randn(N, S, M, D, generator=g).to(dtype)
        loc = torch.rand(N, S + 1, M, len(shapes), P, 2, generator=g) * 1.2 - 0.1  # some points outside
        attn = torch.rand(N, S + 1, M, len(shapes), P, generator=g)
        in_query_order = native(value, spatial, start, loc, attn)[:, :S]
        pixel_major = native(value, spatial, start, loc[:, :S].contiguous(), attn[:, :S].contiguous())
        assert torch.equal(pixel_major, in_query_order), (name, dtype, shapes)


# ---------------------------------------------------------------- bfloat16


def test_bfloat16_output_rounds_to_nearest_even_like_torch():
    """Query i samples pixel i at its centre with attention weight a_i: the
    float32 accumulator then holds a_i * value exactly, and the bf16 store must
    round it as torch does (ties to even, subnormals, overflow)."""
    W, D = 8, 64
    v = (torch.randn(W, D, generator=torch.Generator().manual_seed(0)) * 4).to(torch.bfloat16)
    v[:, :6] = torch.tensor([1.0, 1 + 2**-7, -1.5, 1e-39, -3e-40, 3e38], dtype=torch.bfloat16)
    a = torch.tensor([1 + 2**-8, 1 + 3 * 2**-9, 1 - 2**-9, 1.5 + 2**-10, 3 + 2**-8, 1 + 2**-12, 0.75, 2**-8 - 2**-20])
    spatial, start = level_geometry([(1, W)])
    loc = torch.stack([(torch.arange(W) + 0.5) / W, torch.full((W,), 0.5)], -1).view(1, W, 1, 1, 1, 2)
    out = native(v.view(1, W, 1, D), spatial, start, loc, a.view(1, W, 1, 1, 1)).view(W, D)
    expected = (a[:, None] * v.float()).to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def test_bfloat16_gradients_are_finite_and_close():
    """bf16 value and output (float32 locations and weights): every gradient
    within 2e-2 (relative, Frobenius) of float64 on the same rounded inputs;
    value's gradient is stored in bf16 (relative rounding 2^-9)."""
    value, spatial, start, loc, attn = encoder_like(32, dtype=torch.float64, seed=6)
    low = (value.to(torch.bfloat16), spatial, start, loc.float(), attn.float())
    for name, g, r in zip(("output", "value", "loc", "attn"), grads(low), reference(low)):
        assert torch.isfinite(g).all(), name
        rel = (g.double() - r).norm() / r.norm()
        assert rel < 2e-2, f"{name}: relative error {rel:.2e}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None or not RUNNABLE, reason="needs g++ and the extension")
def test_ab_cpu_kernel_script_runs_and_compares(tmp_path):
    """scripts/ab_cpu_kernel.py, the A/B harness of the README's Developing
    section: the work tree against itself on the decoder case, one round of each
    pass: both builds compile into one program, run, and agree bit for bit on
    the output and the three gradients."""
    isa = "avx2" if "avx2" in RUNNABLE else "baseline"
    script = Path(__file__).resolve().parent.parent / "scripts" / "ab_cpu_kernel.py"
    r = subprocess.run([sys.executable, str(script), "worktree", "worktree", "--case", "decoder", "--rounds", "1",
                        "--isa", isa], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "forward, 2 threads" in r.stdout and "backward, 2 threads" in r.stdout, r.stdout
    assert r.stdout.count(": 0 elements differ, max |A - B| 0") == 4, r.stdout
