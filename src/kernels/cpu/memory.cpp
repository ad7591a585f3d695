#include "kernels/memory_kernels.h"

namespace subllm::kernels {

double read_sum(const float* x, size_t n) {
  constexpr size_t kBlock = 4096;
  const size_t full = n / kBlock * kBlock;
  double total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
  for (size_t b = 0; b < full; b += kBlock) {
    // 64 independent partial sums: four vector accumulators, so the loop is bound by
    // loads rather than by the latency of one addition chain.
    float acc[64] = {};
    for (size_t i = b; i < b + kBlock; i += 64)
      for (int k = 0; k < 64; ++k) acc[k] += x[i + k];
    float s = 0.f;
    for (float v : acc) s += v;
    total += s;
  }
  for (size_t i = full; i < n; ++i) total += x[i];
  return total;
}

}  // namespace subllm::kernels
