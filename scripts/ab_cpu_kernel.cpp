// Times two builds of the CPU kernel (cpp/msda_cpu.cpp from two revisions,
// compiled into the namespaces `va` and `vb`) on the same inputs, alternating
// A and B call by call, and compares their outputs bit for bit. Driven by
// scripts/ab_cpu_kernel.py, which writes the inputs and compiles this file.
//
//   ab_cpu_kernel DIR ROUNDS fwd|bwd THREADS
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "ddetr/msda.h"

namespace ddetr {
namespace va {
void forward(const MsdaForwardParams&);
void backward(const MsdaBackwardParams&);
}  // namespace va
namespace vb {
void forward(const MsdaForwardParams&);
void backward(const MsdaBackwardParams&);
}  // namespace vb
}  // namespace ddetr

using namespace ddetr;

namespace {

// The first 64-byte boundary of `v` (sized 16 floats over): where torch's CPU
// allocator puts a tensor's data, and where malloc's large blocks are not (a
// value row 16 bytes past a line boundary splits a line on every other load).
float* aligned64(std::vector<float>& v) {
  const auto p = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<float*>((p + 63) & ~uintptr_t{63});
}

// n floats from `path`, 64-byte aligned in `storage`.
const float* load(const std::string& path, size_t n, std::vector<float>& storage) {
  storage.assign(n + 16, 0.f);
  float* v = aligned64(storage);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr || std::fread(v, sizeof(float), n, f) != n) {
    std::fprintf(stderr, "ab_cpu_kernel: cannot read %zu floats from %s\n", n, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void compare(const char* name, const float* a, const float* b, size_t n) {
  double worst = 0;
  size_t unequal = 0;
  for (size_t i = 0; i < n; ++i) {
    worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - b[i]));
    unequal += a[i] != b[i];
  }
  std::printf("  %s: %zu elements differ, max |A - B| %.3g\n", name, unequal, worst);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: ab_cpu_kernel DIR ROUNDS fwd|bwd THREADS\n");
    return 2;
  }
  const std::string dir = argv[1];
  const int rounds = std::atoi(argv[2]), threads = std::atoi(argv[4]);
  const bool backward = std::string(argv[3]) == "bwd";

  // shape.txt: N S M D Lq L P, then H W start per level.
  MsdaShape s;
  FILE* f = std::fopen((dir + "/shape.txt").c_str(), "r");
  long long v[7];
  if (f == nullptr || std::fscanf(f, "%lld %lld %lld %lld %lld %lld %lld", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6]) != 7) return 2;
  s.batch = v[0], s.num_keys = v[1], s.num_heads = v[2], s.channels = v[3], s.num_queries = v[4], s.num_levels = v[5];
  s.num_points = v[6];
  for (int64_t l = 0; l < s.num_levels; ++l) {
    long long h, w, st;
    if (std::fscanf(f, "%lld %lld %lld", &h, &w, &st) != 3) return 2;
    s.level_h[l] = h, s.level_w[l] = w, s.level_start[l] = st;
  }
  std::fclose(f);

  const size_t nv = s.batch * s.num_keys * s.num_heads * s.channels;
  const size_t na = s.batch * s.num_queries * s.num_heads * s.num_levels * s.num_points;
  const size_t no = s.batch * s.num_queries * s.num_heads * s.channels;
  std::vector<float> inputs[4];
  const float* value = load(dir + "/value.bin", nv, inputs[0]);
  const float* loc = load(dir + "/loc.bin", 2 * na, inputs[1]);
  const float* attn = load(dir + "/attn.bin", na, inputs[2]);
  inputs[3].assign(no + 16, 1.0f);  // grad_out: ones, as `ddetr bench` feeds the backward
  const float* grad_out = aligned64(inputs[3]);
  std::vector<float> storage[4][2];  // output, grad_value, grad_loc, grad_attn of A and B
  float *out[2], *grad_value[2], *grad_loc[2], *grad_attn[2];
  for (int k = 0; k < 2; ++k) {
    const size_t sizes[4] = {no, nv, 2 * na, na};
    float** views[4] = {&out[k], &grad_value[k], &grad_loc[k], &grad_attn[k]};
    for (int i = 0; i < 4; ++i) {
      storage[i][k].assign(sizes[i] + 16, 0.f);
      *views[i] = aligned64(storage[i][k]);
    }
  }
  std::vector<double> times[2];

  for (int r = 0; r <= rounds; ++r) {  // round 0 warms both up, untimed
    for (int k = 0; k < 2; ++k) {
      const int which = (r + k) % 2;  // alternate which build goes first
      const double t0 = now_ms();
      if (!backward) {
        MsdaForwardParams p;
        p.shape = s, p.value = value, p.sampling_loc = loc, p.attn_weight = attn;
        p.output = out[which], p.num_threads = threads;
        which == 0 ? va::forward(p) : vb::forward(p);
      } else {
        std::fill(grad_value[which], grad_value[which] + nv, 0.f);
        MsdaBackwardParams p;
        p.shape = s, p.value = value, p.sampling_loc = loc, p.attn_weight = attn;
        p.grad_output = grad_out, p.grad_value = grad_value[which];
        p.grad_loc = grad_loc[which], p.grad_attn = grad_attn[which], p.num_threads = threads;
        which == 0 ? va::backward(p) : vb::backward(p);
      }
      if (r > 0) times[which].push_back(now_ms() - t0);
    }
  }
  for (auto& t : times) std::sort(t.begin(), t.end());
  const double a = times[0][times[0].size() / 2], b = times[1][times[1].size() / 2];
  std::printf("%s, %d threads, medians of %d: A %.1f ms, B %.1f ms (fastest %.1f / %.1f), B/A %.3f\n",
              backward ? "backward" : "forward", threads, rounds, a, b, times[0][0], times[1][0], b / a);
  if (!backward) {
    compare("output", out[0], out[1], no);
  } else {
    compare("grad_value", grad_value[0], grad_value[1], nv);
    compare("grad_loc", grad_loc[0], grad_loc[1], 2 * na);
    compare("grad_attn", grad_attn[0], grad_attn[1], na);
  }
  return 0;
}
