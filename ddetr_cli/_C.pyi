"""ddetr's compiled core: multi-scale deformable attention kernels.

Low level: call :func:`ddetr_cli.ops.ms_deform_attn` instead. These functions
take raw data pointers with their element counts; every size, the level
geometry, each buffer's length, alignment and non-nullness are re-checked here
and a bad call raises ValueError naming the argument.

Buffers (``name: (data_ptr, numel)``), all C-contiguous:
  value [N, S, M, D] (dtype), sampling_locations [N, Lq, M, L, P, 2] (acc),
  attention_weights [N, Lq, M, L, P] (acc), output [N, Lq, M, D] (dtype);
  backward adds grad_output (dtype), grad_value (acc, zero-filled),
  grad_sampling_locations and grad_attention_weights (acc).
acc is float64 for float64 and float32 otherwise.
"""

MAX_LEVELS: int

def forward(
    device: str,
    device_index: int,
    dtype: str,
    sizes: list[int],
    spatial_shapes: list[tuple[int, int]],
    level_start: list[int],
    buffers: dict[str, tuple[int, int]],
    stream: int = 0,
    num_threads: int = 1,
) -> None:
    """sizes = [N, S, M, D, Lq, L, P]; device 'cpu' or 'cuda'; dtype 'float32' |
    'float64' | 'bfloat16' | 'float16' (CUDA only); stream is the caller's
    cudaStream_t as an int."""

def backward(
    device: str,
    device_index: int,
    dtype: str,
    sizes: list[int],
    spatial_shapes: list[tuple[int, int]],
    level_start: list[int],
    buffers: dict[str, tuple[int, int]],
    stream: int = 0,
    num_threads: int = 1,
) -> None:
    """Fills grad_value (accumulated), grad_sampling_locations and
    grad_attention_weights (fully written). Bitwise deterministic on the CPU.
    On CUDA grad_value may be left out of ``buffers``: only the other two are
    then computed (the deterministic mode adds grad_value up itself)."""

def has_cuda() -> bool:
    """True when this build contains the CUDA kernels."""

def cuda_device_count() -> int:
    """Visible CUDA devices (0 without a driver or GPU, or in a CPU-only build)."""

def cuda_unavailable_reason() -> str:
    """Empty when a CUDA device is usable; otherwise why not, with CUDA's own
    error text (for example a driver too old for the runtime built in)."""

def has_openmp() -> bool: ...
def max_threads() -> int: ...
def cpu_isa() -> str:
    """The CPU kernel build in use: 'avx512bf16', 'avx512', 'avx2' or
    'baseline'; the widest compiled one this processor runs unless
    $DDETR_CPU_ISA names a narrower one. Raises ValueError naming
    DDETR_CPU_ISA when it holds no instruction set's name."""

def cpu_isas(runnable: bool = False) -> list[str]:
    """The compiled CPU kernel builds, widest first; with ``runnable``, only
    those this processor supports."""

def set_cpu_isa(name: str) -> str:
    """Use another CPU kernel build from now on (tests, comparisons), by the
    rules of $DDETR_CPU_ISA: a build that is not compiled or that this processor
    cannot run falls back to the widest one below it, with one warning line on
    stderr; an unknown name raises ValueError. Returns the build chosen."""
