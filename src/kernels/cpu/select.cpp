#include "kernels/select_kernels.h"

#include <algorithm>
#include <numeric>

namespace subllm::kernels {

namespace {

constexpr int kScanBlock = 64;  // values tested at once before looking at them one by one

// Whether some value of x[b..e) is above `floor` (or equal to it, when `equal`).
inline bool any_at_least(const float* x, int b, int e, float floor, bool equal) {
  int hit = 0;
#pragma omp simd reduction(| : hit)
  for (int i = b; i < e; ++i) hit |= equal ? x[i] == floor : x[i] > floor;
  return hit != 0;
}

}  // namespace

int32_t argmax(const float* x, int n) {
  if (n <= 0) return 0;
  float mx = x[0];
  int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int i = 0; i < n; ++i) {
    mx = std::max(mx, x[i]);
    nan |= x[i] != x[i];
  }
  if (nan) return (int32_t)(std::max_element(x, x + n) - x);  // the comparisons' own rule for NaN
  for (int b = 0; b < n; b += kScanBlock) {
    const int e = std::min(n, b + kScanBlock);
    if (!any_at_least(x, b, e, mx, true)) continue;
    for (int i = b; i < e; ++i)
      if (x[i] == mx) return i;
  }
  return 0;
}

void top_k(const float* x, int n, int k, int32_t* ids) {
  auto higher = [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
  std::iota(ids, ids + k, 0);
  if (k == n) {
    std::sort(ids, ids + k, higher);
    return;
  }
  // One pass with a heap of the best so far, the lowest on top. A later index enters only
  // above the lowest's value (on a tie its larger index ranks it below), so blocks of values
  // without one are passed over at once.
  std::make_heap(ids, ids + k, higher);
  float floor = x[ids[0]];
  for (int b = k; b < n; b += kScanBlock) {
    const int e = std::min(n, b + kScanBlock);
    if (!any_at_least(x, b, e, floor, false)) continue;
    for (int i = b; i < e; ++i) {
      if (!(x[i] > floor)) continue;
      std::pop_heap(ids, ids + k, higher);
      ids[k - 1] = i;
      std::push_heap(ids, ids + k, higher);
      floor = x[ids[0]];
    }
  }
  std::sort_heap(ids, ids + k, higher);
}

}  // namespace subllm::kernels
