// Multi-scale deformable attention on the CPU (OpenMP).
//
// Compiled once per instruction set (DDETR_CPU_ISA names the namespace); the
// dispatcher in cpu_dispatch.cpp picks one at run time.
//
// Forward: parallel over (batch, query) rows; per head, one accumulator of D
// channels in the accumulation type; each point's corner indices and bilinear
// weights are computed once, with the attention weight folded in; the inner
// loops run over contiguous channels (value is channel-last) and vectorise.
//
// Backward: parallel over (batch, head, level) tasks. A task owns the slice
// grad_value[n, level rows, m, :] and the entries grad_loc / grad_attn
// [n, :, m, l, :], so no two threads write the same memory: no atomics, and the
// order of every sum is fixed, which makes the result bitwise reproducible for
// any thread count.
#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "ddetr/bilinear.h"
#include "ddetr/msda.h"
#include "ddetr/scalar.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef DDETR_CPU_ISA
#define DDETR_CPU_ISA baseline
#endif

namespace ddetr {
namespace DDETR_CPU_ISA {
namespace {

// kD > 0 fixes the channel count at compile time (the common D = 32 / 64), so
// the accumulator lives in vector registers; kD = 0 handles any D.
template <typename scalar_t, typename acc_t, int kD>
void forward_impl(const MsdaForwardParams& prm) {
  using Cv = Convert<scalar_t, acc_t>;
  const MsdaShape& s = prm.shape;
  const int64_t N = s.batch, S = s.num_keys, M = s.num_heads;
  const int64_t D = kD > 0 ? kD : s.channels;
  const int64_t Lq = s.num_queries, L = s.num_levels, P = s.num_points;
  const auto* value = static_cast<const scalar_t*>(prm.value);
  const auto* loc = static_cast<const acc_t*>(prm.sampling_loc);
  const auto* attn = static_cast<const acc_t*>(prm.attn_weight);
  auto* out = static_cast<scalar_t*>(prm.output);
  const int64_t row_stride = M * D;  // elements between consecutive pixels of one head

#pragma omp parallel num_threads(prm.num_threads)
  {
    std::vector<acc_t> acc_heap(kD > 0 ? 0 : static_cast<size_t>(D));
    alignas(64) acc_t acc_fixed[kD > 0 ? kD : 1];
    acc_t* acc = kD > 0 ? acc_fixed : acc_heap.data();
    const std::vector<scalar_t> zero_row(static_cast<size_t>(D), Cv::store(static_cast<acc_t>(0)));
    const scalar_t* zeros = zero_row.data();
#pragma omp for schedule(static)
    for (int64_t nq = 0; nq < N * Lq; ++nq) {
      const int64_t n = nq / Lq;
      for (int64_t m = 0; m < M; ++m) {
        std::fill(acc, acc + D, static_cast<acc_t>(0));
        const int64_t pt0 = (nq * M + m) * L * P;  // first point of this (n, q, m)
        for (int64_t l = 0; l < L; ++l) {
          const int64_t H = s.level_h[l], W = s.level_w[l];
          const scalar_t* level = value + ((n * S + s.level_start[l]) * M + m) * D;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t pt = pt0 + l * P + p;
            BilinearTaps<acc_t> t;
            if (!bilinear_taps<acc_t>(loc[2 * pt], loc[2 * pt + 1], H, W, t)) continue;
            const acc_t a = attn[pt];
            // Corners outside the map read a row of zeros: one fused pass, no branches.
            const scalar_t* v0 = (t.inside & 1u) ? level + t.index[0] * row_stride : zeros;
            const scalar_t* v1 = (t.inside & 2u) ? level + t.index[1] * row_stride : zeros;
            const scalar_t* v2 = (t.inside & 4u) ? level + t.index[2] * row_stride : zeros;
            const scalar_t* v3 = (t.inside & 8u) ? level + t.index[3] * row_stride : zeros;
            const acc_t w0 = a * t.weight[0], w1 = a * t.weight[1], w2 = a * t.weight[2], w3 = a * t.weight[3];
#pragma omp simd
            for (int64_t d = 0; d < D; ++d)
              acc[d] += w0 * Cv::load(v0[d]) + w1 * Cv::load(v1[d]) + w2 * Cv::load(v2[d]) + w3 * Cv::load(v3[d]);
          }
        }
        scalar_t* o = out + (nq * M + m) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = Cv::store(acc[d]);
      }
    }
  }
}

// Largest tile (elements) a backward task packs: 4M floats = 16 MiB per tile.
constexpr int64_t kMaxPackElements = int64_t{1} << 22;

// Widens a stored value (scalar_t) or passes an already widened one (acc_t).
template <typename scalar_t, typename acc_t, typename T>
inline acc_t to_acc(T v) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return v;
  } else {
    return Convert<scalar_t, acc_t>::load(v);
  }
}

template <typename scalar_t, typename acc_t, int kD>
void backward_impl(const MsdaBackwardParams& prm) {
  using Cv = Convert<scalar_t, acc_t>;
  const MsdaShape& s = prm.shape;
  const int64_t N = s.batch, S = s.num_keys, M = s.num_heads;
  const int64_t D = kD > 0 ? kD : s.channels;
  const int64_t Lq = s.num_queries, L = s.num_levels, P = s.num_points;
  const auto* value = static_cast<const scalar_t*>(prm.value);
  const auto* loc = static_cast<const acc_t*>(prm.sampling_loc);
  const auto* attn = static_cast<const acc_t*>(prm.attn_weight);
  const auto* grad_out = static_cast<const scalar_t*>(prm.grad_output);
  auto* grad_value = static_cast<acc_t*>(prm.grad_value);
  auto* grad_loc = static_cast<acc_t*>(prm.grad_loc);
  auto* grad_attn = static_cast<acc_t*>(prm.grad_attn);
  const int64_t row_stride = M * D;

  // A task's value slice is strided by M * D elements (1 KiB for the usual
  // 8 x 32 floats): every row then falls into the same few cache sets. A task
  // whose level fits a tile and is sampled at least once per pixel on average
  // (the encoder) copies its slice into a contiguous tile (stride D, in the
  // accumulation type), accumulates its gradient in a second tile and writes
  // that back once; other tasks (the decoder's few queries, huge levels) work
  // on the strided slice.
  auto packs = [&](int64_t hw) { return hw * D <= kMaxPackElements && Lq * P >= hw; };
  int64_t tile_elems = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t hw = s.level_h[l] * s.level_w[l];
    if (packs(hw)) tile_elems = std::max(tile_elems, hw * D);
  }

#pragma omp parallel num_threads(prm.num_threads)
  {
    std::vector<acc_t> g_heap(kD > 0 ? 0 : static_cast<size_t>(D));
    alignas(64) acc_t g_fixed[kD > 0 ? kD : 1];
    acc_t* g = kD > 0 ? g_fixed : g_heap.data();
    // Uninitialised: a task overwrites v_tile and zero-fills g_tile before use.
    std::unique_ptr<acc_t[]> v_tile(tile_elems > 0 ? new acc_t[tile_elems] : nullptr);
    std::unique_ptr<acc_t[]> g_tile(tile_elems > 0 ? new acc_t[tile_elems] : nullptr);

    // The sweep over one task's points; rows of `vrows` / `grows` are `stride` apart.
    auto sweep = [&](int64_t n, int64_t m, int64_t l, const auto* vrows, acc_t* grows, int64_t stride) {
      const int64_t H = s.level_h[l], W = s.level_w[l];
      for (int64_t q = 0; q < Lq; ++q) {
        const int64_t pt0 = (((n * Lq + q) * M + m) * L + l) * P;
        bool have_g = false;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t pt = pt0 + p;
          BilinearTaps<acc_t> t;
          if (!bilinear_taps<acc_t>(loc[2 * pt], loc[2 * pt + 1], H, W, t)) {
            grad_loc[2 * pt] = 0;
            grad_loc[2 * pt + 1] = 0;
            grad_attn[pt] = 0;
            continue;
          }
          if (!have_g) {
            const scalar_t* go = grad_out + ((n * Lq + q) * M + m) * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) g[d] = Cv::load(go[d]);
            have_g = true;
          }
          const acc_t a = attn[pt];
          acc_t ga = 0, gx = 0, gy = 0;
          for (int c = 0; c < 4; ++c) {
            if (!((t.inside >> c) & 1u)) continue;
            const auto* v = vrows + t.index[c] * stride;
            acc_t* gv = grows + t.index[c] * stride;
            const acc_t aw = a * t.weight[c];
            acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) {
              dot += g[d] * to_acc<scalar_t, acc_t>(v[d]);
              gv[d] += aw * g[d];
            }
            ga += t.weight[c] * dot;
            gx += t.dweight_dx[c] * dot;
            gy += t.dweight_dy[c] * dot;
          }
          grad_attn[pt] = ga;
          grad_loc[2 * pt] = static_cast<acc_t>(W) * a * gx;
          grad_loc[2 * pt + 1] = static_cast<acc_t>(H) * a * gy;
        }
      }
    };

#pragma omp for schedule(static)
    for (int64_t task = 0; task < N * M * L; ++task) {
      const int64_t n = task / (M * L);
      const int64_t m = (task / L) % M;
      const int64_t l = task % L;
      const int64_t HW = s.level_h[l] * s.level_w[l];
      const int64_t level_off = ((n * S + s.level_start[l]) * M + m) * D;
      const scalar_t* level = value + level_off;
      acc_t* glevel = grad_value + level_off;
      if (!packs(HW)) {
        sweep(n, m, l, level, glevel, row_stride);
        continue;
      }
      for (int64_t i = 0; i < HW; ++i) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) v_tile[i * D + d] = Cv::load(level[i * row_stride + d]);
      }
      std::fill(g_tile.get(), g_tile.get() + HW * D, static_cast<acc_t>(0));
      sweep(n, m, l, v_tile.get(), g_tile.get(), D);
      // This task owns the slice: plain stores, no accumulation needed.
      for (int64_t i = 0; i < HW; ++i) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) glevel[i * row_stride + d] = g_tile[i * D + d];
      }
    }
  }
}

}  // namespace

template <typename scalar_t, typename acc_t>
void forward_channels(const MsdaForwardParams& p) {
  switch (p.shape.channels) {
    case 32: return forward_impl<scalar_t, acc_t, 32>(p);
    case 64: return forward_impl<scalar_t, acc_t, 64>(p);
    default: return forward_impl<scalar_t, acc_t, 0>(p);
  }
}

template <typename scalar_t, typename acc_t>
void backward_channels(const MsdaBackwardParams& p) {
  switch (p.shape.channels) {
    case 32: return backward_impl<scalar_t, acc_t, 32>(p);
    case 64: return backward_impl<scalar_t, acc_t, 64>(p);
    default: return backward_impl<scalar_t, acc_t, 0>(p);
  }
}

void forward(const MsdaForwardParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return forward_channels<float, float>(p);
    case DType::kFloat64: return forward_channels<double, double>(p);
    case DType::kBFloat16: return forward_channels<bf16_t, float>(p);
    default: break;
  }
}

void backward(const MsdaBackwardParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return backward_channels<float, float>(p);
    case DType::kFloat64: return backward_channels<double, double>(p);
    case DType::kBFloat16: return backward_channels<bf16_t, float>(p);
    default: break;
  }
}

}  // namespace DDETR_CPU_ISA
}  // namespace ddetr
