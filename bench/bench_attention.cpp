// Causal attention throughput at the production head size (hd = 64, H = 8, B = 1) on the
// fused qkv layout, plus evidence that the kernel's memory does not grow like T^2.
// Run with OMP_NUM_THREADS set to the core count.
#include <benchmark/benchmark.h>
#include <omp.h>
#include <sys/resource.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "kernels/kernels.h"

namespace {

using namespace subllm::kernels;

constexpr int kB = 1, kH = 8, kHd = 64, kC = kH * kHd;

long max_rss_bytes() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss * 1024L;  // Linux reports KiB
}

std::vector<float> filled(size_t n, uint32_t seed) {
  std::vector<float> v(n);
  uint32_t s = seed;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = (float)((s >> 8) * (1.0 / 16777216.0) * 2.0 - 1.0);
  }
  return v;
}

// Causal FLOPs: QK^T and PV, each 2 * T^2/2 * hd per head.
double forward_flops(int T) { return 2.0 * T * (double)T * kHd * kH * kB; }

void BM_AttentionForward(benchmark::State& state) {
  const int T = (int)state.range(0);
  const size_t N = (size_t)kB * T;
  const long rss0 = max_rss_bytes();
  std::vector<float> qkv = filled(N * 3 * kC, 1), o(N * kC, 0.0f), lse((size_t)kB * kH * T, 0.0f);
  auto scratch = subllm::cpu_backend().alloc_shared(subllm::cpu_backend().attention_scratch_bytes(kB, T, kH, kHd, false));
  const long rss1 = max_rss_bytes();
  for (auto _ : state) {
    attention_forward(qkv.data(), qkv.data() + kC, qkv.data() + 2 * kC, 3 * kC, o.data(), kC, lse.data(), kB, T, kH,
                      kH, kHd, static_cast<float*>(scratch.get()));
    benchmark::ClobberMemory();
  }
  const long rss2 = max_rss_bytes();
  state.counters["GFLOP/s"] =
      benchmark::Counter(forward_flops(T) * (double)state.iterations() * 1e-9, benchmark::Counter::kIsRate);
  state.counters["scratch_bytes"] = (double)(attention_scratch_bytes(kHd, false) * omp_get_max_threads());
  state.counters["io_bytes"] = (double)((qkv.size() + o.size() + lse.size()) * sizeof(float));
  state.counters["rss_growth_setup"] = (double)(rss1 - rss0);
  state.counters["rss_growth_kernel"] = (double)(rss2 - rss1);
}

void BM_AttentionForwardBackward(benchmark::State& state) {
  const int T = (int)state.range(0);
  const size_t N = (size_t)kB * T;
  const long rss0 = max_rss_bytes();
  std::vector<float> qkv = filled(N * 3 * kC, 1), dout = filled(N * kC, 2), o(N * kC, 0.0f),
                     lse((size_t)kB * kH * T, 0.0f), dqkv(N * 3 * kC, 0.0f);
  auto scratch = subllm::cpu_backend().alloc_shared(subllm::cpu_backend().attention_scratch_bytes(kB, T, kH, kHd, true));
  float* sp = static_cast<float*>(scratch.get());
  const long rss1 = max_rss_bytes();
  for (auto _ : state) {
    attention_forward(qkv.data(), qkv.data() + kC, qkv.data() + 2 * kC, 3 * kC, o.data(), kC, lse.data(), kB, T, kH,
                      kH, kHd, sp);
    attention_backward(qkv.data(), qkv.data() + kC, qkv.data() + 2 * kC, 3 * kC, o.data(), kC, dout.data(),
                       lse.data(), dqkv.data(), dqkv.data() + kC, dqkv.data() + 2 * kC, 3 * kC, kB, T, kH, kH, kHd, sp);
    benchmark::ClobberMemory();
  }
  const long rss2 = max_rss_bytes();
  // Backward is 2.5x the forward: S recomputed, then dV, dP, dQ, dK.
  state.counters["GFLOP/s"] =
      benchmark::Counter(3.5 * forward_flops(T) * (double)state.iterations() * 1e-9, benchmark::Counter::kIsRate);
  state.counters["scratch_bytes"] = (double)(attention_scratch_bytes(kHd, true) * omp_get_max_threads());
  state.counters["io_bytes"] =
      (double)((qkv.size() + dout.size() + o.size() + lse.size() + dqkv.size()) * sizeof(float));
  state.counters["rss_growth_setup"] = (double)(rss1 - rss0);
  state.counters["rss_growth_kernel"] = (double)(rss2 - rss1);
}

// T = 4096 runs first in each family so its peak-RSS growth is not hidden by an earlier,
// larger high-water mark. A T x T score matrix per head would add 8 * 64 MiB here.
BENCHMARK(BM_AttentionForward)->Arg(4096)->Arg(512)->Arg(1024)->Arg(2048)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_AttentionForwardBackward)
    ->Arg(4096)
    ->Arg(512)
    ->Arg(1024)
    ->Arg(2048)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
