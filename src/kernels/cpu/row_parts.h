// Splitting a weight matrix's rows among threads for a product bound by reading W once
// (decoding's matrix-vector products).
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "kernels/cpu/team.h"

namespace subllm::kernels {

// Rows [0, rows) of a product that reads each row once: body(r0, r1) does rows [r0, r1) one at
// a time; pair(a, b, n) does rows a + i and b + i, i < n, in lockstep. Each thread owns a
// contiguous part of the rows and reads it as two streams, its two halves, front to back,
// `chunk` rows of each at a time through `pair`: a core with two streams to prefetch kept
// closer to the memory's read bandwidth (f32 rows on two cores: 68 against 63 GB/s; two
// streams within one chunk were slower than one). A thread done with its part takes chunks
// from the back of both halves of a part still running: a fixed split leaves a thread idle
// while its partner finishes (5-6 % of a decoding step's weight reads on two cores), because
// the two cores do not read memory at the same speed.
template <class Body, class Pair>
void for_row_parts(int rows, int chunk, Body body, Pair pair) {
  if (rows <= 0) return;
  chunk = std::max(1, chunk);
  const int max_threads = omp_get_max_threads();
  if (rows < 2 * chunk) {
    body(0, rows);
    return;
  }
  if (max_threads == 1) {
    const int half = rows / 2;
    pair(0, rows - half, half);
    if (rows % 2) body(half, half + 1);
    return;
  }
  // A half's rows still to do, [lo, hi), packed in one word: lo in the low half, hi in the high.
  struct alignas(64) Half {
    std::atomic<uint64_t> range;
  };
  static thread_local std::vector<Half> halves_store;
  if ((int)halves_store.size() < 2 * max_threads) halves_store = std::vector<Half>(2 * max_threads);
  Half* halves = halves_store.data();  // the calling thread's, shared with the team
  auto pack = [](uint32_t lo, uint32_t hi) { return (uint64_t)hi << 32 | lo; };
  // Takes up to `chunk` rows of a half, from its front or its back; false once it is empty.
  auto take = [&](Half& p, bool front, int& r0, int& r1) {
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
  // Part t of max_threads, its two halves, is thread t's. They are set before the threads
  // start (no barrier inside); a part without a thread (a smaller team) is left to stealing.
  for (int t = 0; t < max_threads; ++t) {
    const int64_t lo = (int64_t)rows * t / max_threads, hi = (int64_t)rows * (t + 1) / max_threads;
    const int64_t mid = lo + (hi - lo + 1) / 2;
    halves[2 * t].range.store(pack((uint32_t)lo, (uint32_t)mid), std::memory_order_relaxed);
    halves[2 * t + 1].range.store(pack((uint32_t)mid, (uint32_t)hi), std::memory_order_relaxed);
  }
  parallel([&] {
    const int t = omp_get_thread_num();
    // Thread u's halves, a chunk of each at a time (from the front of its own, from the back
    // of another's), as two streams while both last; false once both are empty.
    auto step = [&](int u, bool front) {
      int a0 = 0, a1 = 0, b0 = 0, b1 = 0;
      const bool got_a = take(halves[2 * u], front, a0, a1), got_b = take(halves[2 * u + 1], front, b0, b1);
      if (got_a && got_b) {
        const int n = std::min(a1 - a0, b1 - b0);
        pair(a0, b0, n);
        if (a0 + n < a1) body(a0 + n, a1);
        if (b0 + n < b1) body(b0 + n, b1);
      } else if (got_a) {
        body(a0, a1);
      } else if (got_b) {
        body(b0, b1);
      }
      return got_a || got_b;
    };
    while (step(t, true)) {
    }
    for (int k = 1; k < max_threads; ++k)
      while (step((t + k) % max_threads, false)) {
      }
  });
}

// Rows per chunk for rows of `row_bytes` bytes: about 32 KB, a few microseconds of reading.
inline int row_chunk(int64_t row_bytes) { return (int)std::max<int64_t>(1, (32 << 10) / std::max<int64_t>(1, row_bytes)); }

}  // namespace subllm::kernels
