// Sharing rows among threads only when there is enough of them: decoding calls the small
// row kernels (norms, rotations, SwiGLU, row gathers) with one row, where entering a parallel
// region, even one of a single thread, costs more than the row itself.
#pragma once

#include <cstdint>

namespace subllm::kernels {

// body(r) for r in [0, n): split statically among the threads when `share`, else all on the
// calling thread without a parallel region.
template <class Body>
inline void for_rows(int64_t n, bool share, Body body) {
  if (!share) {
    for (int64_t r = 0; r < n; ++r) body(r);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) body(r);
}

}  // namespace subllm::kernels
