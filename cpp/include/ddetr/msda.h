// Multi-scale deformable attention: the plain parameter structs shared by the
// CPU and CUDA kernels and the pybind11 entry point. No framework types here.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ddetr {

constexpr int kMaxLevels = 16;

// Element type of value / output / grad_output. Sampling locations, attention
// weights and every gradient buffer use the accumulation type: double for
// kFloat64, float otherwise.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

struct MsdaShape {
  int64_t batch = 0;        // N
  int64_t num_keys = 0;     // S = sum_l H_l * W_l
  int64_t num_heads = 0;    // M
  int64_t channels = 0;     // D
  int64_t num_queries = 0;  // Lq
  int64_t num_levels = 0;   // L
  int64_t num_points = 0;   // P
  // Level geometry, by value (validated on the host, so kernels never read
  // shapes from memory they were not given).
  int64_t level_h[kMaxLevels] = {};
  int64_t level_w[kMaxLevels] = {};
  int64_t level_start[kMaxLevels] = {};
};

struct MsdaForwardParams {
  MsdaShape shape;
  DType dtype = DType::kFloat32;
  const void* value = nullptr;          // [N, S, M, D]            dtype
  const void* sampling_loc = nullptr;   // [N, Lq, M, L, P, 2]    acc  (x, y) in [0, 1]
  const void* attn_weight = nullptr;    // [N, Lq, M, L, P]       acc
  void* output = nullptr;               // [N, Lq, M, D]           dtype (fully written)
  int num_threads = 1;                  // CPU only
  int device = 0;                       // CUDA only
  void* stream = nullptr;               // CUDA only: cudaStream_t of the caller
};

struct MsdaBackwardParams {
  MsdaShape shape;
  DType dtype = DType::kFloat32;
  const void* value = nullptr;          // [N, S, M, D]            dtype
  const void* sampling_loc = nullptr;   // [N, Lq, M, L, P, 2]    acc
  const void* attn_weight = nullptr;    // [N, Lq, M, L, P]       acc
  const void* grad_output = nullptr;    // [N, Lq, M, D]           dtype
  void* grad_value = nullptr;           // [N, S, M, D]            acc, zero-filled by the caller
                                        //   (CUDA: may be nullptr, then only grad_loc / grad_attn are computed)
  void* grad_loc = nullptr;             // [N, Lq, M, L, P, 2]    acc (fully written)
  void* grad_attn = nullptr;            // [N, Lq, M, L, P]       acc (fully written)
  int num_threads = 1;
  int device = 0;
  void* stream = nullptr;
};

// CPU (OpenMP), on the widest compiled instruction set this processor runs, or
// a narrower one named by $DDETR_CPU_ISA / msda_set_cpu_isa (cpu_dispatch.cpp).
void msda_forward_cpu(const MsdaForwardParams& p);
void msda_backward_cpu(const MsdaBackwardParams& p);
const char* msda_cpu_isa();                                  // the build in use
std::vector<std::string> msda_cpu_isas(bool runnable_only);  // compiled builds, widest first
const char* msda_set_cpu_isa(const std::string& name);       // returns the build chosen

#ifdef DDETR_WITH_CUDA
// CUDA. Throw std::runtime_error on a CUDA error (the message names the call).
void msda_forward_cuda(const MsdaForwardParams& p);
void msda_backward_cuda(const MsdaBackwardParams& p);
int cuda_device_count();
// Empty when a device is usable; otherwise the CUDA error text (a driver too
// old for the runtime these kernels were built with, no driver, no device).
std::string cuda_unavailable_reason();
#endif

}  // namespace ddetr
