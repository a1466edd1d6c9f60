// The bilinear taps of eight sampling points at once (AVX2), for the CPU
// kernels: lane by lane the same operations and roundings as bilinear_taps in
// bilinear.h (and attn * w for the forward), so a kernel that uses them gets
// the bits the scalar taps give. Included by msda_cpu.cpp in its AVX2 and
// AVX-512 builds only.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "ddetr/bilinear.h"

namespace ddetr {
// Internal linkage: each instruction-set build of msda_cpu.cpp keeps its own
// copy (a shared one could carry another build's instructions).
namespace {

// Eight points' taps for the forward. A lane that contributes nothing
// (outside the map, or a coordinate that is not finite) has every `inside` bit
// clear and zero weights.
struct Taps8 {
  alignas(32) int32_t offset[8];   // element offset of corner (y0, x0) from the head's first row
  alignas(32) float weight[4][8];  // attn * bilinear weight of corner c; 0 for a corner outside
  unsigned inside[4];              // bit j: corner c of lane j lies inside the map
};

// Eight points' taps for the backward: the bilinear weights and their
// derivatives as bilinear_taps gives them (0 for a corner outside).
struct GradTaps8 {
  alignas(32) int32_t offset[8];
  alignas(32) float weight[4][8];      // bilinear weight of corner c
  alignas(32) float dweight_dx[4][8];  // d weight / d x_pixel
  alignas(32) float dweight_dy[4][8];  // d weight / d y_pixel
  unsigned inside[4];
};

// Per-lane constants of the eight points' levels, as float and int32 vectors.
struct LevelLanes8 {
  __m256 w, h, w_minus_2, h_minus_2;  // level width and height, and both minus 2
  __m256i w_int, start;               // width, and the level's first pixel within S
};

inline LevelLanes8 level_lanes8(const float (&w)[8], const float (&h)[8], const int32_t (&w_int)[8], const int32_t (&start)[8]) {
  const __m256 two = _mm256_set1_ps(2.f);
  const __m256 wv = _mm256_loadu_ps(w), hv = _mm256_loadu_ps(h);
  return LevelLanes8{wv, hv, _mm256_sub_ps(wv, two), _mm256_sub_ps(hv, two),
                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_int)),
                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(start))};
}

// Every lane on one level of H x W pixels whose first pixel is `start`.
inline LevelLanes8 level_lanes8(int64_t H, int64_t W, int64_t start) {
  float w[8], h[8];
  int32_t w_int[8], first[8];
  for (int j = 0; j < 8; ++j) {
    w[j] = static_cast<float>(W);
    h[j] = static_cast<float>(H);
    w_int[j] = static_cast<int32_t>(W);
    first[j] = static_cast<int32_t>(start);
  }
  return level_lanes8(w, h, w_int, first);
}

// Eight cells, the vector form of bilinear_cell: fractions, complements and
// which corners lie inside (all clear for a lane that contributes nothing).
struct Cells8 {
  __m256 lx, ly, hx, hy;
  __m256 in[4];     // corners (y0, x0), (y0, x1), (y1, x0), (y1, x1)
  __m256i offset;   // element offset of corner (y0, x0)
};

// `lo` holds points 0-3 as (x, y) pairs and `hi` points 4-7; `row_stride` is
// the elements between consecutive pixels (M * D). The caller guarantees
// S * row_stride < 2^31 and level sides below 2^24, so offsets and pixel
// coordinates are exact.
inline Cells8 bilinear_cells8(const float* lo, const float* hi, const LevelLanes8& lv, int32_t row_stride) {
  // (x0 y0 x1 y1 x2 y2 x3 y3), (x4 y4 ... x7 y7) -> x0..x7 and y0..y7.
  const __m256 a = _mm256_loadu_ps(lo), b = _mm256_loadu_ps(hi);
  const __m256 xs = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));  // x0 x1 x4 x5 | x2 x3 x6 x7
  const __m256 ys = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
  const __m256 loc_x = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(xs), _MM_SHUFFLE(3, 1, 2, 0)));
  const __m256 loc_y = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ys), _MM_SHUFFLE(3, 1, 2, 0)));

  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f), minus_one = _mm256_set1_ps(-1.f);
  const __m256 x = _mm256_sub_ps(_mm256_mul_ps(loc_x, lv.w), _mm256_set1_ps(0.5f));
  const __m256 y = _mm256_sub_ps(_mm256_mul_ps(loc_y, lv.h), _mm256_set1_ps(0.5f));
  // Ordered comparisons: false for NaN, as in bilinear_cell.
  const __m256 valid = _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(x, minus_one, _CMP_GT_OQ), _mm256_cmp_ps(y, minus_one, _CMP_GT_OQ)),
                                     _mm256_and_ps(_mm256_cmp_ps(x, lv.w, _CMP_LT_OQ), _mm256_cmp_ps(y, lv.h, _CMP_LT_OQ)));
  // Invalid lanes become 0 before floor and the integer conversions.
  const __m256 xv = _mm256_and_ps(x, valid), yv = _mm256_and_ps(y, valid);
  const __m256 x0 = _mm256_floor_ps(xv), y0 = _mm256_floor_ps(yv);  // integers in [-1, W - 1] x [-1, H - 1]
  Cells8 c;
  c.lx = _mm256_sub_ps(xv, x0);
  c.ly = _mm256_sub_ps(yv, y0);
  c.hx = _mm256_sub_ps(one, c.lx);
  c.hy = _mm256_sub_ps(one, c.ly);
  const __m256 in_x0 = _mm256_cmp_ps(x0, zero, _CMP_GE_OQ), in_x1 = _mm256_cmp_ps(x0, lv.w_minus_2, _CMP_LE_OQ);
  const __m256 in_y0 = _mm256_and_ps(_mm256_cmp_ps(y0, zero, _CMP_GE_OQ), valid);
  const __m256 in_y1 = _mm256_and_ps(_mm256_cmp_ps(y0, lv.h_minus_2, _CMP_LE_OQ), valid);
  c.in[0] = _mm256_and_ps(in_y0, in_x0);
  c.in[1] = _mm256_and_ps(in_y0, in_x1);
  c.in[2] = _mm256_and_ps(in_y1, in_x0);
  c.in[3] = _mm256_and_ps(in_y1, in_x1);
  const __m256i pixel = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_cvttps_epi32(y0), lv.w_int), _mm256_cvttps_epi32(x0));
  c.offset = _mm256_mullo_epi32(_mm256_add_epi32(pixel, lv.start), _mm256_set1_epi32(row_stride));
  return c;
}

// The bilinear weights of the four corners, as corner_weights computes them
// (scale 1), before masking.
inline void corner_weights8(const Cells8& c, __m256 (&w)[4]) {
  w[0] = _mm256_mul_ps(c.hy, c.hx);
  w[1] = _mm256_mul_ps(c.hy, c.lx);
  w[2] = _mm256_mul_ps(c.ly, c.hx);
  w[3] = _mm256_mul_ps(c.ly, c.lx);
}

// Forward taps of eight points whose (x, y) pairs are the 16 floats at `loc`.
inline void bilinear_taps8(const float* loc, const float* attn, const LevelLanes8& lv, int32_t row_stride, Taps8& t) {
  const Cells8 c = bilinear_cells8(loc, loc + 8, lv, row_stride);
  __m256 w[4];
  corner_weights8(c, w);
  const __m256 attn8 = _mm256_loadu_ps(attn);
  for (int k = 0; k < 4; ++k) {
    _mm256_store_ps(t.weight[k], _mm256_mul_ps(attn8, _mm256_and_ps(w[k], c.in[k])));  // a * w, or a * 0
    t.inside[k] = static_cast<unsigned>(_mm256_movemask_ps(c.in[k]));
  }
  _mm256_store_si256(reinterpret_cast<__m256i*>(t.offset), c.offset);
}

// Backward taps of points 0-3 at `lo` and 4-7 at `hi` (8 floats each).
inline void bilinear_grad_taps8(const float* lo, const float* hi, const LevelLanes8& lv, int32_t row_stride, GradTaps8& t) {
  const Cells8 c = bilinear_cells8(lo, hi, lv, row_stride);
  __m256 w[4];
  corner_weights8(c, w);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 dx[4] = {_mm256_xor_ps(c.hy, sign), c.hy, _mm256_xor_ps(c.ly, sign), c.ly};
  const __m256 dy[4] = {_mm256_xor_ps(c.hx, sign), _mm256_xor_ps(c.lx, sign), c.hx, c.lx};
  for (int k = 0; k < 4; ++k) {
    _mm256_store_ps(t.weight[k], _mm256_and_ps(w[k], c.in[k]));
    _mm256_store_ps(t.dweight_dx[k], _mm256_and_ps(dx[k], c.in[k]));
    _mm256_store_ps(t.dweight_dy[k], _mm256_and_ps(dy[k], c.in[k]));
    t.inside[k] = static_cast<unsigned>(_mm256_movemask_ps(c.in[k]));
  }
  _mm256_store_si256(reinterpret_cast<__m256i*>(t.offset), c.offset);
}

// Lane j of backward taps computed with row_stride 1 (offsets are pixel
// indices) as the scalar BilinearTaps of that point: the same struct,
// field for field, that bilinear_taps fills. W: the level's width.
inline BilinearTaps<float> lane_taps(const GradTaps8& t, int j, int64_t W) {
  BilinearTaps<float> r;
  const int64_t i = t.offset[j];
  const int64_t index[4] = {i, i + 1, i + W, i + W + 1};
  r.inside = 0u;
  for (int k = 0; k < 4; ++k) {
    const bool in = (t.inside[k] >> j) & 1u;
    r.index[k] = in ? index[k] : 0;
    r.weight[k] = t.weight[k][j];
    r.dweight_dx[k] = t.dweight_dx[k][j];
    r.dweight_dy[k] = t.dweight_dy[k][j];
    r.inside |= in ? (1u << k) : 0u;
  }
  return r;
}

}  // namespace
}  // namespace ddetr
