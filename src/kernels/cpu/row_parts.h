// Splitting a weight matrix's rows among threads for a product bound by reading W once
// (decoding's matrix-vector products).
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace subllm::kernels {

// body(r0, r1) for rows [0, rows) split into one contiguous part per thread. Each thread
// streams its own part from the front, `chunk` rows at a time; one done with its part takes
// chunks from the back of a part still running. A fixed split leaves a thread idle while its
// partner finishes (5-6 % of a decoding step's weight reads on two cores), because the two
// streams do not read memory at the same speed.
template <class Body>
void for_row_parts(int rows, int chunk, Body body) {
  if (rows <= 0) return;
  chunk = std::max(1, chunk);
  const int max_threads = omp_get_max_threads();
  if (max_threads == 1 || rows <= chunk) {
    body(0, rows);
    return;
  }
  // A part's rows still to do, [lo, hi), packed in one word: lo in the low half, hi in the high.
  struct alignas(64) Part {
    std::atomic<uint64_t> range;
  };
  static thread_local std::vector<Part> parts_store;
  if ((int)parts_store.size() < max_threads) parts_store = std::vector<Part>(max_threads);
  Part* parts = parts_store.data();  // the calling thread's, shared with the team
  auto pack = [](uint32_t lo, uint32_t hi) { return (uint64_t)hi << 32 | lo; };
  // Takes up to `chunk` rows of part p, from its front or its back; false once it is empty.
  auto take = [&](Part& p, bool front, int& r0, int& r1) {
    uint64_t cur = p.range.load(std::memory_order_relaxed);
    for (;;) {
      const uint32_t lo = (uint32_t)cur, hi = (uint32_t)(cur >> 32);
      if (lo >= hi) return false;
      const uint32_t n = std::min<uint32_t>((uint32_t)chunk, hi - lo);
      const uint64_t next = front ? pack(lo + n, hi) : pack(lo, hi - n);
      if (p.range.compare_exchange_weak(cur, next, std::memory_order_relaxed)) {
        r0 = (int)(front ? lo : hi - n);
        r1 = (int)(front ? lo + n : hi);
        return true;
      }
    }
  };
#pragma omp parallel
  {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    parts[t].range.store(pack((uint32_t)((int64_t)rows * t / nt), (uint32_t)((int64_t)rows * (t + 1) / nt)),
                         std::memory_order_relaxed);
#pragma omp barrier
    int r0 = 0, r1 = 0;
    while (take(parts[t], true, r0, r1)) body(r0, r1);
    for (int k = 1; k < nt; ++k)
      while (take(parts[(t + k) % nt], false, r0, r1)) body(r0, r1);
  }
}

// Rows per chunk for rows of `row_bytes` bytes: about 32 KB, a few microseconds of reading.
inline int row_chunk(int64_t row_bytes) { return (int)std::max<int64_t>(1, (32 << 10) / std::max<int64_t>(1, row_bytes)); }

}  // namespace subllm::kernels
