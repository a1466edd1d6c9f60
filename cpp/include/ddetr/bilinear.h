// Bilinear sampling math shared by the CPU and CUDA kernels.
//
// A sampling location (x, y) in [0, 1] maps to the pixel coordinate
// (x * W - 0.5, y * H - 0.5) (align_corners=False). Its four corners are
// (y0, x0), (y0, x1), (y1, x0), (y1, x1) with y1 = y0 + 1, x1 = x0 + 1; a corner
// outside the map contributes zero. A location whose coordinate is NaN, +-inf or
// lies wholly outside (-1, H) x (-1, W) contributes zero and has zero gradient:
// every comparison below is false for NaN, so it never reaches an index.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DDETR_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#define DDETR_UNROLL _Pragma("unroll")
#else
#define DDETR_HOST_DEVICE_INLINE inline
#define DDETR_UNROLL
#endif

namespace ddetr {

template <typename acc_t>
struct BilinearTaps {
  int64_t index[4];   // pixel index inside the level (y * W + x); 0 for a corner outside
  acc_t weight[4];    // bilinear weight; 0 for a corner outside
  acc_t dweight_dx[4];  // d weight / d x_pixel
  acc_t dweight_dy[4];  // d weight / d y_pixel
  unsigned inside;    // bit c set when corner c lies inside the map
};

// The cell a location falls in: its top-left corner (x0, y0), the fraction
// (lx, ly) of the way to the next pixel, and which of its rows and columns lie
// inside the map.
template <typename acc_t>
struct BilinearCell {
  int64_t x0, y0;  // in [-1, W - 1] x [-1, H - 1]
  acc_t lx, ly;    // in [0, 1)
  bool in_x0, in_x1, in_y0, in_y1;  // column x0 / x0 + 1, row y0 / y0 + 1 inside the map
};

// Fills `c` for a location; returns false when the location contributes
// nothing (outside the map, or not finite), and `c` is then not filled. H, W >= 1.
template <typename acc_t>
DDETR_HOST_DEVICE_INLINE bool bilinear_cell(acc_t loc_x, acc_t loc_y, int64_t H, int64_t W, BilinearCell<acc_t>& c) {
  const acc_t x = loc_x * static_cast<acc_t>(W) - static_cast<acc_t>(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(H) - static_cast<acc_t>(0.5);
  if (!(x > static_cast<acc_t>(-1) && y > static_cast<acc_t>(-1) &&
        x < static_cast<acc_t>(W) && y < static_cast<acc_t>(H))) {
    return false;
  }
  const acc_t xf = floor(x);
  const acc_t yf = floor(y);
  c.x0 = static_cast<int64_t>(xf);
  c.y0 = static_cast<int64_t>(yf);
  c.lx = x - xf;
  c.ly = y - yf;
  c.in_x0 = c.x0 >= 0;
  c.in_x1 = c.x0 + 1 <= W - 1;
  c.in_y0 = c.y0 >= 0;
  c.in_y1 = c.y0 + 1 <= H - 1;
  return true;
}

// Bilinear weights of the corners (y0, x0), (y0, x1), (y1, x0), (y1, x1) of a
// cell, each times `scale`; 0 for a corner outside the map. One formula for
// every kernel (bilinear_taps too, with scale 1), so all of them round alike:
// a kernel that folds the attention weight in gets a * (hy * hx) either way.
template <typename acc_t>
DDETR_HOST_DEVICE_INLINE void corner_weights(acc_t lx, acc_t ly, bool in_x0, bool in_x1, bool in_y0, bool in_y1,
                                             acc_t scale, acc_t (&w)[4]) {
  const acc_t hx = static_cast<acc_t>(1) - lx, hy = static_cast<acc_t>(1) - ly;
  w[0] = in_y0 && in_x0 ? scale * (hy * hx) : static_cast<acc_t>(0);
  w[1] = in_y0 && in_x1 ? scale * (hy * lx) : static_cast<acc_t>(0);
  w[2] = in_y1 && in_x0 ? scale * (ly * hx) : static_cast<acc_t>(0);
  w[3] = in_y1 && in_x1 ? scale * (ly * lx) : static_cast<acc_t>(0);
}

// Fills `taps` for a location; returns false when the location contributes
// nothing (outside the map, or not finite). H, W >= 1.
template <typename acc_t>
DDETR_HOST_DEVICE_INLINE bool bilinear_taps(acc_t loc_x, acc_t loc_y, int64_t H, int64_t W,
                                            BilinearTaps<acc_t>& t) {
  BilinearCell<acc_t> c;
  if (!bilinear_cell(loc_x, loc_y, H, W, c)) return false;
  const int64_t x0 = c.x0, y0 = c.y0, x1 = x0 + 1, y1 = y0 + 1;
  const acc_t lx = c.lx, ly = c.ly;
  const acc_t hx = static_cast<acc_t>(1) - lx, hy = static_cast<acc_t>(1) - ly;
  const bool in[4] = {c.in_y0 && c.in_x0, c.in_y0 && c.in_x1, c.in_y1 && c.in_x0, c.in_y1 && c.in_x1};
  const int64_t idx[4] = {y0 * W + x0, y0 * W + x1, y1 * W + x0, y1 * W + x1};
  const acc_t dwx[4] = {-hy, hy, -ly, ly};
  const acc_t dwy[4] = {-hx, -lx, hx, lx};
  corner_weights(lx, ly, c.in_x0, c.in_x1, c.in_y0, c.in_y1, static_cast<acc_t>(1), t.weight);  // 1 * w: exact
  t.inside = 0u;
DDETR_UNROLL
  for (int k = 0; k < 4; ++k) {
    t.index[k] = in[k] ? idx[k] : 0;
    t.dweight_dx[k] = in[k] ? dwx[k] : static_cast<acc_t>(0);
    t.dweight_dy[k] = in[k] ? dwy[k] : static_cast<acc_t>(0);
    t.inside |= in[k] ? (1u << k) : 0u;
  }
  return t.inside != 0u;  // always true: inside (-1, H) x (-1, W) a row and a column are inside
}

}  // namespace ddetr
