"""The CUDA kernels on a real GPU: float64 exactness for the channel counts that
take each vector path, half precision against float64, a partly filled warp
grouping, the caller's stream, CUDA-graph replay, no host syncs, and the
deterministic mode. Skipped without a GPU and a CUDA build (CI has neither;
scripts/gpu_check.sh runs them on one, also under compute-sanitizer)."""

from __future__ import annotations

import pytest
import torch
from msda_cases import make_case

from ddetr_cli.ops import ms_deform_attn, ms_deform_attn_torch
from ddetr_cli.ops import msda as msda_mod

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and msda_mod.native_supports(torch.device("cuda"))),
                       reason="needs a GPU and a CUDA build"),
]

# Lq * M = 37 * 3 = 111: not a multiple of any group size, so the last warp is partly filled.
SHAPES = [(7, 5), (3, 4), (1, 1)]
N, LQ, M, P = 2, 37, 3, 4


# Every kernel variant: the forward path (staged, the default where it can run,
# or general) and the task order of both kernels (query-major or head-major),
# through the developer switches.
VARIANTS = [("auto", "auto"), ("auto", "query"), ("auto", "head"), ("general", "query"), ("general", "head")]


@pytest.fixture(params=VARIANTS, ids=["-".join(v) for v in VARIANTS])
def variant(request, monkeypatch):
    forward, order = request.param
    monkeypatch.setenv("DDETR_CUDA_FORWARD", forward)
    monkeypatch.setenv("DDETR_CUDA_ORDER", order)
    return request.param


def _grads(fn, value, loc, attn, grad):
    v, lo, a = (t.detach().clone().requires_grad_() for t in (value, loc, attn))
    out = fn(v, lo, a)
    gv, gl, ga = torch.autograd.grad(out, (v, lo, a), grad.to(out.dtype))
    return out.detach(), gv, gl, ga


def _reference(value, spatial, start, loc, attn, grad):
    """float64 on the CPU through the grid_sample path."""
    cpu = [t.detach().double().cpu() for t in (value, loc, attn, grad)]
    return _grads(lambda v, lo, a: ms_deform_attn_torch(v, spatial, start, lo, a), *cpu)


def _native(value, spatial, start, loc, attn, grad):
    return _grads(lambda v, lo, a: ms_deform_attn(v, spatial, start, lo, a, backend="native"), value, loc, attn, grad)


def _max_rel_err(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("D", [8, 30, 32, 71])
def test_float64_matches_reference(D, variant):
    value, spatial, start, loc, attn = make_case(SHAPES, N=N, Lq=LQ, M=M, D=D, P=P, device="cuda", seed=D)
    loc.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 7.0, -4.0, 1e30], device="cuda")
    grad = torch.randn(N, LQ, M * D, dtype=torch.float64, device="cuda")
    for got, want in zip(_native(value, spatial, start, loc, attn, grad), _reference(value, spatial, start, loc, attn, grad)):
        assert torch.isfinite(got).all()
        assert _max_rel_err(got, want) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("D", [12, 16, 30, 32])
def test_half_precision_against_float64(dtype, tol, D, variant):
    value, spatial, start, loc, attn = make_case(SHAPES, N=N, Lq=LQ, M=M, D=D, P=P, device="cuda", seed=D)
    grad = torch.randn(N, LQ, M * D, dtype=torch.float64, device="cuda")
    value16, grad16 = value.to(dtype), grad.to(dtype)
    loc32, attn32 = loc.float(), attn.float()
    got = _native(value16, spatial, start, loc32, attn32, grad16)
    # The reference sees the same rounded inputs, so only the kernel's own error counts.
    want = _reference(value16, spatial, start, loc32, attn32, grad16)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for name, g, w in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, want):
        assert _max_rel_err(g, w) < tol, name


def test_a_wrong_kernel_switch_is_named(monkeypatch):
    value, spatial, start, loc, attn = make_case(SHAPES, N=N, Lq=LQ, M=M, D=8, P=P, device="cuda", seed=0)
    monkeypatch.setenv("DDETR_CUDA_ORDER", "diagonal")
    with pytest.raises(Exception, match="DDETR_CUDA_ORDER must be query, head, or auto, not 'diagonal'"):
        ms_deform_attn(value, spatial, start, loc, attn, backend="native")


def test_runs_on_the_callers_stream():
    """Inputs written on a side stream after a long sleep: a kernel launched on
    any other stream would read the NaN they held before."""
    value, spatial, start, loc, attn = make_case(SHAPES, N=N, Lq=LQ, M=M, D=32, P=P, dtype=torch.float32, device="cuda")
    expected = ms_deform_attn(value, spatial, start, loc, attn, backend="native")
    late = torch.full_like(value, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # tens of milliseconds of GPU time
        late.copy_(value)
        out = ms_deform_attn(late, spatial, start, loc, attn, backend="native")
    side.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_cuda_graph_replay_matches_eager():
    value, spatial, start, loc, attn = make_case(SHAPES, N=N, Lq=LQ, M=M, D=32, P=P, dtype=torch.float32, device="cuda")
    v, lo, a = (t.clone().requires_grad_() for t in (value, loc, attn))
    grad = torch.randn(N, LQ, M * 32, device="cuda")

    def step():
        out = ms_deform_attn(v, spatial, start, lo, a, backend="native")
        return (out, *torch.autograd.grad(out, (v, lo, a), grad))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture, as CUDA graphs require
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for seed in (1, 2):
        new = make_case(SHAPES, N=N, Lq=LQ, M=M, D=32, P=P, dtype=torch.float32, device="cuda", seed=seed)
        with torch.no_grad():
            v.copy_(new[0]), lo.copy_(new[3]), a.copy_(new[4])
        graph.replay()
        eager = step()
        for got, want in zip(static, eager):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_forward_and_backward_make_no_host_sync():
    value, spatial, start, loc, attn = make_case(SHAPES, N=N, Lq=LQ, M=M, D=32, P=P, dtype=torch.float32, device="cuda")
    v, lo, a = (t.clone().requires_grad_() for t in (value, loc, attn))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ms_deform_attn(v, spatial, start, lo, a, backend="native")
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert v.grad is not None and lo.grad is not None


def test_cuda_level_geometry_is_refused_under_capture():
    value, spatial, start, loc, attn = make_case(SHAPES, N=1, Lq=4, M=1, D=8, P=1, dtype=torch.float32, device="cuda")
    spatial_gpu, start_gpu = spatial.cuda(), start.cuda()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="spatial_shapes: pass a CPU tensor"):
        with torch.cuda.graph(graph):
            ms_deform_attn(value, spatial_gpu, start_gpu, loc, attn, backend="native")


def test_deterministic_mode_backward_is_bitwise_reproducible():
    value, spatial, start, loc, attn = make_case([(40, 50), (20, 25)], N=2, Lq=600, M=4, D=32, P=4,
                                                 dtype=torch.float32, device="cuda", loc_range=(0.3, 0.4))
    grad = torch.randn(2, 600, 4 * 32, device="cuda")
    free = _native(value, spatial, start, loc, attn, grad)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_native(value, spatial, start, loc, attn, grad) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    for other in runs[1:]:
        for got, want in zip(other, runs[0]):
            assert torch.equal(got, want)
    for got, want in zip(runs[0], free):  # the same gradient, summed in another order
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_model_on_cuda_native_matches_torch_op():
    from ddetr_cli.models import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("tiny")).cuda().eval()
    images = torch.randn(2, 3, 128, 160, device="cuda")
    mask = torch.zeros(2, 128, 160, dtype=torch.bool, device="cuda")
    mask[1, :, 120:] = True
    outs = {}
    for backend in ("native", "torch"):
        model.set_msda_backend(backend)
        with torch.inference_mode():
            outs[backend] = model(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outs["native"][key], outs["torch"][key], rtol=1e-4, atol=1e-4)
