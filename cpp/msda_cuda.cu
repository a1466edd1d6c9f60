// Multi-scale deformable attention on CUDA.
//
// Same function as cpp/msda_cpu.cpp, same bilinear math (ddetr/bilinear.h).
// Python passes raw pointers and the caller's stream; nothing here links
// libtorch. The CUDA runtime is linked statically, and nothing touches the
// driver until a kernel is launched or cuda_device_count() is called.
//
// Work split (forward and backward): one group of G threads per (n, q, m),
// G a power of two <= 32 (so a group never straddles a warp), the smallest
// one with G >= min(D / VEC, 32). Each thread owns VEC consecutive channels
// (16-byte vectors where D and every pointer allow it: 4 float, 2 double,
// 8 half/bf16; narrower vectors, then scalars, otherwise), and loops over
// further VEC-chunks with stride G when D / VEC > G.
//
// Forward: each thread keeps VEC accumulators in the accumulation type and
// writes its slice of the output once (the output is not zero-filled).
//
// Backward: per point, each thread adds attn * w_c * g to grad_value with
// atomics and forms partial dot products for grad_attn / grad_loc. The
// atomics need not follow the lanes' channel vectors, since attn * w_c is the
// same for the whole group: each lane adds the channels it owns in the
// atomic layout, chunks of kAtomicWidth elements dealt to the lanes in turn
// (float4 / float2 vector atomics on sm_90+ with CUDA 12.1+: the lane's own
// vector; scalar atomics otherwise: lane i adds channels i, i + G, ...), so
// one atomic instruction of a group covers consecutive addresses, the fewest
// L2 sectors, where scalar atomics over each lane's own vector stride by the
// vector's width (4 floats: 4x the sectors). The G partials are
// summed with __shfl_xor_sync butterflies, in which every lane of the warp
// takes part (lanes without channels, or without a live group, add zero), and
// lane 0 of the group writes grad_attn / grad_loc, zero for a point that
// lies outside the map. Every grad_loc / grad_attn element is written once.
//
// Forward, staged path (every thread has one vector of channels, D / VEC <=
// 32, and one batch item's value fits 32-bit offsets: the model's case): the block
// first computes the bilinear taps of a chunk of its groups' points, one point
// per thread rather than once per lane of every group, into shared memory
// (per point: four corner offsets and four weights with the attention weight
// folded in; zero weight and an in-map offset for a corner outside the map),
// then every lane gathers its channels of the four corners with no branch,
// several loads in flight. Otherwise (wide D, huge maps) each lane computes
// the taps itself with int64 offsets (the general path). Two smaller tap
// layouts were measured and dropped: 16 bytes (the lanes form the weights and
// offsets: 65 % more instructions) and weights apart from offsets; neither
// beat the 32-byte taps at their best register budget (H200).
//
// Blocks walk the (n, q, m) groups in a grid-stride loop, so the grid is capped
// and any N, Lq, M works. The walk is over tasks, in one of two orders:
// query-major (task t is group t: heads fastest, the memory order) or
// head-major (task t runs over the queries of one (n, m) fastest, so a block
// works on neighbouring queries of one head). In the encoder neighbouring
// queries are neighbouring pixels whose sampling points overlap: head-major
// raises the staged forward's L1 hit rate (61 to 72 % at the 800x1333 encoder,
// Nsight Compute, H200), which pays in float32 once the forward runs at 75 %
// occupancy, and it speeds up the backward. DDETR_CUDA_ORDER=query|head picks
// one for both kernels (defaults: kDefaultHeadMajorForward / Backward).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "ddetr/bilinear.h"
#include "ddetr/msda.h"

namespace ddetr {
namespace {

constexpr int kBlockThreads = 256;  // multiple of the warp size
constexpr int kWarpSize = 32;
constexpr int kMaxGroup = 32;       // threads per (n, q, m): a power of two <= warp size
constexpr int kBlocksPerSmCap = 32; // grid cap = SMs * this (then grid-stride)
// Backward: at most 128 registers per thread. Without it ptxas squeezes some
// instantiations into 64 registers with small spills (checked with -Xptxas -v).
constexpr int kBackwardMinBlocks = 2;
// Staged forward: 6 blocks per SM, so at most 40 registers per thread (75 %
// occupancy; float32 spills nothing, bfloat16 8 bytes) where ptxas alone takes
// 64 (50 %). Kernel time at the
// 800x1333 batch-2 encoder (H200): float32 211 -> 203 us, bfloat16 177 -> 165;
// 8 blocks (32 registers) spills and is slower (266, 326). float64, whose taps
// take 1.5x the shared memory, keeps 4 (64 registers), what ptxas chose when
// both paths were one kernel.
template <typename T>
constexpr int kStagedMinBlocks = sizeof(T) == 8 ? 4 : 6;

// ------------------------------------------------------------- element types

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_of<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Hook for the host emulation test (tests/test_cuda_build.py), which checks
// that every vector access is aligned to its width; nothing on the GPU.
#ifndef DDETR_ASSERT_ALIGNED
#define DDETR_ASSERT_ALIGNED(ptr, bytes) ((void)0)
#endif

// Plain integer type of a vector of `kBytes` bytes: the load / store is one
// instruction of that width (the caller guarantees the alignment).
template <int kBytes>
struct RawVec;
template <>
struct RawVec<16> {
  using type = uint4;
};
template <>
struct RawVec<8> {
  using type = uint2;
};
template <>
struct RawVec<4> {
  using type = unsigned int;
};
template <>
struct RawVec<2> {
  using type = unsigned short;
};

// Loads VEC elements (read-only path) and widens them to the accumulation type.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, acc_of<T> (&out)[VEC]) {
  using Raw = typename RawVec<static_cast<int>(sizeof(T)) * VEC>::type;
  DDETR_ASSERT_ALIGNED(p, sizeof(Raw));
  const Raw raw = __ldg(reinterpret_cast<const Raw*>(p));
  T v[VEC];
  memcpy(v, &raw, sizeof(Raw));
DDETR_UNROLL
  for (int k = 0; k < VEC; ++k) out[k] = to_acc(v[k]);
}

// Narrows VEC accumulators to T and stores them in one instruction, with an
// evict-first hint: the output is streamed out, and the L2 is better kept for
// the value rows that the gathers reuse (at the 800x1333 encoder shape the
// staged forward's DRAM traffic was 2.5x the bytes it must move).
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const acc_of<T> (&in)[VEC]) {
  using Raw = typename RawVec<static_cast<int>(sizeof(T)) * VEC>::type;
  T v[VEC];
DDETR_UNROLL
  for (int k = 0; k < VEC; ++k) v[k] = from_acc<T>(in[k]);
  Raw raw;
  memcpy(&raw, v, sizeof(Raw));
  DDETR_ASSERT_ALIGNED(p, sizeof(Raw));
  __stcs(reinterpret_cast<Raw*>(p), raw);  // written once, never read here: evict first
}

// grad_value[p .. p + VEC) += v. float4 / float2 atomics exist on sm_90+ only,
// and only from CUDA 12.1 (global memory, 16 / 8-byte aligned: `vec_ok` says
// the base pointer is); older toolkits and GPUs take the scalar atomics.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(CUDART_VERSION) && (CUDART_VERSION >= 12010)
#define DDETR_HAVE_VECTOR_ATOMICS 1
#endif
template <int VEC>
__device__ __forceinline__ void atomic_add_vec(float* p, const float (&v)[VEC], bool vec_ok) {
#if defined(DDETR_HAVE_VECTOR_ATOMICS)
  if (vec_ok) {
    if constexpr (VEC % 4 == 0) {
DDETR_UNROLL
      for (int k = 0; k < VEC; k += 4) {
        DDETR_ASSERT_ALIGNED(p + k, sizeof(float4));
        atomicAdd(reinterpret_cast<float4*>(p + k), make_float4(v[k], v[k + 1], v[k + 2], v[k + 3]));
      }
      return;
    } else if constexpr (VEC % 2 == 0) {
DDETR_UNROLL
      for (int k = 0; k < VEC; k += 2) atomicAdd(reinterpret_cast<float2*>(p + k), make_float2(v[k], v[k + 1]));
      return;
    }
  }
#else
  (void)vec_ok;
#endif
DDETR_UNROLL
  for (int k = 0; k < VEC; ++k) atomicAdd(p + k, v[k]);
}

template <int VEC>
__device__ __forceinline__ void atomic_add_vec(double* p, const double (&v)[VEC], bool /*vec_ok*/) {
DDETR_UNROLL
  for (int k = 0; k < VEC; ++k) atomicAdd(p + k, v[k]);  // native on sm_60+
}

// Elements per atomic in the backward's atomic layout (see the top of this
// file): the lane's whole vector where one vector atomic adds it, else 1.
// Measured with compute_80 code JIT-compiled on an H200 (kernel time of
// forward + backward, 800x1333 batch-2 encoder, float32): 1947 us in this
// layout against 3987 us with scalar atomics over each lane's own vector
// (DDETR_CUDA_ATOMICS=strided), 2931 against 5261 us at 8,100 decoder queries,
// batch 8; the sm_90 build's float4 atomics: 1271 us. The layout takes 110
// registers there; a 3-block budget (85) was slower (2007 us).
#if defined(DDETR_HAVE_VECTOR_ATOMICS)
template <typename acc_t, int VEC>
constexpr int kAtomicWidth = std::is_same_v<acc_t, float> && VEC <= 4 ? VEC : 1;
#else
template <typename acc_t, int VEC>
constexpr int kAtomicWidth = 1;
#endif

// -------------------------------------------------------------------- kernels

template <typename T>
struct ForwardArgs {
  MsdaShape shape;
  const T* value;
  const acc_of<T>* loc;
  const acc_of<T>* attn;
  T* out;
  int64_t num_groups;  // N * Lq * M
  int64_t num_vec;     // D / VEC
  int log2_group;      // G = 1 << log2_group threads per (n, q, m)
  bool staged;         // the staged path applies (see the top of this file)
  bool head_major;     // task order (see the top of this file)
  bool loc_pairs;      // loc is aligned for (x, y) pair loads
};

template <typename T>
struct BackwardArgs {
  MsdaShape shape;
  const T* value;
  const acc_of<T>* loc;
  const acc_of<T>* attn;
  const T* grad_out;
  acc_of<T>* grad_value;  // nullptr: grad_value is not wanted (deterministic mode adds it up elsewhere)
  acc_of<T>* grad_loc;
  acc_of<T>* grad_attn;
  int64_t num_groups;
  int64_t num_vec;
  int log2_group;
  bool vec_atomics;  // grad_value is aligned for the vector atomics
  bool strided_atomics;  // developer switch: scalar atomics over each lane's own vector (the old layout)
  bool head_major;   // task order (see the top of this file)
  bool loc_pairs;    // loc is aligned for (x, y) pair loads
};

// The (n, q, m) group that task t works on (see the top of this file).
__device__ __forceinline__ int64_t group_of_task(int64_t t, bool head_major, int64_t Lq, int64_t M) {
  if (!head_major) return t;
  const int64_t nm = t / Lq, q = t - nm * Lq;  // nm = n * M + m
  const int64_t n = nm / M, m = nm - n * M;
  return (n * Lq + q) * M + m;
}

// One sampling location (x, y): a single 8-byte (16 for double) load where the
// pointer is aligned for it. kStream: read once, evict first.
template <typename acc_t>
struct PairOf;
template <>
struct PairOf<float> {
  using type = float2;
};
template <>
struct PairOf<double> {
  using type = double2;
};
template <bool kStream, typename acc_t>
__device__ __forceinline__ void load_xy(const acc_t* p, bool paired, acc_t& x, acc_t& y) {
  using Pair = typename PairOf<acc_t>::type;
  if (paired) {
    DDETR_ASSERT_ALIGNED(p, sizeof(Pair));
    const Pair xy = kStream ? __ldcs(reinterpret_cast<const Pair*>(p)) : __ldg(reinterpret_cast<const Pair*>(p));
    x = xy.x;
    y = xy.y;
  } else {
    x = kStream ? __ldcs(p) : __ldg(p);
    y = kStream ? __ldcs(p + 1) : __ldg(p + 1);
  }
}

// One staged point, ready to gather: the element offsets of its four corners
// from the head's value[n, 0, m, 0] (32-bit) and their bilinear weights times
// the attention weight. A corner outside the map gets weight 0 and the offset
// of a corner inside it, so every gather is in bounds and none branches; a
// point that contributes nothing gets weight 0 and offset 0 throughout.
template <typename acc_t>
struct StagedTap {
  int32_t offset[4];
  acc_t weight[4];
};

template <typename acc_t>
__device__ __forceinline__ StagedTap<acc_t> staged_tap(bool valid, const BilinearCell<acc_t>& c, acc_t aw,
                                                       int32_t level_first, int32_t W, int32_t row_stride) {
  StagedTap<acc_t> t;
  corner_weights(c.lx, c.ly, valid && c.in_x0, valid && c.in_x1, valid && c.in_y0, valid && c.in_y1, aw, t.weight);
  // The first corner inside the map, then one pixel right and one row down
  // where that column and row are inside too (else the same pixel again).
  const int32_t xb = static_cast<int32_t>(c.in_x0 ? c.x0 : c.x0 + 1);
  const int32_t yb = static_cast<int32_t>(c.in_y0 ? c.y0 : c.y0 + 1);
  const int32_t first = valid ? (level_first + yb * W + xb) * row_stride : 0;
  const int32_t dx = valid && c.in_x0 && c.in_x1 ? row_stride : 0;
  const int32_t dy = valid && c.in_y0 && c.in_y1 ? W * row_stride : 0;
  t.offset[0] = first;
  t.offset[1] = first + dx;
  t.offset[2] = first + dy;
  t.offset[3] = first + dy + dx;
  return t;
}

// Taps staged per block and chunk: kStagedPerThread per thread. They are kept
// [group][point], each group's row padded by one tap: the thread that stages a
// tap reads its group's locations and weights at consecutive addresses (one
// coalesced load per warp, where a [point][group] order made each thread's
// load a separate cache line), and the groups of a warp that read their taps
// for one point hit different banks.
constexpr int kStagedPerThread = 2;
constexpr int kStagedSlots = kStagedPerThread * kBlockThreads + kBlockThreads;  // + one pad per group (G >= 1)

template <typename T, int VEC>
__device__ __forceinline__ void forward_staged(const ForwardArgs<T>& a) {
  using acc_t = acc_of<T>;
  __shared__ StagedTap<acc_t> taps[kStagedSlots];  // [group in block][point in chunk + 1 pad]
  __shared__ int64_t group_ids[kBlockThreads];     // the block's groups, -1 past the end
  const MsdaShape& s = a.shape;
  const int64_t S = s.num_keys, M = s.num_heads, D = s.channels, Lq = s.num_queries;
  const int P = static_cast<int>(s.num_points), LP = static_cast<int>(s.num_levels) * P;
  const int32_t row_stride = static_cast<int32_t>(M * D);
  const int G = 1 << a.log2_group;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int groups_per_block = kBlockThreads >> a.log2_group;
  static_assert(kStagedPerThread == 2, "the staging below divides by chunk = 2 G with a shift");
  const int chunk = kStagedPerThread << a.log2_group;  // points per staging round (2 G)
  const int tap_row = chunk + 1;                       // taps per group in shared memory
  const int my_group = static_cast<int>(threadIdx.x) >> a.log2_group;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * groups_per_block;

  // Every loop bound below is uniform across the block, so all threads reach each barrier.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * groups_per_block; base < a.num_groups; base += grid_stride) {
    // The previous round's last barrier is behind every thread: nobody reads the old ids any more.
    if (static_cast<int>(threadIdx.x) < groups_per_block) {
      const int64_t t = base + threadIdx.x;
      group_ids[threadIdx.x] = t < a.num_groups ? group_of_task(t, a.head_major, Lq, M) : -1;
    }
    __syncthreads();
    const int64_t gid = group_ids[my_group];
    const bool active = gid >= 0 && lane < a.num_vec;
    const int64_t g0 = gid < 0 ? 0 : gid;
    const int64_t m = g0 % M;
    const int64_t n = g0 / (Lq * M);
    const T* head = a.value + (n * S * M + m) * D + static_cast<int64_t>(lane) * VEC;  // value[n, 0, m, lane * VEC]
    acc_t acc[VEC];
DDETR_UNROLL
    for (int k = 0; k < VEC; ++k) acc[k] = static_cast<acc_t>(0);

    for (int p0 = 0; p0 < LP; p0 += chunk) {
DDETR_UNROLL
      for (int r = 0; r < kStagedPerThread; ++r) {
        const int e = static_cast<int>(threadIdx.x) + r * kBlockThreads;
        const int g = e >> (a.log2_group + 1), j = e & (chunk - 1);  // consecutive threads: consecutive points of a group
        const int pt = p0 + j;
        const int64_t sgid = group_ids[g];
        const int l = pt < LP ? pt / P : 0;
        const int32_t W = static_cast<int32_t>(s.level_w[l]);
        BilinearCell<acc_t> cell{};  // all zero: what an invalid point stages
        bool valid = false;
        acc_t aw = static_cast<acc_t>(0);
        if (sgid >= 0 && pt < LP) {
          acc_t x, y;
          // Locations and weights are read once: streaming loads leave the L2 to the value.
          load_xy<true>(a.loc + (sgid * LP + pt) * 2, a.loc_pairs, x, y);
          valid = bilinear_cell<acc_t>(x, y, s.level_h[l], W, cell);
          if (valid) aw = __ldcs(a.attn + sgid * LP + pt);
        }
        taps[g * tap_row + j] = staged_tap(valid, cell, aw, static_cast<int32_t>(s.level_start[l]), W, row_stride);
      }
      __syncthreads();
      const int points = chunk < LP - p0 ? chunk : LP - p0;
      if (active) {
#pragma unroll 4
        for (int j = 0; j < points; ++j) {
          const StagedTap<acc_t> tap = taps[my_group * tap_row + j];
          acc_t val[4][VEC];
DDETR_UNROLL
          for (int c = 0; c < 4; ++c) load_vec<T, VEC>(head + tap.offset[c], val[c]);
DDETR_UNROLL
          for (int c = 0; c < 4; ++c) {
DDETR_UNROLL
            for (int k = 0; k < VEC; ++k) acc[k] += tap.weight[c] * val[c][k];
          }
        }
      }
      __syncthreads();
    }
    if (active) store_vec<T, VEC>(a.out + gid * D + static_cast<int64_t>(lane) * VEC, acc);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void forward_general(const ForwardArgs<T>& a) {
  using acc_t = acc_of<T>;
  const MsdaShape& s = a.shape;
  const int64_t S = s.num_keys, M = s.num_heads, D = s.channels, Lq = s.num_queries;
  const int64_t L = s.num_levels, P = s.num_points, LP = L * P;
  const int64_t row_stride = M * D;  // elements between consecutive pixels of one head
  const int G = 1 << a.log2_group;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t groups_per_block = kBlockThreads >> a.log2_group;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * groups_per_block;

  for (int64_t task = static_cast<int64_t>(blockIdx.x) * groups_per_block + (threadIdx.x >> a.log2_group);
       task < a.num_groups; task += grid_stride) {
    const int64_t gid = group_of_task(task, a.head_major, Lq, M);
    const int64_t m = gid % M;
    const int64_t n = gid / (Lq * M);
    const T* head = a.value + (n * S * M + m) * D;  // value[n, 0, m, 0]
    const acc_t* loc = a.loc + gid * LP * 2;
    const acc_t* attn = a.attn + gid * LP;
    for (int64_t v = lane; v < a.num_vec; v += G) {
      const int64_t ch = v * VEC;
      acc_t acc[VEC];
DDETR_UNROLL
      for (int k = 0; k < VEC; ++k) acc[k] = static_cast<acc_t>(0);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t H = s.level_h[l], W = s.level_w[l];
        const T* level = head + s.level_start[l] * row_stride + ch;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t pt = l * P + p;
          acc_t x, y;
          load_xy<false>(loc + 2 * pt, a.loc_pairs, x, y);
          BilinearTaps<acc_t> t;
          if (!bilinear_taps<acc_t>(x, y, H, W, t)) continue;
          const acc_t aw = __ldg(attn + pt);
DDETR_UNROLL
          for (int c = 0; c < 4; ++c) {
            if (!((t.inside >> c) & 1u)) continue;
            acc_t val[VEC];
            load_vec<T, VEC>(level + t.index[c] * row_stride, val);
            const acc_t wc = aw * t.weight[c];
DDETR_UNROLL
            for (int k = 0; k < VEC; ++k) acc[k] += wc * val[k];
          }
        }
      }
      store_vec<T, VEC>(a.out + gid * D + ch, acc);
    }
  }
}

// __grid_constant__: the level tables are indexed at run time straight from
// the parameter space, without a local-memory copy of the struct. The two
// forward paths are separate kernels, so that each gets its own register
// budget.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlockThreads) msda_forward_kernel(const __grid_constant__ ForwardArgs<T> a) {
  forward_general<T, VEC>(a);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlockThreads, kStagedMinBlocks<T>)
    msda_staged_forward_kernel(const __grid_constant__ ForwardArgs<T> a) {
  forward_staged<T, VEC>(a);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlockThreads, kBackwardMinBlocks) msda_backward_kernel(const __grid_constant__ BackwardArgs<T> a) {
  using acc_t = acc_of<T>;
  // The atomic layout (see the top of this file): kChunks chunks of A elements per lane.
  constexpr int A = kAtomicWidth<acc_t, VEC>;
  constexpr int kChunks = VEC / A;
  const MsdaShape& s = a.shape;
  const int64_t S = s.num_keys, M = s.num_heads, D = s.channels, Lq = s.num_queries;
  const int64_t L = s.num_levels, P = s.num_points, LP = L * P;
  const int64_t row_stride = M * D;
  const int G = 1 << a.log2_group;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t groups_per_block = kBlockThreads >> a.log2_group;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * groups_per_block;
  const int64_t my_group = threadIdx.x >> a.log2_group;                       // within the block
  const int64_t warp_first_group = (threadIdx.x & ~(kWarpSize - 1)) >> a.log2_group;
  const bool single_chunk = a.num_vec <= G;  // then grad_output is loaded once per (n, q, m)
  // The lane's own layout when one atomic adds its vector (or the switch asks for it).
  const bool own_layout = A == VEC || a.strided_atomics;

  // Every loop bound below is uniform across the warp (base is uniform across
  // the block), so all 32 lanes reach each __shfl_xor_sync together.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * groups_per_block; base < a.num_groups;
       base += grid_stride) {
    if (base + warp_first_group >= a.num_groups) break;  // the whole warp is past the end (warp-uniform)
    const int64_t task = base + my_group;
    const bool active = task < a.num_groups;  // lanes of a partly filled last warp still shuffle (adding 0)
    const int64_t gid = active ? group_of_task(task, a.head_major, Lq, M) : 0;
    const int64_t m = gid % M;
    const int64_t n = gid / (Lq * M);
    const int64_t head_off = (n * S * M + m) * D;  // value / grad_value [n, 0, m, 0]
    const T* go = a.grad_out + gid * D;
    const acc_t* loc = a.loc + gid * LP * 2;
    const acc_t* attn = a.attn + gid * LP;

    // grad_output of the group's span of G vectors from vector `span` on:
    // g in the lane's own layout (for the dot products), g_at in the atomic
    // layout (channel span * VEC + (c * G + lane) * A + j holds g_at[c * A + j]).
    acc_t g[VEC], g_at[VEC];
    // First channel of chunk c of the lane in the atomic layout (D is a
    // multiple of VEC: a chunk is all in or all out).
    auto atomic_channel = [&](int64_t span, int c) { return span * VEC + static_cast<int64_t>(c * G + lane) * A; };
    auto load_grad_out = [&](int64_t span) {
DDETR_UNROLL
      for (int k = 0; k < VEC; ++k) g[k] = g_at[k] = static_cast<acc_t>(0);
      if (span + lane < a.num_vec) load_vec<T, VEC>(go + (span + lane) * VEC, g);
      if constexpr (A < VEC) {
        if (own_layout) return;
DDETR_UNROLL
        for (int c = 0; c < kChunks; ++c) {
          const int64_t ch = atomic_channel(span, c);
          if (ch >= D) continue;
          acc_t part[A];
          load_vec<T, A>(go + ch, part);
DDETR_UNROLL
          for (int j = 0; j < A; ++j) g_at[c * A + j] = part[j];
        }
      }
    };
    if (active && single_chunk) load_grad_out(0);

    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = s.level_h[l], W = s.level_w[l];
      const int64_t level_off = head_off + s.level_start[l] * row_stride;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t pt = l * P + p;
        acc_t ga = 0, gx = 0, gy = 0, aw = 0;
        bool valid = false;
        if (active) {
          acc_t x, y;
          load_xy<false>(loc + 2 * pt, a.loc_pairs, x, y);
          BilinearTaps<acc_t> t;
          valid = bilinear_taps<acc_t>(x, y, H, W, t);
          if (valid) {
            aw = __ldg(attn + pt);
            for (int64_t span = 0; span < a.num_vec; span += G) {  // uniform across the group
              if (!single_chunk) load_grad_out(span);
              const int64_t ch = (span + lane) * VEC;
              const bool has_vec = span + lane < a.num_vec;
DDETR_UNROLL
              for (int c = 0; c < 4; ++c) {
                if (!((t.inside >> c) & 1u)) continue;
                const int64_t pixel = level_off + t.index[c] * row_stride;  // [n, pixel, m, 0]
                const acc_t aw_c = aw * t.weight[c];
                acc_t dot = 0;
                if (has_vec) {
                  acc_t val[VEC];
                  load_vec<T, VEC>(a.value + pixel + ch, val);
DDETR_UNROLL
                  for (int k = 0; k < VEC; ++k) dot += g[k] * val[k];
                }
                if (a.grad_value != nullptr) {
                  acc_t gv[VEC];
DDETR_UNROLL
                  for (int k = 0; k < VEC; ++k) gv[k] = aw_c * (own_layout ? g[k] : g_at[k]);
                  if (own_layout) {
                    if (has_vec) atomic_add_vec<VEC>(a.grad_value + pixel + ch, gv, a.vec_atomics);
                  } else if constexpr (A < VEC) {
DDETR_UNROLL
                    for (int c2 = 0; c2 < kChunks; ++c2) {
                      const int64_t ch_at = atomic_channel(span, c2);
                      if (ch_at >= D) continue;
                      acc_t part[A];
DDETR_UNROLL
                      for (int j = 0; j < A; ++j) part[j] = gv[c2 * A + j];
                      atomic_add_vec<A>(a.grad_value + pixel + ch_at, part, a.vec_atomics);
                    }
                  }
                }
                ga += t.weight[c] * dot;
                gx += t.dweight_dx[c] * dot;
                gy += t.dweight_dy[c] * dot;
              }
            }
          }
        }
        // Butterfly over the G lanes of the group: afterwards every lane holds
        // the group's sums. Offsets < G keep the exchange inside the group.
        for (int offset = G >> 1; offset > 0; offset >>= 1) {
          ga += __shfl_xor_sync(0xffffffffu, ga, offset);
          gx += __shfl_xor_sync(0xffffffffu, gx, offset);
          gy += __shfl_xor_sync(0xffffffffu, gy, offset);
        }
        if (active && lane == 0) {
          const int64_t e = gid * LP + pt;
          a.grad_attn[e] = valid ? ga : static_cast<acc_t>(0);
          a.grad_loc[2 * e] = valid ? static_cast<acc_t>(W) * aw * gx : static_cast<acc_t>(0);
          a.grad_loc[2 * e + 1] = valid ? static_cast<acc_t>(H) * aw * gy : static_cast<acc_t>(0);
        }
      }
    }
  }
}

// ------------------------------------------------------------------ launchers

// Widest vector (elements of T, at most 16 bytes) that divides D and to which
// every pointer is aligned.
template <typename T>
int pick_vec(int64_t D, std::initializer_list<const void*> ptrs) {
  int vec = 16 / static_cast<int>(sizeof(T));
  for (; vec > 1; vec >>= 1) {
    bool ok = D % vec == 0;
    for (const void* ptr : ptrs) ok = ok && reinterpret_cast<uintptr_t>(ptr) % (vec * sizeof(T)) == 0;
    if (ok) break;
  }
  return vec;
}

// Smallest power of two >= min(num_vec, kMaxGroup).
int log2_group_for(int64_t num_vec) {
  int lg = 0;
  while ((1 << lg) < kMaxGroup && (1 << lg) < num_vec) ++lg;
  return lg;
}

// Kernel arguments and vector width (pure host code, no CUDA calls).
// The staged forward runs wherever it can: timed alone (CUDA graphs, H200) it
// beat the general path at every size measured, from the decoder's 2,400
// groups (6.4 against 18.6 us) to the encoder's 355k (188 against 421 us).
// Task orders, measured the same way (scripts/bench_cuda_variants.py): with
// the staged forward's 6-block budget, head-major is the faster forward order
// in float32 (encoder 800x1333 batch 2: 188 against 203 us; 235 against 278 us
// with scattered points; 347 against 433 us at 8,100 decoder queries, batch
// 8) and query-major in 16-bit types (165 against 172 us); the backward is as
// fast or faster head-major (2-4 % at the encoder, 15 % at 8,100 random
// queries). float64 keeps the orders it was tested with.
template <typename T>
constexpr bool kDefaultHeadMajorForward = std::is_same_v<T, float>;
constexpr bool kDefaultHeadMajorBackward = true;

template <typename acc_t>
bool pairs_aligned(const void* loc) {
  return reinterpret_cast<uintptr_t>(loc) % (2 * sizeof(acc_t)) == 0;
}

template <typename T>
ForwardArgs<T> plan_forward(const MsdaForwardParams& p, int* vec_out, bool allow_staged = true,
                            bool head_major = kDefaultHeadMajorForward<T>) {
  const MsdaShape& s = p.shape;
  ForwardArgs<T> a;
  a.shape = s;
  a.value = static_cast<const T*>(p.value);
  a.loc = static_cast<const acc_of<T>*>(p.sampling_loc);
  a.attn = static_cast<const acc_of<T>*>(p.attn_weight);
  a.out = static_cast<T*>(p.output);
  a.num_groups = s.batch * s.num_queries * s.num_heads;
  const int vec = pick_vec<T>(s.channels, {p.value, p.output});
  a.num_vec = s.channels / vec;
  a.log2_group = log2_group_for(a.num_vec);
  // Staged: one vector per lane, and every offset inside one batch item's value
  // (S * M * D elements) fits int32.
  a.staged = allow_staged && a.num_vec <= kMaxGroup && s.num_keys * s.num_heads * s.channels <= INT32_MAX &&
             s.num_levels * s.num_points <= INT32_MAX;
  a.head_major = head_major;
  a.loc_pairs = pairs_aligned<acc_of<T>>(p.sampling_loc);
  *vec_out = vec;
  return a;
}

template <typename T>
BackwardArgs<T> plan_backward(const MsdaBackwardParams& p, int* vec_out, bool head_major = kDefaultHeadMajorBackward,
                              bool strided_atomics = false) {
  const MsdaShape& s = p.shape;
  BackwardArgs<T> a;
  a.shape = s;
  a.value = static_cast<const T*>(p.value);
  a.loc = static_cast<const acc_of<T>*>(p.sampling_loc);
  a.attn = static_cast<const acc_of<T>*>(p.attn_weight);
  a.grad_out = static_cast<const T*>(p.grad_output);
  a.grad_value = static_cast<acc_of<T>*>(p.grad_value);
  a.grad_loc = static_cast<acc_of<T>*>(p.grad_loc);
  a.grad_attn = static_cast<acc_of<T>*>(p.grad_attn);
  a.num_groups = s.batch * s.num_queries * s.num_heads;
  // At most 16 bytes of accumulators per lane (4 floats): a lane's atomics into
  // grad_value then stay one vector wide, and 16-bit types spread over as many
  // lanes as float32 does instead of doing twice the work per lane.
  const int vec = std::min(pick_vec<T>(s.channels, {p.value, p.grad_output}), 16 / static_cast<int>(sizeof(acc_of<T>)));
  a.num_vec = s.channels / vec;
  a.log2_group = log2_group_for(a.num_vec);
  // The vector atomics add min(vec, 4) floats at element offsets that are
  // multiples of that width, so the base pointer must be aligned to it.
  const size_t atomic_bytes = static_cast<size_t>(std::min(vec, 4)) * sizeof(acc_of<T>);
  a.vec_atomics = reinterpret_cast<uintptr_t>(p.grad_value) % atomic_bytes == 0;
  a.strided_atomics = strided_atomics;
  a.head_major = head_major;
  a.loc_pairs = pairs_aligned<acc_of<T>>(p.sampling_loc);
  *vec_out = vec;
  return a;
}

// The kernel families, by vector width, for with_kernel.
template <typename T>
struct ForwardKernels {
  template <int VEC>
  static constexpr auto get() { return &msda_forward_kernel<T, VEC>; }
  static constexpr const char* name = "msda_forward_kernel";
};
template <typename T>
struct StagedForwardKernels {
  template <int VEC>
  static constexpr auto get() { return &msda_staged_forward_kernel<T, VEC>; }
  static constexpr const char* name = "msda_staged_forward_kernel";
};
template <typename T>
struct BackwardKernels {
  template <int VEC>
  static constexpr auto get() { return &msda_backward_kernel<T, VEC>; }
  static constexpr const char* name = "msda_backward_kernel";
};

// The one switch over vector widths: calls run(Kernels::get<vec>()), the
// kernel of the planned width (the launcher below, and the host emulation).
template <typename T, typename Kernels, typename Run>
void with_kernel(int vec, Run&& run) {
  switch (vec) {
    case 8:
      if constexpr (sizeof(T) <= 2) return run(Kernels::template get<8>());
      break;
    case 4:
      if constexpr (sizeof(T) <= 4) return run(Kernels::template get<4>());
      break;
    case 2: return run(Kernels::template get<2>());
    case 1: return run(Kernels::template get<1>());
    default: break;
  }
  throw std::logic_error(std::string("ddetr CUDA: ") + Kernels::name + ": no kernel for vector width " + std::to_string(vec));
}

// A host-only test harness (tests/test_cuda_build.py) compiles everything
// above with DDETR_MSDA_CUDA_NO_LAUNCH defined and runs the kernels on emulated
// warps; what follows talks to the CUDA runtime.
#ifndef DDETR_MSDA_CUDA_NO_LAUNCH

// ---------------------------------------------------------------- host errors

void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("ddetr CUDA: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

#define DDETR_CUDA_CHECK(call) cuda_check((call), #call)

// Makes `device` current for the scope and restores the previous device.
// The Python entry point makes the tensors' device current before it calls in
// (through torch, which knows whether a device already has a context), so from
// there this guard finds the device current and switches nothing; it matters
// only for direct callers of the module.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    DDETR_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) {
      DDETR_CUDA_CHECK(cudaSetDevice(device));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    // Never throws from a destructor, and never leaves a failed restore pending
    // for the caller's next cudaGetLastError().
    if (switched_ && cudaSetDevice(prev_) != cudaSuccess) (void)cudaGetLastError();
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

unsigned grid_for(int64_t num_groups, int log2_group, int device) {
  int sms = 0;
  DDETR_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t groups_per_block = kBlockThreads >> log2_group;
  const int64_t blocks = (num_groups + groups_per_block - 1) / groups_per_block;
  const int64_t cap = static_cast<int64_t>(std::max(sms, 1)) * kBlocksPerSmCap;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, cap)));
}

template <typename Args, typename K>
void launch(K kernel, const Args& a, unsigned grid, cudaStream_t stream, const char* name) {
  kernel<<<grid, kBlockThreads, 0, stream>>>(a);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) cuda_check(err, (std::string("launch of ") + name).c_str());
}

// Launches the planned width's kernel of the family (with_kernel) with the
// planned arguments on the caller's device and stream.
template <typename T, typename Kernels, typename Args>
void launch_planned(const Args& a, int vec, int device, void* stream) {
  DeviceGuard guard(device);
  const unsigned grid = grid_for(a.num_groups, a.log2_group, device);
  const auto s = static_cast<cudaStream_t>(stream);
  with_kernel<T, Kernels>(vec, [&](auto kernel) { launch(kernel, a, grid, s, Kernels::name); });
}

// Developer switches, read at every call, to compare the variants on one GPU
// (scripts/bench_cuda_variants.py): DDETR_CUDA_FORWARD=general forces the
// general forward path (staged, the default, runs where it can: one vector
// per lane, 32-bit offsets), DDETR_CUDA_ORDER=query|head the task order of
// both kernels, DDETR_CUDA_ATOMICS=strided the backward's scalar atomics over
// each lane's own vector instead of the atomic layout. Unset or "auto": the
// defaults. Returns the index of the value in `choices`, -1 for the default.
int env_choice(const char* name, std::initializer_list<const char*> choices) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return -1;
  int i = 0;
  std::string names;
  for (const char* c : choices) {
    if (std::strcmp(v, c) == 0) return i;
    names += std::string(c) + ", ";
    ++i;
  }
  throw std::invalid_argument(std::string("ddetr CUDA: ") + name + " must be " + names + "or auto, not '" + v + "'");
}

bool head_major_order(bool by_default) {
  const int order = env_choice("DDETR_CUDA_ORDER", {"query", "head"});
  return order < 0 ? by_default : order == 1;
}

template <typename T>
void forward_typed(const MsdaForwardParams& p) {
  const int path = env_choice("DDETR_CUDA_FORWARD", {"staged", "general"});
  int vec = 1;
  const ForwardArgs<T> a = plan_forward<T>(p, &vec, path != 1, head_major_order(kDefaultHeadMajorForward<T>));
  if (a.num_groups == 0 || p.shape.channels == 0) return;
  if (a.staged) return launch_planned<T, StagedForwardKernels<T>>(a, vec, p.device, p.stream);
  launch_planned<T, ForwardKernels<T>>(a, vec, p.device, p.stream);
}

template <typename T>
void backward_typed(const MsdaBackwardParams& p) {
  int vec = 1;
  const bool strided = env_choice("DDETR_CUDA_ATOMICS", {"layout", "strided"}) == 1;
  const BackwardArgs<T> a = plan_backward<T>(p, &vec, head_major_order(kDefaultHeadMajorBackward), strided);
  if (a.num_groups == 0 || p.shape.channels == 0) return;
  launch_planned<T, BackwardKernels<T>>(a, vec, p.device, p.stream);
}

#endif  // DDETR_MSDA_CUDA_NO_LAUNCH
}  // namespace

#ifndef DDETR_MSDA_CUDA_NO_LAUNCH
// The one dtype dispatch: float32, float64, bfloat16, float16.
void msda_forward_cuda(const MsdaForwardParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return forward_typed<float>(p);
    case DType::kFloat64: return forward_typed<double>(p);
    case DType::kBFloat16: return forward_typed<__nv_bfloat16>(p);
    case DType::kFloat16: return forward_typed<__half>(p);
  }
  throw std::invalid_argument("ddetr CUDA: msda forward: unsupported dtype " + std::to_string(static_cast<int>(p.dtype)));
}

void msda_backward_cuda(const MsdaBackwardParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return backward_typed<float>(p);
    case DType::kFloat64: return backward_typed<double>(p);
    case DType::kBFloat16: return backward_typed<__nv_bfloat16>(p);
    case DType::kFloat16: return backward_typed<__half>(p);
  }
  throw std::invalid_argument("ddetr CUDA: msda backward: unsupported dtype " + std::to_string(static_cast<int>(p.dtype)));
}

// 0 when there is no driver or no device: a CPU-only machine imports and runs
// the module. The failed query's error is cleared so it does not leak into a
// later cudaGetLastError(); cuda_unavailable_reason() keeps its text.
int cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

std::string cuda_unavailable_reason() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess) return count > 0 ? std::string() : std::string("no CUDA device is visible");
  (void)cudaGetLastError();
  int runtime = 0, driver = 0;
  (void)cudaRuntimeGetVersion(&runtime);
  (void)cudaDriverGetVersion(&driver);
  std::string why = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice || err == cudaErrorSystemDriverMismatch) {
    const auto ver = [](int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); };
    why += " (ddetr's kernels were built with CUDA " + ver(runtime) + "; the driver " +
           (driver > 0 ? "supports CUDA " + ver(driver) : std::string("was not found")) + ")";
  }
  return why;
}
#endif  // DDETR_MSDA_CUDA_NO_LAUNCH

}  // namespace ddetr
