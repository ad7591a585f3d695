#pragma once
// One thread count for our kernels and for BLAS (both run on the same OpenMP pool).
namespace subllm {
void set_num_threads(int n);  // n <= 0: all cores
int num_threads();
}  // namespace subllm
