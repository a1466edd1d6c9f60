"""The CUDA kernels without a GPU.

1. The extension configures and builds with nvcc (sm_90 only, to keep CI time
   down; the installed one where it has the CUDA kernels, as CI's install builds
   them), links the static CUDA runtime, imports on a machine without a driver,
   reports ``has_cuda()`` and a device count of 0 instead of crashing, and still
   runs its CPU kernel.
2. The kernels of cpp/msda_cuda.cu, compiled for the host with
   ``DDETR_MSDA_CUDA_NO_LAUNCH``, run on emulated warps (one OS thread per CUDA
   thread, __shfl_xor_sync through a per-warp barrier that also checks that all
   32 lanes take part) and are compared with the float64 PyTorch reference, for
   every dtype and vector width, odd channel counts, partly filled warps,
   grid-stride loops, misaligned pointers and non-finite locations. Without
   __CUDA_ARCH__ the backward takes the pre-sm_90 atomics (scalar, in the
   atomic layout); the developer switch's strided atomics run on a few cases.

Both are skipped when nvcc is not on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
CMAKE = shutil.which("cmake")
NINJA = shutil.which("ninja")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH"),
    pytest.mark.skipif(CMAKE is None, reason="cmake not found on PATH"),
]


def _run(cmd: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"command {proc.args} failed ({proc.returncode})\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def _cuda_include_dir() -> Path | None:
    """The directory holding cuda_runtime.h, as nvcc itself reports it (nvcc may be a wrapper script)."""
    candidates = []
    proc = _run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], timeout=60)
    for line in (proc.stdout + proc.stderr).splitlines():
        if "INCLUDES=" in line:
            candidates += [Path(tok.strip('"')[2:]) for tok in line.split("INCLUDES=", 1)[1].split() if tok.strip('"').startswith("-I")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), str(Path(NVCC).resolve().parent.parent), "/usr/local/cuda"):
        if root:
            candidates += [Path(root) / "include", *sorted(Path(root).glob("targets/*/include"))]
    return next((inc for inc in candidates if (inc / "cuda_runtime.h").is_file()), None)


@pytest.fixture(scope="module")
def cuda_module(tmp_path_factory) -> Path:
    """The installed module where it was built with the CUDA kernels (CI's install
    builds them for sm_90 when nvcc is found: no second build); otherwise
    configures and builds the project with DDETR_CUDA=ON for sm_90. Returns the module."""
    proc = _run([sys.executable, "-c", "import ddetr_cli._C as c; print(c.__file__ if c.has_cuda() else '')"], cwd="/")
    if proc.returncode == 0 and proc.stdout.strip():
        return Path(proc.stdout.strip())
    proc = _run([sys.executable, "-m", "pybind11", "--cmakedir"])
    if proc.returncode != 0:
        pytest.skip("pybind11 is not importable")
    build = tmp_path_factory.mktemp("cuda-build")
    configure = [
        CMAKE, "-S", str(ROOT), "-B", str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DDDETR_CUDA=ON",
        "-DDDETR_CUDA_ARCHITECTURES=90",
        f"-DCMAKE_CUDA_COMPILER={NVCC}",
        "-DSKBUILD_PROJECT_NAME=ddetr",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-DPYTHON_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={proc.stdout.strip()}",
    ]
    if NINJA:
        configure += ["-G", "Ninja"]
    env = {k: v for k, v in os.environ.items() if k not in ("CUDAARCHS", "CMAKE_GENERATOR")}
    proc = _run(configure, env=env)
    assert proc.returncode == 0, _explain(proc)
    assert "ddetr: CUDA kernels ON" in proc.stdout, proc.stdout
    proc = _run([CMAKE, "--build", str(build), "--parallel"], env=env)
    assert proc.returncode == 0, _explain(proc)
    modules = sorted(build.glob("_C*.so")) + sorted(build.glob("_C*.pyd"))
    assert len(modules) == 1, f"expected one built module in {build}, found {modules}"
    return modules[0]


_IMPORT_CHECK = textwrap.dedent(
    """
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    report = {"has_cuda": ext.has_cuda(), "count": ext.cuda_device_count(), "count_again": ext.cuda_device_count()}

    # The CPU kernel of this build still works.
    import torch
    from ddetr_cli.ops.msda_torch import ms_deform_attn_torch
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    N, M, D, Lq, L, P = 2, 2, 6, 5, 2, 3
    S = sum(h * w for h, w in shapes)
    value = torch.randn(N, S, M, D, generator=g)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g) * 1.2 - 0.1
    attn = torch.rand(N, Lq, M, L, P, generator=g)
    out = torch.empty(N, Lq, M, D)
    bufs = {"value": (value.data_ptr(), value.numel()), "sampling_locations": (loc.data_ptr(), loc.numel()),
            "attention_weights": (attn.data_ptr(), attn.numel()), "output": (out.data_ptr(), out.numel())}
    args = ("float32", [N, S, M, D, Lq, L, P], shapes, [0, 20], bufs)
    ext.forward("cpu", 0, *args, 0, 1)
    ref = ms_deform_attn_torch(value, torch.tensor(shapes), None, loc, attn)
    report["cpu_max_err"] = (out.reshape(ref.shape) - ref).abs().max().item()

    # With no device, a CUDA call is refused with a clean error, not a crash.
    if report["count"] == 0:
        try:
            ext.forward("cuda", 0, *args, 0, 1)
            report["cuda_call"] = "accepted"
        except ValueError as exc:
            report["cuda_call"] = str(exc)
    print(json.dumps(report))
    """
)


def test_cuda_build_imports_without_a_gpu(cuda_module):
    proc = _run([sys.executable, "-c", _IMPORT_CHECK, str(cuda_module)], timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, _explain(proc)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["has_cuda"] is True
    assert report["count"] >= 0 and report["count_again"] == report["count"]
    assert report["cpu_max_err"] < 1e-5
    if report["count"] == 0:
        assert "does not exist" in report["cuda_call"]


# ----------------------------------------------------------------- emulation

_EMU_CPP = r"""
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <atomic>
#include <barrier>
#include <thread>
#include <vector>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __grid_constant__
#define __grid_constant__
#undef __shared__
#define __shared__ static  // blocks run one after another, so one array per kernel serves each block in turn

namespace emu {
struct Warp {
  std::barrier<> bar{32};
  double slot[32];
  long long count[32];
  std::atomic<int> exited{0};
};
thread_local uint3 tIdx, bIdx;
thread_local dim3 gDim;
thread_local Warp* warp = nullptr;
thread_local std::barrier<>* block = nullptr;
thread_local int lane = 0;
thread_local long long shuffles = 0;
std::atomic<long long> errors{0};
std::atomic<long long> misaligned{0};
}  // namespace emu

// Every vector load, store and atomic must be aligned to its width on the GPU.
#define DDETR_ASSERT_ALIGNED(ptr, bytes) \
  do { if (reinterpret_cast<uintptr_t>(ptr) % (bytes) != 0) ++emu::misaligned; } while (0)

inline void __syncthreads() { emu::block->arrive_and_wait(); }

#define threadIdx emu::tIdx
#define blockIdx emu::bIdx
#define gridDim emu::gDim

template <typename T>
T __ldg(const T* p) { return *p; }
template <typename T>
T __ldcs(const T* p) { return *p; }
template <typename T>
void __stcs(T* p, T v) { *p = v; }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }

// Every lane of the warp must be here, at its n-th shuffle, with the full mask.
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int offset) {
  emu::Warp& w = *emu::warp;
  const int me = emu::lane;
  if (mask != 0xffffffffu) ++emu::errors;
  ++emu::shuffles;
  w.slot[me] = static_cast<double>(v);
  w.count[me] = emu::shuffles;
  w.bar.arrive_and_wait();
  if (w.exited.load() != 0) ++emu::errors;
  const int src = me ^ offset;
  const T r = static_cast<T>(w.slot[src]);
  if (w.count[src] != emu::shuffles) ++emu::errors;
  w.bar.arrive_and_wait();
  return r;
}

#define DDETR_MSDA_CUDA_NO_LAUNCH 1
#include "msda_cuda.cu"

namespace ddetr {
namespace {

template <typename K, typename A>
void run_grid(K kernel, const A& a, unsigned grid) {
  for (unsigned b = 0; b < grid; ++b) {
    std::vector<emu::Warp> warps(kBlockThreads / 32);
    std::barrier<> block_barrier(kBlockThreads);
    std::vector<std::thread> threads;
    threads.reserve(kBlockThreads);
    for (int t = 0; t < kBlockThreads; ++t) {
      threads.emplace_back([&, t] {
        emu::tIdx = make_uint3(t, 0, 0);
        emu::bIdx = make_uint3(b, 0, 0);
        emu::gDim = dim3(grid, 1, 1);
        emu::warp = &warps[t / 32];
        emu::block = &block_barrier;
        emu::lane = t % 32;
        emu::shuffles = 0;
        kernel(a);
        ++emu::warp->exited;
        emu::warp->bar.arrive_and_drop();
        block_barrier.arrive_and_drop();
      });
    }
    for (auto& th : threads) th.join();
  }
}

template <typename T, typename Kernels, typename A>
void run_planned(const A& a, int vec, unsigned grid) {
  with_kernel<T, Kernels>(vec, [&](auto kernel) { run_grid(kernel, a, grid); });
}

template <typename T>
int forward(const MsdaForwardParams& p, unsigned grid, bool staged, bool head_major) {
  int vec = 1;
  const ForwardArgs<T> a = plan_forward<T>(p, &vec, staged, head_major);
  if (a.staged) {
    run_planned<T, StagedForwardKernels<T>>(a, vec, grid);
  } else {
    run_planned<T, ForwardKernels<T>>(a, vec, grid);
  }
  return vec;
}

template <typename T>
int backward(const MsdaBackwardParams& p, unsigned grid, bool head_major, bool strided) {
  int vec = 1;
  const BackwardArgs<T> a = plan_backward<T>(p, &vec, head_major, strided);
  run_planned<T, BackwardKernels<T>>(a, vec, grid);
  return vec;
}

MsdaShape make_shape(const int64_t* sizes, const int64_t* hw) {
  MsdaShape s;
  s.batch = sizes[0]; s.num_keys = sizes[1]; s.num_heads = sizes[2]; s.channels = sizes[3];
  s.num_queries = sizes[4]; s.num_levels = sizes[5]; s.num_points = sizes[6];
  int64_t start = 0;
  for (int l = 0; l < s.num_levels; ++l) {
    s.level_h[l] = hw[2 * l];
    s.level_w[l] = hw[2 * l + 1];
    s.level_start[l] = start;
    start += hw[2 * l] * hw[2 * l + 1];
  }
  return s;
}

}  // namespace
}  // namespace ddetr

// Both return the vector width the launcher chose, -1 after a warp error, -2
// after a misaligned vector access.
extern "C" int emu_forward(int dtype, const int64_t* sizes, const int64_t* hw, const void* value,
                           const void* loc, const void* attn, void* out, unsigned grid, int staged,
                           int head_major) {
  using namespace ddetr;
  MsdaForwardParams p;
  p.shape = make_shape(sizes, hw);
  p.value = value; p.sampling_loc = loc; p.attn_weight = attn; p.output = out;
  int vec = 0;
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: vec = forward<float>(p, grid, staged != 0, head_major != 0); break;
    case DType::kFloat64: vec = forward<double>(p, grid, staged != 0, head_major != 0); break;
    case DType::kBFloat16: vec = forward<__nv_bfloat16>(p, grid, staged != 0, head_major != 0); break;
    case DType::kFloat16: vec = forward<__half>(p, grid, staged != 0, head_major != 0); break;
  }
  return emu::errors ? -1 : (emu::misaligned ? -2 : vec);
}

extern "C" int emu_backward(int dtype, const int64_t* sizes, const int64_t* hw, const void* value,
                            const void* loc, const void* attn, const void* grad_out, void* grad_value,
                            void* grad_loc, void* grad_attn, unsigned grid, int head_major, int strided) {
  using namespace ddetr;
  MsdaBackwardParams p;
  p.shape = make_shape(sizes, hw);
  p.value = value; p.sampling_loc = loc; p.attn_weight = attn; p.grad_output = grad_out;
  p.grad_value = grad_value; p.grad_loc = grad_loc; p.grad_attn = grad_attn;
  int vec = 0;
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: vec = backward<float>(p, grid, head_major != 0, strided != 0); break;
    case DType::kFloat64: vec = backward<double>(p, grid, head_major != 0, strided != 0); break;
    case DType::kBFloat16: vec = backward<__nv_bfloat16>(p, grid, head_major != 0, strided != 0); break;
    case DType::kFloat16: vec = backward<__half>(p, grid, head_major != 0, strided != 0); break;
  }
  return emu::errors ? -1 : (emu::misaligned ? -2 : vec);
}
"""

_EMU_CHECK = textwrap.dedent(
    """
    import ctypes, json, sys
    import torch
    from ddetr_cli.ops.msda_torch import ms_deform_attn_torch

    lib = ctypes.CDLL(sys.argv[1])
    CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
    TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}

    def i64(xs):
        return (ctypes.c_int64 * len(xs))(*xs)

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr())

    def placed(t, offset):
        # A copy of t whose data starts `offset` elements past a 64-byte boundary.
        flat = torch.empty(t.numel() + offset + 64, dtype=t.dtype)
        skip = ((-flat.data_ptr()) % 64) // t.element_size()
        view = flat[skip + offset: skip + offset + t.numel()].view(t.shape)
        view.copy_(t)
        return view

    def case(dtype, N, Lq, M, D, shapes, P, grid, misalign=0, special=False, seed=0, loc_misalign=0, orders=(0, 1),
             strided=(0,)):
        g = torch.Generator().manual_seed(seed)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        L, S = len(shapes), sum(h * w for h, w in shapes)
        value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64).to(dtype)
        loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
        if special:
            flat = loc.view(-1)
            flat[0], flat[3], flat[5], flat[6], flat[7] = float("nan"), float("inf"), -float("inf"), 5.0, -3.0
        loc = placed(loc.to(acc), loc_misalign)  # an odd offset: no (x, y) pair loads
        attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64).to(acc)
        grad = torch.randn(N, Lq, M, D, generator=g, dtype=torch.float64).to(dtype)
        sizes, hw = i64([N, S, M, D, Lq, L, P]), i64([x for s in shapes for x in s])
        value_k, grad_k = placed(value, misalign), placed(grad, misalign)
        v, l, a = (t.double().requires_grad_() for t in (value, loc, attn))
        ref = ms_deform_attn_torch(v, torch.tensor(shapes), None, l, a)
        ref.backward(grad.double().reshape(ref.shape))

        def check(name, got, want):
            got = got.double().reshape(want.shape)
            assert not torch.isnan(got).any(), f"{name}: not fully written"
            err = (got - want).abs().max().item()
            assert err <= TOL[dtype] * max(1.0, want.abs().max().item()), f"{name}: max error {err}"

        vecs = set()
        # Staged and general forward, backward, in each task order asked for (0 query-major, 1 head-major).
        for head_major in orders:
            for staged in (1, 0):
                out = torch.full((N, Lq, M, D), float("nan"), dtype=dtype)  # every element must be written
                vecs.add(lib.emu_forward(CODES[dtype], sizes, hw, ptr(value_k), ptr(loc), ptr(attn), ptr(out),
                                         ctypes.c_uint(grid), staged, head_major))
                check(f"output (staged={staged}, head_major={head_major})", out, ref.detach())
            # The backward's atomics in the atomic layout, and (strided=1) over each lane's own vector.
            for s_mode in strided:
                gv = placed(torch.zeros(N, S, M, D, dtype=acc), misalign)
                gl = torch.full(loc.shape, float("nan"), dtype=acc)
                ga = torch.full(attn.shape, float("nan"), dtype=acc)
                vec_b = lib.emu_backward(CODES[dtype], sizes, hw, ptr(value_k), ptr(loc), ptr(attn), ptr(grad_k),
                                         ptr(gv), ptr(gl), ptr(ga), ctypes.c_uint(grid), head_major, s_mode)
                assert vec_b != -2, "a vector access was not aligned to its width"
                assert vec_b > 0, "a warp did not shuffle with all 32 lanes"
                for name, got, want in (("grad_value", gv, v.grad), ("grad_attn", ga, a.grad), ("grad_loc", gl, l.grad)):
                    check(f"{name} (head_major={head_major}, strided={s_mode})", got, want)
        assert -2 not in vecs, "a vector access was not aligned to its width"
        assert len(vecs) == 1 and min(vecs) > 0, f"warp errors or differing vector widths: {vecs}"
        return vecs.pop()

    widths = set()
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for D in (1, 2, 3, 8, 30, 32, 71, 136, 264):
            for N, Lq, M in ((1, 3, 1), (2, 5, 3)):
                shapes = [(3, 4), (2, 5)] if D % 2 else [(1, 1), (4, 3), (2, 2)]
                # Head-major only on every third: the order is the same index arithmetic for any dtype and D.
                orders = (0, 1) if D % 3 == 0 else (0,)
                widths.add((str(dtype), case(dtype, N, Lq, M, D, shapes, P=3, grid=1 + D % 3, orders=orders)))
    odd = [(3, 4), (2, 5)]
    case(torch.float32, 3, 7, 5, 4, odd, P=2, grid=1, misalign=1)
    case(torch.float32, 3, 7, 5, 8, odd, P=2, grid=2, misalign=2, special=True, strided=(0, 1))
    case(torch.float16, 3, 7, 5, 16, odd, P=2, grid=2, misalign=4, special=True)
    case(torch.bfloat16, 2, 9, 4, 16, odd, P=2, grid=1, misalign=2, special=True, strided=(0, 1))
    case(torch.float64, 2, 9, 4, 6, odd, P=2, grid=3, misalign=1, special=True, loc_misalign=1, strided=(0, 1))
    case(torch.float32, 2, 5, 3, 24, odd, P=2, grid=1, strided=(0, 1))  # D / 4 = 6 vectors on 8 lanes
    case(torch.float32, 2, 9, 4, 8, odd, P=2, grid=2, special=True, loc_misalign=1)
    case(torch.float32, 1, 40, 8, 32, [(5, 6), (3, 3), (2, 1), (1, 1)], P=4, grid=1, special=True)
    case(torch.float32, 2, 3, 2, 1100, odd, P=2, grid=1, special=True)
    # Staged forward: 20 points per group in staging rounds of 16, 20 grid-stride steps.
    case(torch.float32, 2, 40, 8, 32, [(6, 7), (3, 4), (2, 2), (1, 1)], P=5, grid=1, special=True)
    print(json.dumps(sorted(widths)))
    """
)


def test_cuda_kernels_on_emulated_warps(tmp_path):
    inc = _cuda_include_dir()
    if inc is None:
        pytest.skip("CUDA headers not found next to nvcc")
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    probe = tmp_path / "probe.cpp"
    probe.write_text("#include <barrier>\n#include <atomic>\nint main() { std::barrier<> b{1}; float f = 0;"
                     " std::atomic_ref<float>(f).fetch_add(1.f); b.arrive_and_wait(); return 0; }\n")
    if _run([cxx, "-std=c++20", "-pthread", str(probe), "-o", str(tmp_path / "probe")]).returncode != 0:
        pytest.skip(f"{cxx} lacks C++20 <barrier> / atomic_ref<float>")
    src = tmp_path / "emu.cpp"
    src.write_text(_EMU_CPP)
    lib = tmp_path / "libmsda_emu.so"
    proc = _run([cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w",
                 f"-I{ROOT / 'cpp'}", f"-I{ROOT / 'cpp' / 'include'}", f"-I{inc}", str(src), "-o", str(lib)])
    assert proc.returncode == 0, _explain(proc)
    proc = _run([sys.executable, "-c", _EMU_CHECK, str(lib)], timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, _explain(proc)
    widths = {tuple(w) for w in json.loads(proc.stdout.strip().splitlines()[-1])}
    # Each dtype reached its 16-byte vector path and the scalar path.
    for dtype, widest in (("torch.float32", 4), ("torch.float64", 2), ("torch.float16", 8), ("torch.bfloat16", 8)):
        assert (dtype, widest) in widths and (dtype, 1) in widths, widths
