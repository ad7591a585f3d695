#pragma once
// Picking tokens from a row of logits on the host (greedy decoding and top-k sampling read
// the whole vocabulary every token). CPU implementations in kernels/cpu/select.cpp.
#include <cstdint>

namespace subllm::kernels {

// The first index of the largest of x[0..n) (what std::max_element gives, NaN included).
int32_t argmax(const float* x, int n);

// ids[0..k) = the indexes of the k highest of x[0..n) (1 <= k <= n), highest first, a tie
// ordered by the lower index: the first k of every index sorted that way.
void top_k(const float* x, int n, int k, int32_t* ids);

}  // namespace subllm::kernels
