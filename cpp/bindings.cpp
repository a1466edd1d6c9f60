// pybind11 entry point. Python passes raw data pointers with their element
// counts, the sizes, the level geometry and (on CUDA) the stream; this file
// checks all of it before any kernel sees a pointer, fills the params struct
// and dispatches. A bad call raises ValueError naming the argument.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ddetr/msda.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using ddetr::DType;

namespace {

using Buffer = std::pair<uintptr_t, int64_t>;  // (data pointer, element count)
using Buffers = std::map<std::string, Buffer>;

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float64") return DType::kFloat64;
  if (name == "bfloat16") return DType::kBFloat16;
  if (name == "float16") return DType::kFloat16;
  fail("dtype: unsupported '" + name + "' (float32, float64, bfloat16, float16)");
}

int64_t elem_size(DType t) { return t == DType::kFloat64 ? 8 : (t == DType::kFloat32 ? 4 : 2); }
int64_t acc_size(DType t) { return t == DType::kFloat64 ? 8 : 4; }

int64_t checked_mul(std::initializer_list<int64_t> xs, const char* what) {
  int64_t r = 1;
  for (int64_t x : xs) {
    if (__builtin_mul_overflow(r, x, &r)) fail(std::string(what) + ": size overflows int64");
  }
  return r;
}

ddetr::MsdaShape make_shape(const std::vector<int64_t>& sizes,
                            const std::vector<std::pair<int64_t, int64_t>>& spatial_shapes,
                            const std::vector<int64_t>& level_start) {
  if (sizes.size() != 7) fail("sizes: expected (N, S, M, D, Lq, L, P)");
  ddetr::MsdaShape s;
  s.batch = sizes[0];
  s.num_keys = sizes[1];
  s.num_heads = sizes[2];
  s.channels = sizes[3];
  s.num_queries = sizes[4];
  s.num_levels = sizes[5];
  s.num_points = sizes[6];
  const char* names[7] = {"N (batch)", "S (keys)", "M (heads)", "D (channels)", "Lq (queries)", "L (levels)", "P (points)"};
  for (int i = 0; i < 7; ++i) {
    const bool may_be_zero = (i == 0 || i == 4);
    if (sizes[i] < 0 || (!may_be_zero && sizes[i] == 0))
      fail(std::string("sizes: ") + names[i] + " must be " + (may_be_zero ? ">= 0" : ">= 1") + ", got " + std::to_string(sizes[i]));
  }
  if (s.num_levels > ddetr::kMaxLevels)
    fail("spatial_shapes: at most " + std::to_string(ddetr::kMaxLevels) + " levels, got " + std::to_string(s.num_levels));
  if (static_cast<int64_t>(spatial_shapes.size()) != s.num_levels)
    fail("spatial_shapes: expected " + std::to_string(s.num_levels) + " levels, got " + std::to_string(spatial_shapes.size()));
  if (static_cast<int64_t>(level_start.size()) != s.num_levels)
    fail("level_start_index: expected " + std::to_string(s.num_levels) + " entries, got " + std::to_string(level_start.size()));
  int64_t total = 0;
  for (int64_t l = 0; l < s.num_levels; ++l) {
    const auto [h, w] = spatial_shapes[l];
    if (h < 1 || w < 1) fail("spatial_shapes: level " + std::to_string(l) + " has a non-positive size");
    if (level_start[l] != total)
      fail("level_start_index: entry " + std::to_string(l) + " is " + std::to_string(level_start[l]) +
           ", expected " + std::to_string(total) + " (cumulative H*W)");
    s.level_h[l] = h;
    s.level_w[l] = w;
    s.level_start[l] = total;
    int64_t hw = checked_mul({h, w}, "spatial_shapes");
    if (__builtin_add_overflow(total, hw, &total)) fail("spatial_shapes: total size overflows int64");
  }
  if (total != s.num_keys)
    fail("value: S = " + std::to_string(s.num_keys) + " but spatial_shapes sum to " + std::to_string(total));
  return s;
}

const void* take(const Buffers& bufs, const char* name, int64_t expected_numel, int64_t elem_bytes) {
  auto it = bufs.find(name);
  if (it == bufs.end()) fail(std::string(name) + ": missing");
  const auto [ptr, numel] = it->second;
  if (numel != expected_numel)
    fail(std::string(name) + ": expected " + std::to_string(expected_numel) + " elements, got " + std::to_string(numel));
  if (numel > 0 && ptr == 0) fail(std::string(name) + ": null data pointer");
  if (ptr % static_cast<uintptr_t>(elem_bytes) != 0) fail(std::string(name) + ": data pointer is not aligned to its element size");
  return reinterpret_cast<const void*>(ptr);
}

struct Common {
  ddetr::MsdaShape shape;
  DType dtype;
  int64_t n_value, n_loc, n_attn, n_out;
};

Common common(const std::string& dtype, const std::vector<int64_t>& sizes,
              const std::vector<std::pair<int64_t, int64_t>>& spatial_shapes, const std::vector<int64_t>& level_start) {
  Common c;
  c.dtype = parse_dtype(dtype);
  c.shape = make_shape(sizes, spatial_shapes, level_start);
  const auto& s = c.shape;
  c.n_value = checked_mul({s.batch, s.num_keys, s.num_heads, s.channels}, "value");
  c.n_attn = checked_mul({s.batch, s.num_queries, s.num_heads, s.num_levels, s.num_points}, "attention_weights");
  c.n_loc = checked_mul({c.n_attn, 2}, "sampling_locations");
  c.n_out = checked_mul({s.batch, s.num_queries, s.num_heads, s.channels}, "output");
  return c;
}

void check_device(const std::string& device, int device_index) {
  if (device == "cpu") return;
  if (device != "cuda") fail("device: expected 'cpu' or 'cuda', got '" + device + "'");
#ifdef DDETR_WITH_CUDA
  const int count = ddetr::cuda_device_count();
  if (device_index < 0 || device_index >= count) {
    const std::string why = count == 0 ? ddetr::cuda_unavailable_reason() : std::string();
    fail("device: CUDA device " + std::to_string(device_index) + " does not exist (" + std::to_string(count) + " visible" +
         (why.empty() ? std::string() : ": " + why) + ")");
  }
#else
  (void)device_index;
  throw std::runtime_error("device: this build of ddetr has no CUDA kernels");
#endif
}

int threads(int num_threads) {
  if (num_threads < 1) fail("num_threads: must be >= 1");
  return num_threads;
}

using SpatialShapes = std::vector<std::pair<int64_t, int64_t>>;

// Checks the device, sizes and the three input buffers, and fills the fields
// the forward and backward params share. Sets `c` for the caller's own buffers.
template <typename Params>
Params prepare(const std::string& device, int device_index, const std::string& dtype, const std::vector<int64_t>& sizes,
               const SpatialShapes& spatial_shapes, const std::vector<int64_t>& level_start, const Buffers& buffers,
               uintptr_t stream, int num_threads, Common& c) {
  check_device(device, device_index);
  c = common(dtype, sizes, spatial_shapes, level_start);
  Params p;
  p.shape = c.shape;
  p.dtype = c.dtype;
  p.value = take(buffers, "value", c.n_value, elem_size(c.dtype));
  p.sampling_loc = take(buffers, "sampling_locations", c.n_loc, acc_size(c.dtype));
  p.attn_weight = take(buffers, "attention_weights", c.n_attn, acc_size(c.dtype));
  p.num_threads = threads(num_threads);
  p.device = device_index;
  p.stream = reinterpret_cast<void*>(stream);
  return p;
}

void* take_mut(const Buffers& bufs, const char* name, int64_t expected_numel, int64_t elem_bytes) {
  return const_cast<void*>(take(bufs, name, expected_numel, elem_bytes));
}

void forward(const std::string& device, int device_index, const std::string& dtype, const std::vector<int64_t>& sizes,
             const SpatialShapes& spatial_shapes, const std::vector<int64_t>& level_start, const Buffers& buffers,
             uintptr_t stream, int num_threads) {
  Common c;
  auto p = prepare<ddetr::MsdaForwardParams>(device, device_index, dtype, sizes, spatial_shapes, level_start, buffers,
                                             stream, num_threads, c);
  p.output = take_mut(buffers, "output", c.n_out, elem_size(c.dtype));
  if (c.n_out == 0) return;
  py::gil_scoped_release nogil;
  if (device == "cpu") {
    ddetr::msda_forward_cpu(p);
  } else {
#ifdef DDETR_WITH_CUDA
    ddetr::msda_forward_cuda(p);
#endif
  }
}

void backward(const std::string& device, int device_index, const std::string& dtype, const std::vector<int64_t>& sizes,
              const SpatialShapes& spatial_shapes, const std::vector<int64_t>& level_start, const Buffers& buffers,
              uintptr_t stream, int num_threads) {
  Common c;
  auto p = prepare<ddetr::MsdaBackwardParams>(device, device_index, dtype, sizes, spatial_shapes, level_start, buffers,
                                              stream, num_threads, c);
  const int64_t es = elem_size(c.dtype), as = acc_size(c.dtype);
  p.grad_output = take(buffers, "grad_output", c.n_out, es);
  // On CUDA grad_value may be left out: the kernel then skips its atomics and
  // the caller adds grad_value up itself (deterministic mode).
  const bool without_grad_value = device == "cuda" && buffers.find("grad_value") == buffers.end();
  p.grad_value = without_grad_value ? nullptr : take_mut(buffers, "grad_value", c.n_value, as);
  p.grad_loc = take_mut(buffers, "grad_sampling_locations", c.n_loc, as);
  p.grad_attn = take_mut(buffers, "grad_attention_weights", c.n_attn, as);
  if (c.n_attn == 0) return;
  py::gil_scoped_release nogil;
  if (device == "cpu") {
    ddetr::msda_backward_cpu(p);
  } else {
#ifdef DDETR_WITH_CUDA
    ddetr::msda_backward_cuda(p);
#endif
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddetr compiled core: multi-scale deformable attention kernels (OpenMP CPU, optional CUDA)";
  m.def("forward", &forward, py::arg("device"), py::arg("device_index"), py::arg("dtype"), py::arg("sizes"),
        py::arg("spatial_shapes"), py::arg("level_start"), py::arg("buffers"), py::arg("stream") = 0,
        py::arg("num_threads") = 1);
  m.def("backward", &backward, py::arg("device"), py::arg("device_index"), py::arg("dtype"), py::arg("sizes"),
        py::arg("spatial_shapes"), py::arg("level_start"), py::arg("buffers"), py::arg("stream") = 0,
        py::arg("num_threads") = 1);
  m.def("has_cuda", []() {
#ifdef DDETR_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_device_count", []() {
#ifdef DDETR_WITH_CUDA
    return ddetr::cuda_device_count();
#else
    return 0;
#endif
  });
  m.def("cuda_unavailable_reason", []() {
#ifdef DDETR_WITH_CUDA
    return ddetr::cuda_unavailable_reason();
#else
    return std::string("this build of ddetr has no CUDA kernels");
#endif
  });
  m.def("has_openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def("max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.def("cpu_isa", &ddetr::msda_cpu_isa);
  m.def("cpu_isas", &ddetr::msda_cpu_isas, py::arg("runnable") = false);
  m.def("set_cpu_isa", &ddetr::msda_set_cpu_isa, py::arg("name"));
  m.attr("MAX_LEVELS") = ddetr::kMaxLevels;
}
