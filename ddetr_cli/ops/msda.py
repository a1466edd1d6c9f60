"""Multi-scale deformable attention: argument checks, backend choice and the
``torch.library`` custom op (with a fake implementation and autograd) around
the compiled kernels.

Backends:
  * ``native``: the compiled kernels (OpenMP on CPU, CUDA when the extension was
    built with it);
  * ``torch``:  the pure-PyTorch reference in :mod:`ddetr_cli.ops.msda_torch`;
  * ``auto`` (default): native when the extension supports the tensors' device,
    torch otherwise (with one warning when CUDA tensors meet a CPU-only build).

Choose with the ``backend=`` argument or the ``DDETR_MSDA_BACKEND`` environment
variable (the argument wins).

Numerics: value, output and grad_output keep the value's dtype; sampling
locations, attention weights and all accumulation use float32 (float64 for
float64 values), so bf16/fp16 models keep sub-pixel sampling precision. A
sampling location that is NaN, +-inf or outside the map contributes zero and
gets a zero gradient.

Two entry points, each checking its arguments once in Python (the compiled
boundary checks them again): :func:`ms_deform_attn` (the official signature,
level geometry as tensors, read once per call) and :func:`ms_deform_attn_levels`
(a :class:`~ddetr_cli.ops.geometry.LevelGeometry` made once per model forward:
no tensor is read per call). Both run the custom op
``ddetr::ms_deform_attn_levels``, which takes the level sizes as Python ints;
``ddetr::ms_deform_attn`` is the same op with tensor geometry, for direct callers.

CUDA: the op makes no host sync when ``spatial_shapes`` and
``level_start_index`` are CPU tensors (the model keeps them there), so it runs
under CUDA-graph capture. The backward adds grad_value up with atomics, in an
order that varies from run to run; under
``torch.use_deterministic_algorithms(True)`` it adds it up in a fixed order
instead (:mod:`ddetr_cli.ops.msda_grad_value`), bitwise reproducible.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

from ..errors import DdetrError
from .geometry import LevelGeometry, level_starts
from .msda_checks import check_arguments, check_levels
from .msda_grad_value import msda_grad_value
from .msda_torch import ms_deform_attn_torch

ENV_BACKEND = "DDETR_MSDA_BACKEND"
BACKENDS = ("auto", "native", "torch")
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16", torch.float16: "float16"}

_ext: ModuleType | None = None
_ext_error: str | None = None
_cuda_unusable: str | None = None  # why the CUDA kernels cannot run here ("" when they can), asked once
_warned_cuda_fallback = False


def extension() -> ModuleType | None:
    """The compiled module, or None when it cannot be imported (see :func:`extension_error`)."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            from ddetr_cli import _C  # type: ignore[attr-defined]
        except ImportError as exc:  # a source checkout that was never built
            _ext_error = str(exc)
            return None
        try:
            _C.cpu_isa()  # reads $DDETR_CPU_ISA: a wrong name is the user's mistake, said in one line
        except ValueError as exc:
            raise DdetrError(str(exc)) from None
        _ext = _C
    return _ext


def extension_error() -> str | None:
    extension()
    return _ext_error


def cuda_unusable_reason() -> str:
    """Empty when the compiled CUDA kernels can run here; otherwise why not: no
    extension, a CPU-only build, or CUDA's own error text (a driver too old for
    the CUDA runtime the kernels were built with, no device). Asked once."""
    global _cuda_unusable
    if _cuda_unusable is None:
        ext = extension()
        if ext is None:
            _cuda_unusable = f"the compiled module failed to import: {_ext_error}"
        elif not ext.has_cuda():
            _cuda_unusable = "this build has no CUDA kernels (built without nvcc?)"
        else:
            _cuda_unusable = ext.cuda_unavailable_reason()
    return _cuda_unusable


def native_supports(device: torch.device) -> bool:
    ext = extension()
    if ext is None:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and not cuda_unusable_reason()


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Returns ``native`` or ``torch`` for tensors on ``device``."""
    global _warned_cuda_fallback
    choice = backend if backend is not None else os.environ.get(ENV_BACKEND, "auto")
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        source = "backend" if backend is not None else ENV_BACKEND
        raise ValueError(f"{source}: unknown backend {choice!r} (choose from {', '.join(BACKENDS)})")
    if choice == "torch":
        return "torch"
    if native_supports(device):
        return "native"
    if choice == "native":
        ext = extension()
        if ext is None:
            why = f"the compiled module failed to import: {_ext_error}"
        elif device.type == "cuda":
            why = cuda_unusable_reason()
        else:
            why = f"this build has no {device.type.upper()} kernels"
        raise RuntimeError(f"backend 'native' requested for {device.type} tensors, but {why}")
    if device.type == "cuda" and not _warned_cuda_fallback:
        _warned_cuda_fallback = True
        why = cuda_unusable_reason()
        hint = (" Rebuild with nvcc on PATH (pip install --no-build-isolation -e .) to get them."
                if "no CUDA kernels" in why else "")
        warnings.warn(
            f"ddetr: the native CUDA kernels cannot run ({why}); "
            f"multi-scale deformable attention falls back to the slower PyTorch path.{hint}",
            RuntimeWarning,
            stacklevel=3,
        )
    return "torch"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_native_dtype(value: torch.Tensor) -> None:
    allowed = CUDA_DTYPES if value.device.type == "cuda" else CPU_DTYPES
    if value.dtype not in allowed:
        names = ", ".join(_DTYPE_NAMES[d] for d in allowed)
        raise TypeError(f"value: dtype {value.dtype} is not supported by the native {value.device.type} kernel ({names})")


def _launch_args(t: torch.Tensor) -> tuple[str, int, int, int]:
    """device name, device index, stream handle and thread count for a launch."""
    if t.device.type == "cuda":
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return "cuda", index, torch.cuda.current_stream(t.device).cuda_stream, 1
    return "cpu", 0, 0, max(1, torch.get_num_threads())


@dataclass
class _Launch:
    """What both kernels take: the module, sizes, level geometry and the three
    inputs made contiguous in the kernel's dtypes."""

    ext: ModuleType
    sizes: list[int]  # [N, S, M, D, Lq, L, P]
    shapes: list[tuple[int, int]]
    starts: list[int]
    acc: torch.dtype
    inputs: dict[str, torch.Tensor]

    def run(self, kernel: str, value: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
        device, index, stream, threads = _launch_args(value)
        pointers = {name: (t.data_ptr(), t.numel()) for name, t in {**self.inputs, **buffers}.items()}
        call = getattr(self.ext, kernel)
        args = (device, index, _DTYPE_NAMES[value.dtype], self.sizes, self.shapes, self.starts, pointers, stream, threads)
        if device == "cuda" and index != torch.cuda.current_device():
            with torch.cuda.device(index):  # torch's guard: no stray context on the device switched back to
                call(*args)
        else:
            call(*args)


def _launch(value, shapes, starts, sampling_locations, attention_weights) -> _Launch:
    """The launch of checked arguments (the compiled boundary checks them again)."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"ddetr: the compiled module is not available: {_ext_error}")
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    acc = _acc_dtype(value.dtype)
    inputs = {
        "value": value.contiguous(),
        "sampling_locations": sampling_locations.to(acc).contiguous(),
        "attention_weights": attention_weights.to(acc).contiguous(),
    }
    return _Launch(ext, [N, S, M, D, Lq, L, P], list(shapes), list(starts), acc, inputs)


def _native_forward(value, shapes, starts, sampling_locations, attention_weights) -> torch.Tensor:
    launch = _launch(value, shapes, starts, sampling_locations, attention_weights)
    N, _, M, D, Lq, _, _ = launch.sizes
    out = torch.empty((N, Lq, M, D), dtype=value.dtype, device=value.device)  # fully written by the kernel
    launch.run("forward", value, {"output": out})
    return out.view(N, Lq, M * D)


def _native_backward(grad_output, value, shapes, starts, sampling_locations, attention_weights):
    launch = _launch(value, shapes, starts, sampling_locations, attention_weights)
    N, S, M, D, Lq, _, _ = launch.sizes
    if tuple(grad_output.shape) != (N, Lq, M * D):
        raise ValueError(f"grad_output: expected shape {(N, Lq, M * D)}, got {tuple(grad_output.shape)}")
    grad_out = grad_output.to(value.dtype).contiguous()
    grad_loc = torch.empty_like(launch.inputs["sampling_locations"])  # fully written by the kernel
    grad_attn = torch.empty_like(launch.inputs["attention_weights"])
    buffers = {"grad_output": grad_out, "grad_sampling_locations": grad_loc, "grad_attention_weights": grad_attn}
    # The CUDA kernel adds grad_value up with atomics (run-to-run order varies);
    # in deterministic mode it leaves grad_value out and index_add_ sums it in order.
    deterministic = value.device.type == "cuda" and torch.are_deterministic_algorithms_enabled()
    if not deterministic:
        buffers["grad_value"] = grad_value = torch.zeros((N, S, M, D), dtype=launch.acc, device=value.device)
    launch.run("backward", value, buffers)
    if deterministic:
        grad_value = msda_grad_value(grad_out.view(N, Lq, M, D), launch.shapes, launch.starts,
                                     launch.inputs["sampling_locations"], launch.inputs["attention_weights"], S)
    return (
        grad_value.to(value.dtype),
        grad_loc.to(sampling_locations.dtype),
        grad_attn.to(attention_weights.dtype),
    )


def _levels(hw) -> tuple[list[tuple[int, int]], tuple[int, ...]]:
    """(H0, W0, H1, W1, ...) -> level sizes and start offsets."""
    shapes = [(int(hw[i]), int(hw[i + 1])) for i in range(0, len(hw), 2)]
    return shapes, level_starts(shapes)[0]


# The op with tensor level geometry (the official signature): for direct callers
# and opcheck. It checks its arguments itself, as it is an entry point.
@torch.library.custom_op("ddetr::ms_deform_attn", mutates_args=())
def _msda_forward_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    shapes, starts = check_arguments(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_native_dtype(value)
    return _native_forward(value, shapes, starts, sampling_locations, attention_weights)


@_msda_forward_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return _fake_output(value, sampling_locations)


@torch.library.custom_op("ddetr::ms_deform_attn_backward", mutates_args=())
def _msda_backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shapes, starts = check_arguments(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _native_backward(grad_output, value, shapes, starts, sampling_locations, attention_weights)


@_msda_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return _fake_grads(value, sampling_locations, attention_weights)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    grads = _msda_backward_op(grad_output, *ctx.saved_tensors)
    return grads[0], None, None, grads[1], grads[2]


_msda_forward_op.register_autograd(_backward, setup_context=_setup_context)


# The op with the level sizes as Python ints (H0, W0, H1, W1, ...), already
# checked by its caller (ms_deform_attn, ms_deform_attn_levels): what the model
# runs, so no call reads a geometry tensor back or checks it again.
@torch.library.custom_op("ddetr::ms_deform_attn_levels", mutates_args=())
def _levels_forward_op(value: torch.Tensor, level_hw: list[int], sampling_locations: torch.Tensor,
                       attention_weights: torch.Tensor) -> torch.Tensor:
    return _native_forward(value, *_levels(level_hw), sampling_locations, attention_weights)


@_levels_forward_op.register_fake
def _(value, level_hw, sampling_locations, attention_weights):
    return _fake_output(value, sampling_locations)


@torch.library.custom_op("ddetr::ms_deform_attn_levels_backward", mutates_args=())
def _levels_backward_op(grad_output: torch.Tensor, value: torch.Tensor, level_hw: list[int],
                        sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _native_backward(grad_output, value, *_levels(level_hw), sampling_locations, attention_weights)


@_levels_backward_op.register_fake
def _(grad_output, value, level_hw, sampling_locations, attention_weights):
    return _fake_grads(value, sampling_locations, attention_weights)


def _levels_setup_context(ctx, inputs, output):
    value, ctx.level_hw, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, sampling_locations, attention_weights)


def _levels_backward(ctx, grad_output):
    value, sampling_locations, attention_weights = ctx.saved_tensors
    grads = _levels_backward_op(grad_output, value, ctx.level_hw, sampling_locations, attention_weights)
    return grads[0], None, grads[1], grads[2]


_levels_forward_op.register_autograd(_levels_backward, setup_context=_levels_setup_context)


def _fake_output(value, sampling_locations):
    N, _, M, D = value.shape
    return value.new_empty((N, sampling_locations.shape[1], M * D))


def _fake_grads(value, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _run(value, shapes, hw, sampling_locations, attention_weights, backend: str | None) -> torch.Tensor:
    """Checked arguments -> the chosen backend."""
    if resolve_backend(backend, value.device) == "torch":
        return ms_deform_attn_torch(value, shapes, None, sampling_locations, attention_weights)
    _check_native_dtype(value)
    ext = extension()
    if len(shapes) > ext.MAX_LEVELS:
        raise ValueError(f"spatial_shapes: the native kernel takes at most {ext.MAX_LEVELS} levels, got {len(shapes)}")
    return _levels_forward_op(value, list(hw), sampling_locations, attention_weights)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention.

    Args:
        value: [N, S, M, D] features of all levels, flattened and concatenated.
        spatial_shapes: [L, 2] integer (H, W) per level; a CPU tensor avoids a
            device sync when the other tensors are on CUDA.
        level_start_index: [L] offset of each level in S (cumulative H*W).
        sampling_locations: [N, Lq, M, L, P, 2] normalized (x, y) in [0, 1].
        attention_weights: [N, Lq, M, L, P].
        backend: ``auto`` | ``native`` | ``torch`` (default: $DDETR_MSDA_BACKEND or auto).

    Returns:
        [N, Lq, M*D] in value's dtype.
    """
    shapes, _ = check_arguments(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _run(value, shapes, [x for hw in shapes for x in hw], sampling_locations, attention_weights, backend)


def ms_deform_attn_levels(
    value: torch.Tensor,
    geometry: LevelGeometry,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`ms_deform_attn` with the level geometry of a whole model forward
    (:class:`~ddetr_cli.ops.geometry.LevelGeometry`, made and checked once):
    only the three tensors are checked here, and no tensor is read back to the host.

    value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2], attention_weights
    [N, Lq, M, L, P] -> [N, Lq, M*D] in value's dtype."""
    check_levels(value, geometry, sampling_locations, attention_weights)
    return _run(value, geometry.shapes, geometry.hw, sampling_locations, attention_weights, backend)
