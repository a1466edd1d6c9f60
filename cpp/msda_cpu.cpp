// Multi-scale deformable attention on the CPU (OpenMP).
//
// Compiled once per instruction set (DDETR_CPU_ISA names the namespace); the
// dispatcher in cpu_dispatch.cpp picks one at run time.
//
// Forward: parallel over (batch, query) rows, the encoder's visited
// pixel-major (query_order); per head, one accumulator of D
// channels in the accumulation type; each point's corner indices and bilinear
// weights are computed once, with the attention weight folded in (in the AVX2
// and AVX-512 builds eight points at a time, bilinear_avx2.h); the inner loops
// run over contiguous channels (value is channel-last) and vectorise.
//
// Backward: one sweep per (batch, head, level) task when there are at least
// four such tasks per thread (backward_fused), else two phases over many more
// tasks (backward_impl). Both add every term in the same order, each output
// element is written by one task, no atomics: bitwise the same result for any
// thread count.
#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#include "ddetr/bilinear.h"
#ifdef __AVX2__
#include "ddetr/bilinear_avx2.h"
#endif
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

// a * b + c with one rounding where the build has FMA (the AVX2 and AVX-512
// builds), else a multiply and an add. The kernels are compiled with
// -ffp-contract=off, so the compiler fuses nothing by itself (it would decide
// loop by loop, vector body and remainder apart, and the backward's two
// schedules must add the same terms to the same bits): every multiply-add that
// should fuse says so here, and GCC and Clang vectorise it to vfmadd.
template <typename T>
inline T madd(T a, T b, T c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

#if defined(__GNUC__) || defined(__clang__)
#define DDETR_ALWAYS_INLINE __attribute__((always_inline))
#else
#define DDETR_ALWAYS_INLINE
#endif

// Asks for one cache line; kWrite: the caller will write it.
template <bool kWrite = false>
inline void prefetch_line(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, kWrite ? 1 : 0);
#else
  (void)p;
#endif
}

// Asks for the cache lines of a row that the next gathers will read.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(scalar_t)); b += 64) prefetch_line(p + b);
}

// acc[0 .. D) += w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3, fused in that order:
// one sampling point's four corner rows.
template <typename scalar_t, typename acc_t>
inline void add_corners(acc_t* acc, acc_t w0, const scalar_t* v0, acc_t w1, const scalar_t* v1, acc_t w2,
                        const scalar_t* v2, acc_t w3, const scalar_t* v3, int64_t D) {
  using Cv = Convert<scalar_t, acc_t>;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d)
    acc[d] = madd(w3, Cv::load(v3[d]), madd(w2, Cv::load(v2[d]), madd(w1, Cv::load(v1[d]), madd(w0, Cv::load(v0[d]), acc[d]))));
}

// The order in which the forward visits one batch element's queries. With one
// query per pixel of the levels (Lq == S: the encoder's self-attention, query i
// on pixel i), pixel-major: the other levels' queries are merged into level
// 0's raster (the finest), each just after the level-0 query under its centre.
// Its points scatter around that spot on every level, so it finds the rows the
// queries around it have just brought into the cache; in level order it came
// after every level-0 query and gathered level 0 from rows long evicted
// (pixel-major: 0.81-0.86x the forward's time on the 800 x 1066 encoder).
// Otherwise query order. Each query's output is its own: the order changes no
// bit of the result.
std::vector<int64_t> query_order(const MsdaShape& s) {
  const int64_t Lq = s.num_queries, L = s.num_levels;
  std::vector<int64_t> order(static_cast<size_t>(Lq));
  int64_t total = 0;
  bool pixels = Lq == s.num_keys && L > 1;
  for (int64_t l = 0; l < L; ++l) {
    pixels = pixels && s.level_start[l] == total;
    total += s.level_h[l] * s.level_w[l];
  }
  if (!pixels || total != Lq) {
    for (int64_t q = 0; q < Lq; ++q) order[q] = q;
    return order;
  }
  // The key of pixel i of level l: the level-0 pixel under its centre, row-major.
  // Each level's raster has non-decreasing keys (for levels no finer than level
  // 0), so merging the levels' runs sorts them; ties go to the lower level.
  const int64_t H0 = s.level_h[0], W0 = s.level_w[0];
  auto key = [&](int64_t l, int64_t i) {
    const int64_t H = s.level_h[l], W = s.level_w[l], y = i / W, x = i % W;
    return (2 * y + 1) * H0 / (2 * H) * W0 + (2 * x + 1) * W0 / (2 * W);
  };
  int64_t next[kMaxLevels] = {};
  for (int64_t k = 0; k < Lq; ++k) {
    int64_t pick = -1, pick_key = 0;
    for (int64_t l = 0; l < L; ++l) {
      if (next[l] == s.level_h[l] * s.level_w[l]) continue;
      const int64_t kl = key(l, next[l]);
      if (pick < 0 || kl < pick_key) pick = l, pick_key = kl;
    }
    order[k] = s.level_start[pick] + next[pick]++;
  }
  return order;
}

#ifdef __AVX2__
// The forward with each query's taps computed eight points at a time
// (bilinear_taps8), every head's before any gather: the vector unit does the
// geometry that costs the scalar path about 100 instructions per point, and
// the gathers then run back to back. The same sums in the same order as
// forward_impl: the same bits. Float accumulation; a query's points fill whole
// groups of eight; offsets fit 32 bits (taps8_fit).
template <typename scalar_t, int kD>
void forward_taps8(const MsdaForwardParams& prm) {
  using Cv = Convert<scalar_t, float>;
  const MsdaShape& s = prm.shape;
  const int64_t N = s.batch, S = s.num_keys, M = s.num_heads;
  const int64_t D = kD > 0 ? kD : s.channels;
  const int64_t Lq = s.num_queries, LP = s.num_levels * s.num_points, groups = LP / 8;
  const auto* value = static_cast<const scalar_t*>(prm.value);
  const auto* loc = static_cast<const float*>(prm.sampling_loc);
  const auto* attn = static_cast<const float*>(prm.attn_weight);
  auto* out = static_cast<scalar_t*>(prm.output);
  const int32_t row_stride = static_cast<int32_t>(M * D);

  // Lane constants of each group of eight points, and each point's step from
  // its top row to its bottom row (W * M * D).
  std::vector<LevelLanes8> lanes(static_cast<size_t>(groups));
  std::vector<int32_t> down(static_cast<size_t>(LP));
  for (int64_t g = 0; g < groups; ++g) {
    alignas(32) float w[8], h[8];
    alignas(32) int32_t w_int[8], start[8];
    for (int j = 0; j < 8; ++j) {
      const int64_t l = (8 * g + j) / s.num_points;
      w[j] = static_cast<float>(s.level_w[l]);
      h[j] = static_cast<float>(s.level_h[l]);
      w_int[j] = static_cast<int32_t>(s.level_w[l]);
      start[j] = static_cast<int32_t>(s.level_start[l]);
      down[8 * g + j] = static_cast<int32_t>(s.level_w[l]) * row_stride;
    }
    lanes[g] = level_lanes8(w, h, w_int, start);
  }
  const std::vector<int64_t> order = query_order(s);

#pragma omp parallel num_threads(prm.num_threads)
  {
    std::vector<float> acc_heap(kD > 0 ? 0 : static_cast<size_t>(D));
    alignas(64) float acc_fixed[kD > 0 ? kD : 1];
    float* acc = kD > 0 ? acc_fixed : acc_heap.data();
    const std::vector<scalar_t> zero_row(static_cast<size_t>(D), Cv::store(0.f));
    const scalar_t* zeros = zero_row.data();
    std::vector<Taps8> taps(static_cast<size_t>(M * groups));  // [M, groups] of one query
    // Guided: long runs of neighbouring queries per thread (they share rows),
    // and no thread left with a slow tail alone: 0.76-0.98x the time of a
    // static split on the 800 x 1066 encoder in level order (its coarse-level
    // queries came last and ran slower), 0.94-1.0x in pixel-major order.
#pragma omp for schedule(guided)
    for (int64_t i = 0; i < N * Lq; ++i) {
      const int64_t n = i / Lq, nq = n * Lq + order[i % Lq];
      for (int64_t mg = 0; mg < M * groups; ++mg)
        bilinear_taps8(loc + 2 * (nq * M * LP + 8 * mg), attn + nq * M * LP + 8 * mg, lanes[mg % groups], row_stride, taps[mg]);
      for (int64_t m = 0; m < M; ++m) {
        std::fill(acc, acc + D, 0.f);
        const scalar_t* head = value + (n * S * M + m) * D;  // pixel 0 of this head
        for (int64_t g = 0; g < groups; ++g) {
          const Taps8& t = taps[m * groups + g];
          const unsigned any = t.inside[0] | t.inside[1] | t.inside[2] | t.inside[3];
          for (int j = 0; j < 8; ++j) {
            if (!((any >> j) & 1u)) continue;
            // Corners outside the map read a row of zeros: one fused pass, no branches.
            const scalar_t* top = head + t.offset[j];
            const scalar_t* bottom = top + down[8 * g + j];
            add_corners(acc, t.weight[0][j], ((t.inside[0] >> j) & 1u) ? top : zeros,
                        t.weight[1][j], ((t.inside[1] >> j) & 1u) ? top + row_stride : zeros,
                        t.weight[2][j], ((t.inside[2] >> j) & 1u) ? bottom : zeros,
                        t.weight[3][j], ((t.inside[3] >> j) & 1u) ? bottom + row_stride : zeros, D);
          }
        }
        scalar_t* o = out + (nq * M + m) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = Cv::store(acc[d]);
      }
    }
  }
}

// Whether the eight-point taps take these shapes: element offsets and float
// pixel coordinates exact in 32 bits.
inline bool taps8_fit(const MsdaShape& s) {
  if (s.num_keys * s.num_heads * s.channels >= (int64_t{1} << 31)) return false;
  for (int64_t l = 0; l < s.num_levels; ++l)
    if (s.level_w[l] >= (int64_t{1} << 24) || s.level_h[l] >= (int64_t{1} << 24)) return false;
  return true;
}
#endif

// kD > 0 fixes the channel count at compile time (the common D = 32 / 64), so
// the accumulator lives in vector registers; kD = 0 handles any D.
template <typename scalar_t, typename acc_t, int kD>
void forward_impl(const MsdaForwardParams& prm) {
#ifdef __AVX2__
  if constexpr (std::is_same_v<acc_t, float>) {
    if ((prm.shape.num_levels * prm.shape.num_points) % 8 == 0 && taps8_fit(prm.shape))
      return forward_taps8<scalar_t, kD>(prm);
  }
#endif
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
  const std::vector<int64_t> order = query_order(s);

#pragma omp parallel num_threads(prm.num_threads)
  {
    std::vector<acc_t> acc_heap(kD > 0 ? 0 : static_cast<size_t>(D));
    alignas(64) acc_t acc_fixed[kD > 0 ? kD : 1];
    acc_t* acc = kD > 0 ? acc_fixed : acc_heap.data();
    const std::vector<scalar_t> zero_row(static_cast<size_t>(D), Cv::store(static_cast<acc_t>(0)));
    const scalar_t* zeros = zero_row.data();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N * Lq; ++i) {
      const int64_t n = i / Lq, nq = n * Lq + order[i % Lq];
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
            add_corners(acc, a * t.weight[0], v0, a * t.weight[1], v1, a * t.weight[2], v2, a * t.weight[3], v3, D);
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
constexpr int64_t kBandPoints = 8192;       // points of one (n, m, level) per phase-2 band, about
constexpr int64_t kMaxTileElems = int64_t{1} << 16;  // a band's packed gradient tile: 256 KiB of floats
// Phase 2 lists each band's points when a query's points fit a 32-bit mask and
// the level has fewer rows than this, so that a float row coordinate is within
// 1/256 of a row of the one the taps compute (the lists keep a 1/16-row margin).
// Other levels scan all their points.
constexpr int64_t kListedMaxRows = int64_t{1} << 16;
constexpr double kRowMargin = 1.0 / 16;
// The fused backward's largest packed tile (elements): 4M, 16 MiB of floats.
constexpr int64_t kMaxFusedTileElems = int64_t{1} << 22;
// How far ahead (in queries) the fused backward prefetches a query's rows:
// 4 to 16 timed alike on the 800 x 1066 encoder.
constexpr int64_t kPrefetchQueries = 8;

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
  for (int64_t d = 0; d < D; ++d) dot = madd(g[d], Convert<scalar_t, acc_t>::load(v[d]), dot);
  return dot;
}

// gv[0 .. D) += aw * g: one grad_value row's share of a corner, the same
// instructions in both backward schedules.
template <typename acc_t>
inline void add_scaled_row(acc_t* gv, acc_t aw, const acc_t* g, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) gv[d] = madd(aw, g[d], gv[d]);
}

// One query's points of one (n, m, level) that may touch a band: bit p of
// `points` set for each such point p.
struct BandEntry {
  uint32_t query;
  uint32_t points;
};

// The bands a point with row coordinate y (= loc_y * H - 0.5, in double) may
// touch, with a margin: false when it certainly touches none.
inline bool point_bands(double y, int64_t H, int64_t rows, int64_t bands, int64_t& first, int64_t& last) {
  // Its corners lie on rows floor(y) and floor(y) + 1, inside [0, H).
  const double lo = y - kRowMargin, hi = y + 1 + kRowMargin;
  if (!(hi >= 0 && lo < static_cast<double>(H))) return false;  // false for NaN too
  first = lo <= 0 ? 0 : std::min(bands - 1, static_cast<int64_t>(lo / static_cast<double>(rows)));
  last = hi >= static_cast<double>(H) ? bands - 1 : std::min(bands - 1, static_cast<int64_t>(hi / static_cast<double>(rows)));
  return true;
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
  bool listed[kMaxLevels];    // phase 2 reads the band's list of points (else scans them all)
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
      listed[l] = s.num_points <= 32 && H < kListedMaxRows && s.num_queries <= INT64_C(0xffffffff);
      bands_per_head += bands[l];
    }
  }
};

// The backward as one sweep per (batch, head, level) task: the task owns
// grad_value[n, level rows, m, :] and grad_loc / grad_attn [n, :, m, l, :],
// and walks the level's points in query order. It adds every term in the same
// order as the two-phase backward below, with the same row_dot and the same
// products, so both give the same bits; this one does less work in all (it
// computes each point's taps once and reads each query's rows in order) but
// has only N x M x L tasks, so it runs when those are at least four per thread.
template <typename scalar_t, typename acc_t, int kD>
void backward_fused(const MsdaBackwardParams& prm) {
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

  // A task's value slice is strided by M * D elements (1 KiB for 8 x 32
  // floats): every row then falls into the same few cache sets. A task whose
  // level fits a tile and is sampled at least once per pixel on average (the
  // encoder) copies its slice into a contiguous tile, accumulates its gradient
  // in a second tile and writes that back once; other tasks (the decoder's few
  // queries, huge levels) work on the strided slice.
  auto packs = [&](int64_t hw) { return hw * D <= kMaxFusedTileElems && Lq * P >= hw; };
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
    std::unique_ptr<scalar_t[]> v_tile(tile_elems > 0 ? new scalar_t[tile_elems] : nullptr);
    std::unique_ptr<acc_t[]> g_tile(tile_elems > 0 ? new acc_t[tile_elems] : nullptr);

    // The sweep over one task's points; rows of `vrows` / `grows` are `stride` apart.
    auto sweep = [&](int64_t n, int64_t m, int64_t l, const scalar_t* vrows, acc_t* grows, int64_t stride) {
      const int64_t H = s.level_h[l], W = s.level_w[l];
      // A point that contributes nothing.
      auto clear_point = [&](int64_t pt) {
        grad_loc[2 * pt] = 0;
        grad_loc[2 * pt + 1] = 0;
        grad_attn[pt] = 0;
      };
      // A contributing point's terms; g holds its query's grad_out row.
      auto add_point = [&](int64_t pt, const BilinearTaps<acc_t>& t, const scalar_t* go) {
        const acc_t a = attn[pt];
        acc_t ga = 0, gx = 0, gy = 0;
        for (int c = 0; c < 4; ++c) {
          if (!((t.inside >> c) & 1u)) continue;
          const acc_t dot = row_dot<scalar_t, acc_t>(g, go, vrows + t.index[c] * stride, D);
          add_scaled_row(grows + t.index[c] * stride, a * t.weight[c], g, D);
          ga += t.weight[c] * dot;
          gx += t.dweight_dx[c] * dot;
          gy += t.dweight_dy[c] * dot;
        }
        grad_attn[pt] = ga;
        grad_loc[2 * pt] = static_cast<acc_t>(W) * a * gx;
        grad_loc[2 * pt + 1] = static_cast<acc_t>(H) * a * gy;
      };
      auto load_g = [&](const scalar_t* go) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) g[d] = Cv::load(go[d]);
      };
      // A task reads and writes a few bytes of each query's rows, M * L * P
      // points apart: ask for query q's lines kPrefetchQueries ahead of use
      // (the hardware's stride prefetch does not keep up). Forced inline: as a
      // call, it made the sweep spill its vector registers and gained nothing;
      // inlined, the sweep takes 0.7x the time.
      auto prefetch_query = [&](int64_t q) DDETR_ALWAYS_INLINE {
        if (q >= Lq) return;
        const int64_t row = (n * Lq + q) * M + m, pt = (row * L + l) * P;
        prefetch_line(loc + 2 * pt);
        prefetch_line(attn + pt);
        prefetch_line<true>(grad_loc + 2 * pt);
        prefetch_line<true>(grad_attn + pt);
        prefetch_row(grad_out + row * D, D);
      };
#ifdef __AVX2__
      // Two queries' four points per step of eight-point taps.
      if constexpr (std::is_same_v<acc_t, float>) {
        if (P == 4 && taps8_fit(s)) {
          const LevelLanes8 lanes = level_lanes8(H, W, 0);
          GradTaps8 t8;
          for (int64_t q = 0; q < Lq; q += 2) {
            const int64_t pair = std::min<int64_t>(2, Lq - q);
            const int64_t row0 = (n * Lq + q) * M + m;
            const float* lo = loc + 2 * (row0 * L + l) * P;
            const float* hi = pair == 2 ? lo + 2 * M * L * P : lo;  // the next query's points (or these again)
            prefetch_query(q + kPrefetchQueries);
            prefetch_query(q + kPrefetchQueries + 1);
            bilinear_grad_taps8(lo, hi, lanes, 1, t8);
            for (int64_t i = 0; i < pair; ++i) {
              const int64_t row = row0 + i * M;
              const scalar_t* go = grad_out + row * D;
              const unsigned any = (t8.inside[0] | t8.inside[1] | t8.inside[2] | t8.inside[3]) >> (4 * i);
              if (any & 0xfu) load_g(go);
              for (int64_t p = 0; p < 4; ++p) {
                const int64_t pt = (row * L + l) * P + p;
                if ((any >> p) & 1u)
                  add_point(pt, lane_taps(t8, static_cast<int>(4 * i + p), W), go);
                else
                  clear_point(pt);
              }
            }
          }
          return;
        }
      }
#endif
      for (int64_t q = 0; q < Lq; ++q) {
        const int64_t row = (n * Lq + q) * M + m;
        const scalar_t* go = grad_out + row * D;
        prefetch_query(q + kPrefetchQueries);
        bool have_g = false;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t pt = (row * L + l) * P + p;
          BilinearTaps<acc_t> t;
          if (!bilinear_taps<acc_t>(loc[2 * pt], loc[2 * pt + 1], H, W, t)) {
            clear_point(pt);
            continue;
          }
          if (!have_g) {
            load_g(go);
            have_g = true;
          }
          add_point(pt, t, go);
        }
      }
    };

#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < N * M * L; ++task) {
      const int64_t n = task / (M * L), m = (task / L) % M, l = task % L;
      const int64_t HW = s.level_h[l] * s.level_w[l];
      const int64_t level_off = ((n * S + s.level_start[l]) * M + m) * D;
      const scalar_t* level = value + level_off;
      acc_t* glevel = grad_value + level_off;
      if (!packs(HW)) {
        sweep(n, m, l, level, glevel, row_stride);
        continue;
      }
      for (int64_t i = 0; i < HW; ++i) std::copy(level + i * row_stride, level + i * row_stride + D, v_tile.get() + i * D);
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

// Backward, in two phases. Each writes every output element from exactly one
// task (no atomics) and adds up every sum in an order fixed by the shapes, so
// the gradients are bitwise the same for any thread count, and the work splits
// into far more than N x M x L tasks.
//  1. Parallel over (batch, chunk of queries): per point, grad_attn and
//     grad_loc from the dot products of grad_out with its four corner rows
//     (read like the forward reads them), and a counting sort of the points
//     by the bands of rows they may touch: phase 1 counts, a second pass over
//     the same chunks writes each band's list of BandEntry in query order.
//  2. Parallel over (batch, head, level, band of rows): a task owns the
//     grad_value rows of its band; it walks its list (or, for a level without
//     lists, all the level's points) in query order and adds attn * w_c *
//     grad_out to the corners inside its band. Each grad_value element so
//     receives its terms in (query, point, corner) order, as a single sweep
//     over the queries would add them.
template <typename scalar_t, typename acc_t, int kD>
void backward_impl(const MsdaBackwardParams& prm) {
  using Cv = Convert<scalar_t, acc_t>;
  const MsdaShape& s = prm.shape;
  if (s.batch * s.num_heads * s.num_levels >= 4 * static_cast<int64_t>(prm.num_threads))
    return backward_fused<scalar_t, acc_t, kD>(prm);
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
  const BandPlan plan(s);
  int64_t band_first[kMaxLevels + 1] = {0};
  int64_t max_bands = 0;
  for (int64_t l = 0; l < L; ++l) {
    band_first[l + 1] = band_first[l] + plan.bands[l];
    max_bands = std::max(max_bands, plan.bands[l]);
  }
  const int64_t band_tasks = N * M * plan.bands_per_head;  // phase 2, in (n, m, level, band) order
  // The lists: list_start[b] .. list_start[b + 1] of `lists` for phase-2 task b.
  std::vector<int64_t> list_start(static_cast<size_t>(band_tasks + 1), 0);
  std::vector<BandEntry> lists;

  // [N, chunks, M, bands_per_head]: entries of each chunk in each band's list;
  // turned into each chunk's first slot in the list.
  std::vector<int64_t> slot(static_cast<size_t>(N * chunks * M * plan.bands_per_head), 0);
  // Calls f(band, mask) for each band of level l that query row (n, q, m)'s
  // points may touch, mask bit p for each such point p. Scratch per thread:
  // `mask` (max_bands zeros) and `touched` (max_bands).
  auto query_bands = [&](int64_t row, int64_t l, uint32_t* mask, int64_t* touched, auto&& f) {
    const int64_t H = s.level_h[l];
    const acc_t* lq = loc + 2 * ((row * L + l) * P);
    int64_t count = 0;
    for (int64_t p = 0; p < P; ++p) {
      int64_t b0, b1;
      const double y = static_cast<double>(lq[2 * p + 1]) * static_cast<double>(H) - 0.5;
      if (!point_bands(y, H, plan.rows[l], plan.bands[l], b0, b1)) continue;
      for (int64_t b = b0; b <= b1; ++b) {
        if (mask[b] == 0) touched[count++] = b;
        mask[b] |= uint32_t{1} << p;
      }
    }
    for (int64_t i = 0; i < count; ++i) {
      f(touched[i], mask[touched[i]]);
      mask[touched[i]] = 0;
    }
  };

#pragma omp parallel num_threads(prm.num_threads)
  {
    std::vector<acc_t> g_heap(kD > 0 ? 0 : static_cast<size_t>(D));
    alignas(64) acc_t g_fixed[kD > 0 ? kD : 1];
    acc_t* g = kD > 0 ? g_fixed : g_heap.data();
    // Uninitialised: a band zero-fills the part it uses.
    std::unique_ptr<acc_t[]> tile(plan.tile_elems > 0 ? new acc_t[plan.tile_elems] : nullptr);
    std::vector<GradPoint<scalar_t, acc_t>> points(static_cast<size_t>(M * LP));  // [M, valid points] of a query
    std::vector<int64_t> valid(static_cast<size_t>(M));
    std::vector<uint32_t> mask(static_cast<size_t>(max_bands), 0u);
    std::vector<int64_t> touched(static_cast<size_t>(max_bands));

    // Phase 1, and the count of each chunk's entries in each band's list. Any
    // schedule gives the same result: tasks write disjoint memory.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < N * chunks; ++task) {
      const int64_t n = task / chunks, chunk = task % chunks;
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
            for (int64_t p = 0; p < P; ++p) {
              const int64_t pt = (row * L + l) * P + p;
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
          int64_t* counts = slot.data() + (task * M + m) * plan.bands_per_head;
          for (int64_t l = 0; l < L; ++l)
            if (plan.listed[l])
              query_bands(row, l, mask.data(), touched.data(), [&](int64_t b, uint32_t) { ++counts[band_first[l] + b]; });
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
    }

    // The counts become slots: band task b's list is list_start[b] ..
    // list_start[b + 1], its entries chunk after chunk, so in query order.
#pragma omp single
    {
      int64_t next = 0;
      for (int64_t b = 0; b < band_tasks; ++b) {
        const int64_t n = b / (M * plan.bands_per_head), mb = b % (M * plan.bands_per_head);
        list_start[b] = next;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          int64_t& c = slot[(n * chunks + chunk) * M * plan.bands_per_head + mb];
          const int64_t count = c;
          c = next;
          next += count;
        }
      }
      list_start[band_tasks] = next;
      lists.resize(static_cast<size_t>(next));
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < N * chunks; ++task) {
      const int64_t n = task / chunks, chunk = task % chunks;
      for (int64_t q = chunk * kChunkQueries; q < std::min(Lq, (chunk + 1) * kChunkQueries); ++q) {
        for (int64_t m = 0; m < M; ++m) {
          int64_t* next = slot.data() + (task * M + m) * plan.bands_per_head;
          for (int64_t l = 0; l < L; ++l)
            if (plan.listed[l])
              query_bands((n * Lq + q) * M + m, l, mask.data(), touched.data(), [&](int64_t b, uint32_t points) {
                lists[next[band_first[l] + b]++] = BandEntry{static_cast<uint32_t>(q), points};
              });
        }
      }
    }

    // Phase 2.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < band_tasks; ++task) {
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
      // Adds query q's points in `points_mask` (bit p: point p) to the band's rows.
      auto add_query = [&](int64_t q, uint32_t points_mask, bool all) {
        const int64_t row = (n * Lq + q) * M + m;
        bool have_g = false;
        for (int64_t p = 0; p < P; ++p) {
          if (!all && !((points_mask >> p) & 1u)) continue;
          const int64_t pt = (row * L + l) * P + p;
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
            add_scaled_row(dst + (i - lo) * stride, a * t.weight[c], g, D);
          }
        }
      };
      if (plan.listed[l]) {
        for (int64_t e = list_start[task]; e < list_start[task + 1]; ++e) add_query(lists[e].query, lists[e].points, false);
      } else {
        for (int64_t q = 0; q < Lq; ++q) add_query(q, 0u, true);
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
