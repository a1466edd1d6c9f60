// Picks the CPU kernel build: the widest instruction set that was compiled and
// that this processor runs, unless DDETR_CPU_ISA (or set_cpu_isa) names a
// narrower one. A request can only lower the choice: one the build or the
// processor lacks falls back to the widest available below it, with one
// warning line on stderr; a name that is no instruction set is an error.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "ddetr/msda.h"

#define DDETR_DECLARE_CPU_BUILD(isa)          \
  namespace isa {                             \
  void forward(const MsdaForwardParams& p);   \
  void backward(const MsdaBackwardParams& p); \
  }

namespace ddetr {
DDETR_DECLARE_CPU_BUILD(baseline)
#ifdef DDETR_HAVE_ISA_AVX2
DDETR_DECLARE_CPU_BUILD(avx2)
#endif
#ifdef DDETR_HAVE_ISA_AVX512
DDETR_DECLARE_CPU_BUILD(avx512)
#endif
#ifdef DDETR_HAVE_ISA_AVX512BF16
DDETR_DECLARE_CPU_BUILD(avx512bf16)
#endif

namespace {

struct CpuBuild {
  const char* name;
  void (*forward)(const MsdaForwardParams&);
  void (*backward)(const MsdaBackwardParams&);
  bool (*runs)();  // this processor (and OS) supports the instruction set
};

#if defined(DDETR_HAVE_ISA_AVX512) || defined(DDETR_HAVE_ISA_AVX512BF16)
bool runs_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#endif

// Every name a request may use, widest first, compiled here or not.
const char* const kIsaNames[] = {"avx512bf16", "avx512", "avx2", "baseline"};
constexpr int kIsaCount = 4;

// The compiled builds, widest first; the baseline runs everywhere.
const CpuBuild kBuilds[] = {
#ifdef DDETR_HAVE_ISA_AVX512BF16
    {"avx512bf16", avx512bf16::forward, avx512bf16::backward,
     [] { return runs_avx512() && __builtin_cpu_supports("avx512bf16"); }},
#endif
#ifdef DDETR_HAVE_ISA_AVX512
    {"avx512", avx512::forward, avx512::backward, [] { return runs_avx512(); }},
#endif
#ifdef DDETR_HAVE_ISA_AVX2
    {"avx2", avx2::forward, avx2::backward,
     [] { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"); }},
#endif
    {"baseline", baseline::forward, baseline::backward, [] { return true; }},
};

int rank(const char* name) {
  for (int i = 0; i < kIsaCount; ++i)
    if (std::strcmp(kIsaNames[i], name) == 0) return i;
  return -1;
}

// The build for a request ("" or null: the widest that runs). `source` names
// the request in messages.
const CpuBuild& resolve(const char* request, const char* source) {
  const bool any = request == nullptr || *request == '\0';
  const int wanted = any ? 0 : rank(request);
  if (wanted < 0) {
    std::string names;
    for (const char* n : kIsaNames) names += (names.empty() ? "" : ", ") + std::string(n);
    throw std::invalid_argument(std::string(source) + ": unknown instruction set '" + request + "' (choose from " +
                                names + ")");
  }
  for (const CpuBuild& b : kBuilds) {
    if (rank(b.name) < wanted || !b.runs()) continue;
    if (!any && std::strcmp(b.name, request) != 0) {
      bool compiled = false;
      for (const CpuBuild& c : kBuilds) compiled = compiled || std::strcmp(c.name, request) == 0;
      std::fprintf(stderr, "ddetr: %s=%s is not available (%s); using %s\n", source, request,
                   compiled ? "this processor lacks it" : "not compiled into this build", b.name);
    }
    return b;
  }
  return kBuilds[sizeof(kBuilds) / sizeof(kBuilds[0]) - 1];  // unreachable: the baseline always runs
}

std::atomic<const CpuBuild*> g_build{nullptr};
std::mutex g_build_mutex;

// Resolved from DDETR_CPU_ISA on first use; an unknown name raises on every
// call until the variable is fixed (nothing is stored).
const CpuBuild& current() {
  const CpuBuild* b = g_build.load(std::memory_order_acquire);
  if (b != nullptr) return *b;
  std::lock_guard<std::mutex> lock(g_build_mutex);  // one warning line, however many threads ask
  b = g_build.load(std::memory_order_acquire);
  if (b == nullptr) {
    b = &resolve(std::getenv("DDETR_CPU_ISA"), "DDETR_CPU_ISA");
    g_build.store(b, std::memory_order_release);
  }
  return *b;
}

void check_cpu_dtype(DType t) {
  if (t != DType::kFloat32 && t != DType::kFloat64 && t != DType::kBFloat16)
    throw std::invalid_argument("value: dtype not supported on the CPU (float32, float64, bfloat16)");
}
}  // namespace

const char* msda_cpu_isa() { return current().name; }

std::vector<std::string> msda_cpu_isas(bool runnable_only) {
  std::vector<std::string> names;
  for (const CpuBuild& b : kBuilds)
    if (!runnable_only || b.runs()) names.emplace_back(b.name);
  return names;
}

const char* msda_set_cpu_isa(const std::string& name) {
  const CpuBuild& b = resolve(name.c_str(), "isa");
  std::lock_guard<std::mutex> lock(g_build_mutex);
  g_build.store(&b, std::memory_order_release);
  return b.name;
}

void msda_forward_cpu(const MsdaForwardParams& p) {
  check_cpu_dtype(p.dtype);
  current().forward(p);
}

void msda_backward_cpu(const MsdaBackwardParams& p) {
  check_cpu_dtype(p.dtype);
  current().backward(p);
}

}  // namespace ddetr
