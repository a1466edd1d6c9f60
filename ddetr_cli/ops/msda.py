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

            _ext = _C
        except ImportError as exc:  # a source checkout that was never built
            _ext_error = str(exc)
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


def _level_geometry(
    spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, num_levels: int
) -> tuple[list[tuple[int, int]], list[int]]:
    if not isinstance(spatial_shapes, torch.Tensor):
        raise TypeError(f"spatial_shapes: expected a tensor, got {type(spatial_shapes).__name__}")
    if not isinstance(level_start_index, torch.Tensor):
        raise TypeError(f"level_start_index: expected a tensor, got {type(level_start_index).__name__}")
    if spatial_shapes.dtype.is_floating_point or spatial_shapes.dtype.is_complex or spatial_shapes.dtype == torch.bool:
        raise TypeError(f"spatial_shapes: expected an integer tensor, got {spatial_shapes.dtype}")
    if level_start_index.dtype.is_floating_point or level_start_index.dtype.is_complex or level_start_index.dtype == torch.bool:
        raise TypeError(f"level_start_index: expected an integer tensor, got {level_start_index.dtype}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] < 1:
        raise ValueError(f"spatial_shapes: expected shape (L, 2) with L >= 1, got {tuple(spatial_shapes.shape)}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"{name}: pass a CPU tensor under CUDA-graph capture (reading a CUDA one needs a host sync)")
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if len(shapes) != num_levels:
        raise ValueError(f"spatial_shapes: has {len(shapes)} levels, but sampling_locations has L = {num_levels}")
    starts = [int(s) for s in level_start_index.reshape(-1).tolist()]
    if level_start_index.dim() != 1 or len(starts) != len(shapes):
        raise ValueError(f"level_start_index: expected shape ({len(shapes)},), got {tuple(level_start_index.shape)}")
    total = 0
    for lvl, ((h, w), start) in enumerate(zip(shapes, starts)):
        if h < 1 or w < 1:
            raise ValueError(f"spatial_shapes: level {lvl} has size {h}x{w}; sizes must be >= 1")
        if start != total:
            raise ValueError(f"level_start_index: entry {lvl} is {start}, expected {total} (cumulative H*W of spatial_shapes)")
        total += h * w
    return shapes, starts


def check_arguments(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[list[tuple[int, int]], list[int]]:
    """Raises TypeError/ValueError naming the offending argument; returns the
    level sizes and start offsets as Python ints."""
    for name, t in (("value", value), ("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if value.dim() != 4:
        raise ValueError(f"value: expected shape (N, S, M, D), got {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations: expected shape (N, Lq, M, L, P, 2), got {tuple(sampling_locations.shape)}")
    if attention_weights.dim() != 5:
        raise ValueError(f"attention_weights: expected shape (N, Lq, M, L, P), got {tuple(attention_weights.shape)}")
    N, S, M, D = value.shape
    n2, Lq, m2, L, P, _ = sampling_locations.shape
    if M < 1 or D < 1:
        raise ValueError(f"value: heads and channels must be >= 1, got shape {tuple(value.shape)}")
    if P < 1:
        raise ValueError(f"sampling_locations: P (points) must be >= 1, got shape {tuple(sampling_locations.shape)}")
    if n2 != N or m2 != M:
        raise ValueError(
            f"sampling_locations: batch/heads {n2}/{m2} do not match value's {N}/{M} "
            f"(value {tuple(value.shape)}, sampling_locations {tuple(sampling_locations.shape)})"
        )
    if tuple(attention_weights.shape) != (N, Lq, M, L, P):
        raise ValueError(f"attention_weights: expected shape {(N, Lq, M, L, P)}, got {tuple(attention_weights.shape)}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.device != value.device:
            raise ValueError(f"{name}: on {t.device}, but value is on {value.device}")
    shapes, starts = _level_geometry(spatial_shapes, level_start_index, L)
    total = sum(h * w for h, w in shapes)
    if total != S:
        raise ValueError(f"value: S = {S}, but spatial_shapes sum to {total} (sum of H*W)")
    return shapes, starts


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


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> _Launch:
    shapes, starts = check_arguments(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_native_dtype(value)
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
    return _Launch(ext, [N, S, M, D, Lq, L, P], shapes, starts, acc, inputs)


@torch.library.custom_op("ddetr::ms_deform_attn", mutates_args=())
def _msda_forward_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    launch = _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    N, _, M, D, Lq, _, _ = launch.sizes
    out = torch.empty((N, Lq, M, D), dtype=value.dtype, device=value.device)  # fully written by the kernel
    launch.run("forward", value, {"output": out})
    return out.view(N, Lq, M * D)


@_msda_forward_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    return value.new_empty((N, Lq, M * D))


@torch.library.custom_op("ddetr::ms_deform_attn_backward", mutates_args=())
def _msda_backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    launch = _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
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


@_msda_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = _msda_backward_op(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, None, None, grad_loc, grad_attn


_msda_forward_op.register_autograd(_backward, setup_context=_setup_context)


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
    check_arguments(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if resolve_backend(backend, value.device) == "torch":
        return ms_deform_attn_torch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_native_dtype(value)
    ext = extension()
    if len(spatial_shapes) > ext.MAX_LEVELS:
        raise ValueError(f"spatial_shapes: the native kernel takes at most {ext.MAX_LEVELS} levels, got {len(spatial_shapes)}")
    return _msda_forward_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
