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
// Backward: two phases over tasks fixed by the shapes (see backward_impl), each
// output element written by one task, no atomics; bitwise the same result for
// any thread count.
#include <algorithm>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

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

// Asks for the cache lines of a row that the next gathers will read.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t D) {
#if defined(__GNUC__) || defined(__clang__)
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(scalar_t)); b += 64) __builtin_prefetch(p + b);
#else
  (void)row;
  (void)D;
#endif
}

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

// The backward's work units. Both depend on the shapes only, never on the thread
// count: a task's output and the order of its sums are then the same however
// many threads share the tasks.
constexpr int64_t kChunkQueries = 32;       // queries per phase-1 task
constexpr int64_t kBandPoints = 4096;       // points of one (n, m, level) per phase-2 band, about
constexpr int64_t kMaxTileElems = int64_t{1} << 15;  // a band's packed gradient tile: 128 KiB of floats
// Above this many rows a float row coordinate may be off by more than the
// one-row margin of the cheap tests below: such levels skip them.
constexpr int64_t kCheapTestRows = int64_t{1} << 22;

// grad_out . value row in the accumulation type: g is grad_out's row widened,
// go the same row as stored. The avx512bf16 build takes bf16 rows of 32-channel
// multiples straight to the native dot instruction (exact products, float32
// sums in the instruction's order, bf16 subnormals read as zero): half the
// instructions of widening first. Other builds and dtypes widen.
template <typename scalar_t, typename acc_t>
inline acc_t row_dot(const acc_t* g, const scalar_t* go, const scalar_t* v, int64_t D) {
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<scalar_t, bf16_t>) {
    if (D % 32 == 0) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 32)
        sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(go + d), (__m512bh)_mm512_loadu_si512(v + d));
      return _mm512_reduce_add_ps(sum);
    }
  }
#else
  (void)go;
#endif
  acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < D; ++d) dot += g[d] * Convert<scalar_t, acc_t>::load(v[d]);
  return dot;
}

// A valid point of phase 1: its taps, where its corner rows are (null outside
// the map), and which point and level it is.
template <typename scalar_t, typename acc_t>
struct GradPoint {
  BilinearTaps<acc_t> t;
  const scalar_t* row[4];
  int64_t pt, level;
};

// How phase 2 splits a level into bands of rows, from the shapes alone.
struct BandPlan {
  int64_t rows[kMaxLevels];   // rows per band (the last band may have fewer)
  int64_t bands[kMaxLevels];  // bands of the level
  bool tiled[kMaxLevels];     // accumulate in a packed tile (else in grad_value itself)
  int64_t bands_per_head = 0;  // sum of bands[l]
  int64_t tile_elems = 0;      // largest tile any band needs

  explicit BandPlan(const MsdaShape& s) {
    const int64_t D = s.channels, points = s.num_queries * s.num_points;
    // Enough bands that each holds about kBandPoints of the level's points when
    // they spread evenly over its rows, and no more rows than fit a tile.
    const int64_t want = std::max<int64_t>(1, (points + kBandPoints - 1) / kBandPoints);
    for (int64_t l = 0; l < s.num_levels; ++l) {
      const int64_t H = s.level_h[l], W = s.level_w[l];
      const int64_t fit = std::max<int64_t>(1, kMaxTileElems / (W * D));
      rows[l] = std::max<int64_t>(1, std::min({H, fit, (H + want - 1) / want}));
      bands[l] = (H + rows[l] - 1) / rows[l];
      // A tile pays when the level is sampled at least once per pixel on
      // average (the encoder): zero-filling and copying it back then costs less
      // than the cache-set conflicts of rows M * D apart (1 KiB for 8 x 32
      // floats, so every row falls into the same few sets). The decoder's few
      // points go straight to grad_value.
      tiled[l] = points >= H * W && rows[l] * W * D <= kMaxTileElems;
      if (tiled[l]) tile_elems = std::max(tile_elems, rows[l] * W * D);
      bands_per_head += bands[l];
    }
  }
};

// Backward, in two phases. Each writes every output element from exactly one
// task (no atomics) and adds up every sum in an order fixed by the shapes, so
// the gradients are bitwise the same for any thread count, and the work splits
// into far more than N x M x L tasks.
//  1. Parallel over (batch, chunk of queries): per point, grad_attn and
//     grad_loc from the dot products of grad_out with its four corner rows
//     (read like the forward reads them); per (chunk, head, level), the range of
//     the valid points' y locations, so phase 2 can skip chunks.
//  2. Parallel over (batch, head, level, band of rows): a task owns the
//     grad_value rows of its band; it scans the points of its (n, m, level) in
//     query order, skips chunks and points whose rows miss the band (a cheap
//     test on y), and adds attn * w_c * grad_out to the corners inside it. Each
//     grad_value element so receives its terms in (query, point, corner) order,
//     as a single sweep over the queries would add them.
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
  const int64_t row_stride = M * D;  // elements between consecutive pixels of one head
  const int64_t LP = L * P;

  const int64_t chunks = (Lq + kChunkQueries - 1) / kChunkQueries;
  // [N, chunks, M, L, 2]: lowest and highest y location of the chunk's points.
  std::vector<acc_t> y_range(static_cast<size_t>(N * chunks * M * L * 2));
  const BandPlan plan(s);
  int64_t band_first[kMaxLevels + 1] = {0};
  for (int64_t l = 0; l < L; ++l) band_first[l + 1] = band_first[l] + plan.bands[l];

#pragma omp parallel num_threads(prm.num_threads)
  {
    std::vector<acc_t> g_heap(kD > 0 ? 0 : static_cast<size_t>(D));
    alignas(64) acc_t g_fixed[kD > 0 ? kD : 1];
    acc_t* g = kD > 0 ? g_fixed : g_heap.data();
    // Uninitialised: a band zero-fills the part it uses.
    std::unique_ptr<acc_t[]> tile(plan.tile_elems > 0 ? new acc_t[plan.tile_elems] : nullptr);
    std::vector<GradPoint<scalar_t, acc_t>> points(static_cast<size_t>(M * LP));  // [M, valid points] of a query
    std::vector<int64_t> valid(static_cast<size_t>(M));

    // Phase 1. Any schedule gives the same result: tasks write disjoint memory.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < N * chunks; ++task) {
      const int64_t n = task / chunks, chunk = task % chunks;
      acc_t* yr = y_range.data() + task * M * L * 2;
      for (int64_t i = 0; i < M * L; ++i) {
        yr[2 * i] = std::numeric_limits<acc_t>::infinity();
        yr[2 * i + 1] = -std::numeric_limits<acc_t>::infinity();
      }
      for (int64_t q = chunk * kChunkQueries; q < std::min(Lq, (chunk + 1) * kChunkQueries); ++q) {
        // As in the forward: the taps of every head's points first, then the
        // dot products, with the rows of head m + 1 prefetched during head m.
        for (int64_t m = 0; m < M; ++m) {
          const int64_t row = (n * Lq + q) * M + m;  // (n, q, m)
          GradPoint<scalar_t, acc_t>* gp = points.data() + m * LP;
          int64_t k = 0;
          for (int64_t l = 0; l < L; ++l) {
            const int64_t H = s.level_h[l], W = s.level_w[l];
            const scalar_t* level = value + ((n * S + s.level_start[l]) * M + m) * D;
            acc_t* lim = yr + (m * L + l) * 2;
            for (int64_t p = 0; p < P; ++p) {
              const int64_t pt = (row * L + l) * P + p;
              // Every point counts, valid or not (NaN drops out of min / max): phase 2
              // then never depends on this phase deciding validity the same way.
              lim[0] = std::min(lim[0], loc[2 * pt + 1]);
              lim[1] = std::max(lim[1], loc[2 * pt + 1]);
              GradPoint<scalar_t, acc_t>& e = gp[k];
              if (!bilinear_taps<acc_t>(loc[2 * pt], loc[2 * pt + 1], H, W, e.t)) {
                grad_loc[2 * pt] = 0;
                grad_loc[2 * pt + 1] = 0;
                grad_attn[pt] = 0;
                continue;
              }
              e.pt = pt;
              e.level = l;
              for (int c = 0; c < 4; ++c) e.row[c] = ((e.t.inside >> c) & 1u) ? level + e.t.index[c] * row_stride : nullptr;
              ++k;
            }
          }
          valid[m] = k;
        }
        for (int64_t m = 0; m < M; ++m) {
          if (m + 1 < M) {
            const GradPoint<scalar_t, acc_t>* next = points.data() + (m + 1) * LP;
            for (int64_t j = 0; j < valid[m + 1]; ++j)
              for (int c = 0; c < 4; ++c)
                if (next[j].row[c] != nullptr) prefetch_row(next[j].row[c], D);
          }
          const scalar_t* go = grad_out + ((n * Lq + q) * M + m) * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) g[d] = Cv::load(go[d]);
          const GradPoint<scalar_t, acc_t>* gp = points.data() + m * LP;
          for (int64_t j = 0; j < valid[m]; ++j) {
            const BilinearTaps<acc_t>& t = gp[j].t;
            acc_t ga = 0, gx = 0, gy = 0;
            for (int c = 0; c < 4; ++c) {
              const scalar_t* v = gp[j].row[c];
              if (v == nullptr) continue;
              const acc_t dot = row_dot<scalar_t, acc_t>(g, go, v, D);
              ga += t.weight[c] * dot;
              gx += t.dweight_dx[c] * dot;
              gy += t.dweight_dy[c] * dot;
            }
            const int64_t pt = gp[j].pt, l = gp[j].level;
            const acc_t a = attn[pt];
            grad_attn[pt] = ga;
            grad_loc[2 * pt] = static_cast<acc_t>(s.level_w[l]) * a * gx;
            grad_loc[2 * pt + 1] = static_cast<acc_t>(s.level_h[l]) * a * gy;
          }
        }
      }
    }  // implicit barrier: phase 2 reads y_range

    // Phase 2.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < N * M * plan.bands_per_head; ++task) {
      const int64_t nm = task / plan.bands_per_head, n = nm / M, m = nm % M;
      const int64_t band_index = task % plan.bands_per_head;
      int64_t l = 0;
      while (band_first[l + 1] <= band_index) ++l;
      const int64_t H = s.level_h[l], W = s.level_w[l];
      const int64_t r0 = (band_index - band_first[l]) * plan.rows[l], r1 = std::min(H, r0 + plan.rows[l]);
      const int64_t lo = r0 * W, hi = r1 * W;  // the band's pixels inside the level
      acc_t* glevel = grad_value + ((n * S + s.level_start[l]) * M + m) * D;
      acc_t* dst = plan.tiled[l] ? tile.get() : glevel + lo * row_stride;  // the band's first row
      const int64_t stride = plan.tiled[l] ? D : row_stride;
      if (plan.tiled[l]) std::fill(dst, dst + (hi - lo) * D, static_cast<acc_t>(0));
      // A point's corners lie on rows floor(y) and floor(y) + 1: it can touch the
      // band only for y in [r0 - 1, r1). The tests keep a margin of one row, so
      // rounding of y here can never drop a point the taps would place in the band.
      const bool cheap = H < kCheapTestRows;
      const acc_t y_lo = static_cast<acc_t>(r0 - 2), y_hi = static_cast<acc_t>(r1 + 1);
      const acc_t fh = static_cast<acc_t>(H), half = static_cast<acc_t>(0.5);
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const acc_t* lim = y_range.data() + (((n * chunks + chunk) * M + m) * L + l) * 2;
        if (cheap && !(lim[1] * fh - half >= y_lo && lim[0] * fh - half < y_hi)) continue;
        for (int64_t q = chunk * kChunkQueries; q < std::min(Lq, (chunk + 1) * kChunkQueries); ++q) {
          const int64_t row = (n * Lq + q) * M + m;
          bool have_g = false;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t pt = (row * L + l) * P + p;
            const acc_t y = loc[2 * pt + 1] * fh - half;
            if (cheap && !(y >= y_lo && y < y_hi)) continue;  // false for NaN too
            BilinearTaps<acc_t> t;
            if (!bilinear_taps<acc_t>(loc[2 * pt], loc[2 * pt + 1], H, W, t)) continue;
            const acc_t a = attn[pt];
            for (int c = 0; c < 4; ++c) {
              const int64_t i = t.index[c];
              if (!((t.inside >> c) & 1u) || i < lo || i >= hi) continue;
              if (!have_g) {
                const scalar_t* go = grad_out + row * D;
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) g[d] = Cv::load(go[d]);
                have_g = true;
              }
              acc_t* gv = dst + (i - lo) * stride;
              const acc_t aw = a * t.weight[c];
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) gv[d] += aw * g[d];
            }
          }
        }
      }
      if (!plan.tiled[l]) continue;
      // This task owns the band: plain stores, no accumulation needed.
      for (int64_t i = 0; i < hi - lo; ++i) {
        acc_t* out = glevel + (lo + i) * row_stride;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) out[d] = dst[i * D + d];
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
