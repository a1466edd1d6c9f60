"""Multi-scale deformable attention: the native kernels against independent
float64 references (a per-point loop and grid_sample), gradients, dtypes,
determinism, hostile inputs and the torch.library registration."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from ddetr_cli.ops import ms_deform_attn, ms_deform_attn_torch
from ddetr_cli.ops import msda as msda_mod
from msda_cases import level_geometry, make_case, naive_msda

HAS_CUDA_KERNELS = msda_mod.native_supports(torch.device("cuda")) and torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and a CUDA build")]),
]

SHAPE_SETS = [
    [(6, 4)],
    [(1, 1)],
    [(6, 4), (3, 5), (1, 1)],
    [(7, 3), (4, 2), (2, 1), (1, 1)],
    [(2, 9), (1, 5)],
]


def native(*args):
    return ms_deform_attn(*args, backend="native")


def test_extension_is_built():
    assert msda_mod.extension() is not None, msda_mod.extension_error()


@pytest.mark.parametrize("shapes", SHAPE_SETS)
def test_reference_matches_naive_loop(shapes):
    """The grid_sample reference itself agrees with the per-point loop."""
    args = make_case(shapes, N=1, Lq=4, M=2, D=3, P=2)
    torch.testing.assert_close(ms_deform_attn_torch(*args), naive_msda(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("D,P", [(1, 1), (8, 4), (30, 8), (32, 4), (64, 1), (71, 4), (256, 2)])
def test_forward_float64_matches_reference(device, shapes, D, P):
    args = make_case(shapes, N=2, Lq=7, M=2, D=D, P=P, device=device, seed=D * 31 + P)
    out = native(*args)
    ref = ms_deform_attn_torch(*(a.cpu() for a in args))
    assert out.shape == ref.shape and out.dtype == torch.float64
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_against_naive_loop(device):
    args = make_case([(5, 3), (2, 2), (1, 1)], N=2, Lq=6, M=3, D=5, P=3, device=device, seed=7)
    torch.testing.assert_close(native(*args).cpu(), naive_msda(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_borders_and_integer_pixels(device):
    """Locations exactly on pixel centres, on the map's edges and just outside."""
    shapes = [(4, 5), (2, 3)]
    spatial, start = level_geometry(shapes)
    S = int((spatial[:, 0] * spatial[:, 1]).sum())
    N, M, D, L = 1, 1, 4, 2
    specials = []
    for H, W in shapes:
        xs = [(i + 0.5) / W for i in range(W)] + [0.0, 1.0, -0.5 / W, 1 + 0.5 / W, -1.0 / W, 1 + 1.0 / W]
        ys = [(i + 0.5) / H for i in range(H)] + [0.0, 1.0, -0.5 / H, 1 + 0.5 / H]
        specials.append(list(itertools.product(xs, ys)))
    P = max(len(s) for s in specials)
    loc = torch.full((N, 1, M, L, P, 2), -5.0, dtype=torch.float64)
    for lvl, pts in enumerate(specials):
        loc[0, 0, 0, lvl, : len(pts)] = torch.tensor(pts, dtype=torch.float64)
    value = torch.randn(N, S, M, D, dtype=torch.float64)
    attn = torch.rand(N, 1, M, L, P, dtype=torch.float64)
    args = tuple(t.to(device) if t.is_floating_point() else t for t in (value, spatial, start, loc, attn))
    torch.testing.assert_close(native(*args).cpu(), naive_msda(value, spatial, start, loc, attn), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", [[(3, 4), (2, 2), (1, 1)], [(5, 1)]])
def test_gradcheck(device, shapes):
    value, spatial, start, loc, attn = make_case(shapes, N=2, Lq=3, M=2, D=3, P=2, device=device, seed=3)
    # Random float64 locations (almost surely) miss the pixel boundaries where bilinear sampling is not differentiable.
    loc = loc.requires_grad_()
    value.requires_grad_()
    attn.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, l, a: native(v, spatial, start, l, a), (value, loc, attn), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [1, 32, 71])
def test_backward_matches_reference(device, D):
    shapes = [(6, 4), (3, 5), (1, 1)]
    args = make_case(shapes, N=2, Lq=9, M=2, D=D, P=4, device=device, seed=D)
    value, spatial, start, loc, attn = (a.requires_grad_() if a.is_floating_point() else a for a in args)
    grad = torch.randn(2, 9, 2 * D, dtype=torch.float64, device=device)
    got = torch.autograd.grad(native(value, spatial, start, loc, attn), (value, loc, attn), grad)
    cpu = [t.detach().cpu().requires_grad_() if t.is_floating_point() else t for t in (value, spatial, start, loc, attn)]
    ref = torch.autograd.grad(ms_deform_attn_torch(*cpu), (cpu[0], cpu[3], cpu[4]), grad.cpu())
    for name, g, r in zip(("value", "loc", "attn"), got, ref):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_against_float64(device, dtype, tol):
    if dtype not in (msda_mod.CUDA_DTYPES if device == "cuda" else msda_mod.CPU_DTYPES):
        pytest.skip(f"{dtype} is not a {device} dtype")
    shapes = [(20, 13), (10, 7), (5, 4), (3, 2)]
    v64, spatial, start, loc64, attn64 = make_case(shapes, N=2, Lq=50, M=4, D=32, P=4, seed=11)
    ref = ms_deform_attn_torch(v64, spatial, start, loc64, attn64)
    # Inputs rounded to the low precision; locations stay in float32 (as the model passes them).
    v = v64.to(dtype).to(device)
    out = native(v, spatial, start, loc64.float().to(device), attn64.to(dtype).to(device))
    assert out.dtype == dtype
    ref_rounded = ms_deform_attn_torch(v.double().cpu(), spatial, start, loc64.float().double(), attn64.to(dtype).double())
    rel = (out.double().cpu() - ref_rounded).norm() / ref_rounded.norm()
    assert rel < tol, f"relative error {rel:.2e} >= {tol:.0e}"
    # Against the un-rounded inputs the error is what the dtype allows, no more.
    assert (out.double().cpu() - ref).norm() / ref.norm() < 5 * tol + (1e-2 if dtype != torch.float32 else 0)


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_no_worse_than_pytorch(device):
    """Judge the kernel against the framework in the same precision: at most 2x
    the error of the grid_sample path run in that precision."""
    dtype = torch.bfloat16
    shapes = [(20, 13), (10, 7), (5, 4), (3, 2)]
    v64, spatial, start, loc64, attn64 = make_case(shapes, N=1, Lq=64, M=4, D=32, P=4, seed=5, loc_range=(0.0, 1.0))
    ref = ms_deform_attn_torch(v64, spatial, start, loc64, attn64)
    ours = native(v64.to(dtype).to(device), spatial, start, loc64.float().to(device), attn64.to(dtype).to(device))
    theirs = ms_deform_attn_torch(v64.to(dtype), spatial, start, loc64.float(), attn64.to(dtype))
    err_ours = (ours.double().cpu() - ref).norm()
    err_theirs = (theirs.double() - ref).norm()
    assert err_ours <= 2 * err_theirs


def test_backward_is_bitwise_deterministic():
    shapes = [(20, 13), (10, 7), (5, 4), (3, 2)]
    args = make_case(shapes, N=2, Lq=200, M=8, D=32, P=4, dtype=torch.float32, seed=1)
    grads = []
    for _ in range(2):
        value, spatial, start, loc, attn = (a.clone().requires_grad_() if a.is_floating_point() else a for a in args)
        out = native(value, spatial, start, loc, attn)
        out.backward(torch.ones_like(out))
        grads.append((value.grad, loc.grad, attn.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_backward_independent_of_thread_count():
    shapes = [(12, 9), (6, 5)]
    args = make_case(shapes, N=1, Lq=64, M=4, D=16, P=4, dtype=torch.float32, seed=2)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            value, spatial, start, loc, attn = (a.clone().requires_grad_() if a.is_floating_point() else a for a in args)
            native(value, spatial, start, loc, attn).sum().backward()
            results.append((value.grad, loc.grad, attn.grad))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 3.0e9])
def test_non_finite_and_huge_locations_contribute_zero(device, bad):
    shapes = [(6, 4), (3, 5)]
    value, spatial, start, loc, attn = make_case(shapes, N=1, Lq=4, M=2, D=8, P=3, device=device, seed=9)
    poisoned = loc.clone()
    poisoned[0, 1, 0, 0, 2, 0] = bad
    poisoned[0, 2, 1, 1, 0, 1] = bad
    cleared = loc.clone()
    cleared[0, 1, 0, 0, 2] = -10.0  # far outside: contributes nothing
    cleared[0, 2, 1, 1, 0] = -10.0
    v, l, a = value.requires_grad_(), poisoned.requires_grad_(), attn.requires_grad_()
    out = native(v, spatial, start, l, a)
    torch.testing.assert_close(out, native(value.detach(), spatial, start, cleared, attn.detach()), rtol=0, atol=0)
    out.sum().backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(l.grad).all() and torch.isfinite(a.grad).all()
    assert l.grad[0, 1, 0, 0, 2].abs().sum() == 0 and a.grad[0, 1, 0, 0, 2] == 0


def test_torch_backend_treats_non_finite_locations_as_outside():
    value, spatial, start, loc, attn = make_case([(6, 4)], N=1, Lq=3, M=1, D=4, P=2, seed=4)
    loc[0, 0, 0, 0, 0] = float("nan")
    out = ms_deform_attn(value, spatial, start, loc, attn, backend="torch")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, native(value, spatial, start, loc, attn), rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs():
    value, spatial, start, loc, attn = make_case([(6, 4), (3, 5)], N=2, Lq=5, M=2, D=8, P=4, seed=12)
    v_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.permute(1, 0, 2, 3, 4, 5).contiguous().permute(1, 0, 2, 3, 4, 5)
    attn_nc = attn[:, :, :, :, :].transpose(0, 1).contiguous().transpose(0, 1)
    assert not v_nc.is_contiguous() and not loc_nc.is_contiguous()
    torch.testing.assert_close(native(v_nc, spatial, start, loc_nc, attn_nc), native(value, spatial, start, loc, attn))


def test_empty_batch_and_queries():
    value, spatial, start, loc, attn = make_case([(3, 3)], N=2, Lq=0, M=2, D=4, P=2)
    assert native(value, spatial, start, loc, attn).shape == (2, 0, 8)
    value, spatial, start, loc, attn = make_case([(3, 3)], N=0, Lq=3, M=2, D=4, P=2)
    assert native(value, spatial, start, loc, attn).shape == (0, 3, 8)


def _good():
    return make_case([(6, 4), (3, 5)], N=2, Lq=5, M=2, D=8, P=4)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: (a[0][0],) + a[1:], ValueError, "value"),
        (lambda a: (a[0][:, :-1],) + a[1:], ValueError, "S = "),
        (lambda a: (a[0], a[1].float()) + a[2:], TypeError, "spatial_shapes"),
        (lambda a: (a[0], a[1][:1]) + a[2:], ValueError, "spatial_shapes"),
        (lambda a: (a[0], a[1], a[2] + 1) + a[3:], ValueError, "level_start_index"),
        (lambda a: (a[0], a[1], a[2][:1]) + a[3:], ValueError, "level_start_index"),
        (lambda a: (a[0], torch.tensor([[6, 4], [3, -5]]), a[2]) + a[3:], ValueError, "spatial_shapes"),
        (lambda a: a[:3] + (a[3][..., :1],) + a[4:], ValueError, "sampling_locations"),
        (lambda a: a[:3] + (a[3][:1],) + a[4:], ValueError, "sampling_locations"),
        (lambda a: a[:4] + (a[4][:, :, :, :, :2],), ValueError, "attention_weights"),
        (lambda a: a[:4] + (a[4].long(),), TypeError, "attention_weights"),
        (lambda a: (a[0].long(),) + a[1:], TypeError, "value"),
        (lambda a: (a[0].half(),) + a[1:], TypeError, "value"),
        (lambda a: (list(a[0]),) + a[1:], TypeError, "value"),
    ],
)
def test_invalid_arguments_raise(mutate, exc, match):
    with pytest.raises(exc, match=match):
        native(*mutate(_good()))


def test_unknown_backend_names_the_argument(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        ms_deform_attn(*_good(), backend="fast")
    monkeypatch.setenv("DDETR_MSDA_BACKEND", "nope")
    with pytest.raises(ValueError, match="DDETR_MSDA_BACKEND"):
        ms_deform_attn(*_good())


def test_environment_variable_forces_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(msda_mod, "ms_deform_attn_torch", lambda *a: calls.append(1) or ms_deform_attn_torch(*a))
    monkeypatch.setenv("DDETR_MSDA_BACKEND", "torch")
    msda_mod.ms_deform_attn(*_good())
    assert calls == [1]
    monkeypatch.setenv("DDETR_MSDA_BACKEND", "native")
    msda_mod.ms_deform_attn(*_good())
    assert calls == [1]


def test_cuda_tensors_without_cuda_kernels_fall_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(msda_mod, "native_supports", lambda device: device.type == "cpu")
    monkeypatch.setattr(msda_mod, "_warned_cuda_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert msda_mod.resolve_backend(None, torch.device("cuda")) == "torch"
        assert msda_mod.resolve_backend(None, torch.device("cuda")) == "torch"
    assert len([w for w in caught if "CUDA" in str(w.message)]) == 1
    with pytest.raises(RuntimeError, match="native"):
        msda_mod.resolve_backend("native", torch.device("cuda"))


class TestCompiledBoundary:
    """The pybind11 entry point re-checks what Python hands it."""

    def _call(self, **over):
        ext = msda_mod.extension()
        value, spatial, start, loc, attn = make_case([(6, 4), (3, 5)], N=1, Lq=2, M=1, D=4, P=1, dtype=torch.float32)
        out = torch.empty(1, 2, 1, 4)
        kw = dict(
            device="cpu", device_index=0, dtype="float32", sizes=[1, 39, 1, 4, 2, 2, 1],
            spatial_shapes=[(6, 4), (3, 5)], level_start=[0, 24],
            buffers={"value": (value.data_ptr(), value.numel()), "sampling_locations": (loc.data_ptr(), loc.numel()),
                     "attention_weights": (attn.data_ptr(), attn.numel()), "output": (out.data_ptr(), out.numel())},
        )
        kw.update(over)
        ext.forward(**kw)
        return out

    def test_valid_call(self):
        assert torch.isfinite(self._call()).all()

    @pytest.mark.parametrize(
        "over,match",
        [
            (dict(sizes=[1, 40, 1, 4, 2, 2, 1]), "S = 40"),
            (dict(sizes=[1, 39, 0, 4, 2, 2, 1]), "M"),
            (dict(level_start=[0, 23]), "level_start_index"),
            (dict(spatial_shapes=[(6, 4)]), "spatial_shapes"),
            (dict(dtype="int8"), "dtype"),
            (dict(device="tpu"), "device"),
            (dict(sizes=[1, 39, 1, 4, 2, 2, 1 << 62]), "overflow"),
            (dict(num_threads=0), "num_threads"),
        ],
    )
    def test_rejects(self, over, match):
        with pytest.raises(ValueError, match=match):
            self._call(**over)

    def test_rejects_wrong_buffer_sizes_and_null_pointers(self):
        value = torch.zeros(39 * 4)
        good = self._call  # noqa: F841
        with pytest.raises(ValueError, match="value: expected 156 elements"):
            self._call(buffers={"value": (value.data_ptr(), 10), "sampling_locations": (1, 8), "attention_weights": (1, 4), "output": (1, 8)})
        with pytest.raises(ValueError, match="null data pointer"):
            self._call(buffers={"value": (0, 156), "sampling_locations": (4, 8), "attention_weights": (4, 4), "output": (4, 8)})
        with pytest.raises(ValueError, match="aligned"):
            self._call(buffers={"value": (value.data_ptr() + 1, 156), "sampling_locations": (4, 8), "attention_weights": (4, 4), "output": (4, 8)})
        with pytest.raises(ValueError, match="missing"):
            self._call(buffers={})

    def test_cuda_request_on_cpu_only_build(self):
        ext = msda_mod.extension()
        if ext.has_cuda():
            with pytest.raises(ValueError, match="CUDA device"):
                self._call(device="cuda", device_index=ext.cuda_device_count())
        else:
            with pytest.raises(RuntimeError, match="no CUDA"):
                self._call(device="cuda")


def test_opcheck():
    value, spatial, start, loc, attn = make_case([(6, 4), (3, 5)], N=2, Lq=5, M=2, D=8, P=2, dtype=torch.float32)
    for t in (value, loc, attn):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn.default, (value, spatial, start, loc, attn))


def test_torch_compile_runs_through_the_custom_op():
    value, spatial, start, loc, attn = make_case([(6, 4), (3, 5)], N=1, Lq=5, M=2, D=8, P=2, dtype=torch.float32)

    def f(v, l, a):
        return ms_deform_attn(v, spatial, start, l.sigmoid(), a.softmax(-1), backend="native") * 2

    compiled = torch.compile(f, backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled(value, loc, attn), f(value, loc, attn))


def test_bfloat16_gradients_have_input_dtypes():
    value, spatial, start, loc, attn = make_case([(6, 4), (3, 5)], N=1, Lq=5, M=2, D=8, P=2, dtype=torch.bfloat16)
    loc = loc.float().requires_grad_()
    value.requires_grad_()
    attn.requires_grad_()
    native(value, spatial, start, loc, attn).float().sum().backward()
    assert value.grad.dtype == torch.bfloat16 and loc.grad.dtype == torch.float32 and attn.grad.dtype == torch.bfloat16


def test_backward_of_a_level_too_large_to_pack():
    """A level whose value slice exceeds the CPU backward's packing limit (4M
    elements) takes the strided path even when densely sampled (Lq * P >=
    pixels); it must agree with the reference too."""
    shapes = [(2, 8193), (1, 1)]  # 16,386 pixels x 256 channels > 4M
    Lq = 4100  # x 4 points >= 16,386 pixels: only the size keeps it from packing
    value, spatial, start, loc, attn = make_case(shapes, N=1, Lq=Lq, M=1, D=256, P=4, dtype=torch.float64, seed=21)
    value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))
    grad = torch.randn(1, Lq, 256, dtype=torch.float64)
    got = torch.autograd.grad(native(value, spatial, start, loc, attn), (value, loc, attn), grad)
    ref = torch.autograd.grad(ms_deform_attn_torch(value, spatial, start, loc, attn), (value, loc, attn), grad)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shapes", [[(3, 4), (2, 2), (1, 1)], [(5, 1)], [(7, 5), (3, 4)]])
def test_ordered_grad_value_matches_the_kernel(shapes):
    """The deterministic-mode value gradient (index_add_ in a fixed order) is
    the kernel's, non-finite and outside locations included."""
    from ddetr_cli.ops.msda_grad_value import msda_grad_value

    value, spatial, start, loc, attn = make_case(shapes, N=2, Lq=7, M=3, D=5, P=4)
    loc.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), 5.0, -3.0], dtype=loc.dtype)
    v = value.clone().requires_grad_()
    out = ms_deform_attn(v, spatial, start, loc, attn, backend="native")
    grad = torch.randn_like(out)
    out.backward(grad)
    shapes_list = [tuple(s) for s in spatial.tolist()]
    got = msda_grad_value(grad.view(2, 7, 3, 5), shapes_list, start.tolist(), loc, attn, value.shape[1])
    torch.testing.assert_close(got, v.grad, rtol=1e-12, atol=1e-12)


# ------------------------------------------- level geometry made once per forward


def _geometry(shapes):
    from ddetr_cli.ops import LevelGeometry

    return LevelGeometry.build(shapes, "cpu")


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_levels_entry_matches_the_public_op(backend):
    from ddetr_cli.ops import ms_deform_attn_levels

    shapes = [(6, 4), (3, 5), (1, 1)]
    value, spatial, start, loc, attn = make_case(shapes, N=2, Lq=7, M=2, D=8, P=3, seed=4)
    geometry = _geometry(shapes)
    assert torch.equal(geometry.spatial_shapes, spatial) and torch.equal(geometry.level_start_index, start)
    assert geometry.total == value.shape[1] and geometry.hw == (6, 4, 3, 5, 1, 1)
    assert torch.equal(geometry.offset_normalizer, torch.tensor([[4.0, 6.0], [5.0, 3.0], [1.0, 1.0]]))
    got = ms_deform_attn_levels(value, geometry, loc, attn, backend=backend)
    torch.testing.assert_close(got, ms_deform_attn_torch(value, spatial, start, loc, attn), rtol=1e-12, atol=1e-12)


def test_levels_entry_checks_the_tensors_against_the_geometry():
    from ddetr_cli.ops import LevelGeometry, ms_deform_attn_levels

    value, _, _, loc, attn = _good()  # levels (6, 4), (3, 5)
    with pytest.raises(ValueError, match="spatial_shapes: has 3 levels, but sampling_locations has L = 2"):
        ms_deform_attn_levels(value, _geometry([(6, 4), (3, 5), (1, 1)]), loc, attn)
    with pytest.raises(ValueError, match="value: S = 39, but spatial_shapes sum to 38"):
        ms_deform_attn_levels(value, _geometry([(6, 4), (2, 7)]), loc, attn)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_levels(value, _geometry([(6, 4), (3, 5)]), loc, attn[..., :2])
    with pytest.raises(ValueError, match="spatial_shapes: level 1 has size 3x0"):
        LevelGeometry.build([(6, 4), (3, 0)], "cpu")


def test_each_entry_checks_its_geometry_once(monkeypatch):
    """ms_deform_attn reads and checks the geometry tensors once per call (the
    custom op does not again); ms_deform_attn_levels never reads them."""
    from ddetr_cli.ops import ms_deform_attn_levels

    from ddetr_cli.ops import msda_checks

    calls = []
    real = msda_checks._level_geometry
    monkeypatch.setattr(msda_checks, "_level_geometry", lambda *a: calls.append(1) or real(*a))
    value, spatial, start, loc, attn = _good()
    value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))
    native(value, spatial, start, loc, attn).sum().backward()
    assert len(calls) == 1
    calls.clear()
    ms_deform_attn_levels(value, _geometry([(6, 4), (3, 5)]), loc, attn, backend="native").sum().backward()
    assert calls == []


def test_opcheck_of_the_levels_op():
    value, _, _, loc, attn = make_case([(6, 4), (3, 5)], N=2, Lq=5, M=2, D=8, P=2, dtype=torch.float32)
    for t in (value, loc, attn):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_levels.default, (value, [6, 4, 3, 5], loc, attn))


def test_gradcheck_of_the_tensor_geometry_op():
    """``torch.ops.ddetr.ms_deform_attn`` (tensor geometry, for direct callers) has its own autograd."""
    value, spatial, start, loc, attn = make_case([(3, 4), (2, 2)], N=1, Lq=3, M=2, D=3, P=2, seed=8)
    value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))
    op = torch.ops.ddetr.ms_deform_attn
    assert torch.autograd.gradcheck(lambda v, l, a: op(v, spatial, start, l, a), (value, loc, attn), eps=1e-6, atol=1e-7)


def test_model_forward_builds_its_geometry_once_and_never_reads_it_back(monkeypatch):
    from ddetr_cli.models import build_model, preset
    from ddetr_cli.ops import LevelGeometry, msda_checks

    torch.manual_seed(0)
    model = build_model(preset("tiny", num_classes=3)).eval()
    images = torch.randn(1, 3, 96, 128)
    builds = []
    real_build = LevelGeometry.build.__func__
    monkeypatch.setattr(LevelGeometry, "build", classmethod(lambda cls, *a: builds.append(1) or real_build(cls, *a)))
    monkeypatch.setattr(msda_checks, "_level_geometry", lambda *a: pytest.fail("the model's op call read the geometry"))
    with torch.inference_mode():
        first = model(images)
        assert builds == [1]
        again = model(images)  # the same size: the cached geometry
    assert builds == [1]
    torch.testing.assert_close(first["pred_boxes"], again["pred_boxes"], rtol=0, atol=0)
