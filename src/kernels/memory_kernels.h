#pragma once
// Memory kernels: a streaming read of a buffer on all threads, the yardstick for memory
// bandwidth (decoding reads every weight once per token). CPU version in kernels/cpu/memory.cpp.
#include <cstddef>

namespace subllm::kernels {

// Sum of x[0..n), read once on all threads, each its contiguous part as two streams (as the
// matrix-vector products read W). Bound by loads rather than by the latency of one addition
// chain, so timing it measures read bandwidth.
double read_sum(const float* x, size_t n);

}  // namespace subllm::kernels
