// Picks the CPU kernel build for this processor, once.
#include <stdexcept>

#include "ddetr/msda.h"

namespace ddetr {
namespace baseline {
void forward(const MsdaForwardParams& p);
void backward(const MsdaBackwardParams& p);
}  // namespace baseline
#ifdef DDETR_HAVE_ISA_AVX2
namespace avx2 {
void forward(const MsdaForwardParams& p);
void backward(const MsdaBackwardParams& p);
}  // namespace avx2
#endif

namespace {
bool use_avx2() {
#ifdef DDETR_HAVE_ISA_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

void check_cpu_dtype(DType t) {
  if (t != DType::kFloat32 && t != DType::kFloat64 && t != DType::kBFloat16)
    throw std::invalid_argument("value: dtype not supported on the CPU (float32, float64, bfloat16)");
}
}  // namespace

const char* msda_cpu_isa() { return use_avx2() ? "avx2" : "baseline"; }

void msda_forward_cpu(const MsdaForwardParams& p) {
  check_cpu_dtype(p.dtype);
#ifdef DDETR_HAVE_ISA_AVX2
  if (use_avx2()) return avx2::forward(p);
#endif
  baseline::forward(p);
}

void msda_backward_cpu(const MsdaBackwardParams& p) {
  check_cpu_dtype(p.dtype);
#ifdef DDETR_HAVE_ISA_AVX2
  if (use_avx2()) return avx2::backward(p);
#endif
  baseline::backward(p);
}

}  // namespace ddetr
