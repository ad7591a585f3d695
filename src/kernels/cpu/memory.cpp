#include "kernels/memory_kernels.h"

#include <omp.h>

namespace subllm::kernels {

namespace {

// Sum of one block of 4096 floats: 64 independent partial sums (four vector accumulators), so
// the loop is bound by loads rather than by the latency of one addition chain.
float block_sum(const float* x) {
  float acc[64] = {};
  for (size_t i = 0; i < 4096; i += 64)
    for (int k = 0; k < 64; ++k) acc[k] += x[i + k];
  float s = 0.f;
  for (float v : acc) s += v;
  return s;
}

}  // namespace

double read_sum(const float* x, size_t n) {
  constexpr size_t kBlock = 4096;
  const size_t blocks = n / kBlock;
  double total = 0;
#pragma omp parallel reduction(+ : total)
  {
    // Each thread's contiguous part as two streams, its halves front to back a block of each in
    // turn, as the matrix-vector products read W (row_parts.h): a core with two streams reads
    // a few percent faster than with one, so the probe is the rate the products can reach.
    const size_t nt = (size_t)omp_get_num_threads(), t = (size_t)omp_get_thread_num();
    const size_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt, mid = b0 + (b1 - b0 + 1) / 2;
    for (size_t i = 0; b0 + i < mid; ++i) {
      total += block_sum(x + (b0 + i) * kBlock);
      if (mid + i < b1) total += block_sum(x + (mid + i) * kBlock);
    }
  }
  for (size_t i = blocks * kBlock; i < n; ++i) total += x[i];
  return total;
}

}  // namespace subllm::kernels
