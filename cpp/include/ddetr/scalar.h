// Storage types for 16-bit floats on the host, with exact conversions to float
// (round to nearest even on the way back). The CUDA kernels use cuda_bf16.h /
// cuda_fp16.h instead.
#pragma once
#include <cstdint>
#include <cstring>

namespace ddetr {

struct bf16_t {
  uint16_t bits;
};

inline float to_float(bf16_t v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline bf16_t from_float_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

template <typename scalar_t, typename acc_t>
struct Convert {
  static inline acc_t load(scalar_t v) { return static_cast<acc_t>(v); }
  static inline scalar_t store(acc_t v) { return static_cast<scalar_t>(v); }
};

template <>
struct Convert<bf16_t, float> {
  static inline float load(bf16_t v) { return to_float(v); }
  static inline bf16_t store(float v) { return from_float_bf16(v); }
};

}  // namespace ddetr
