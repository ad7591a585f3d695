// Attention of new queries against a key/value cache (incremental decoding and chunked
// prefill): query i of m sees cache rows [0, L - m + i]. Decoding is bound by reading the
// cache, so each (head, query) streams its keys and values once.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/vec_math.h"
#include "kernels/kernels.h"

namespace subllm::kernels {

size_t attention_cached_scratch_floats(int L, int hd) { return (size_t)(L + 15) / 16 * 16 + (size_t)(hd + 15) / 16 * 16; }

namespace {

// Query i of m (head h) against cache rows [0, L - m + i]; s: (L) scores, acc: (hd).
inline void attend_row(const float* q, int ld_q, int m, const float* k, const float* v, int ld_kv, int L, int hd,
                       float* out, int ld_o, int h, int i, float scale, float* s, float* acc) {
  const float* qi = q + (int64_t)i * ld_q + h * hd;
  const int n = L - m + i + 1;
  float mx = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < n; ++j) {
    const float* kj = k + (int64_t)j * ld_kv + h * hd;
    float d = 0.f;
#pragma omp simd reduction(+ : d)
    for (int e = 0; e < hd; ++e) d += qi[e] * kj[e];
    s[j] = d * scale;
    mx = std::max(mx, s[j]);
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; ++j) {
    s[j] = exp_approx(s[j] - mx);
    sum += s[j];
  }
  std::fill(acc, acc + hd, 0.f);
  for (int j = 0; j < n; ++j) {
    const float* vj = v + (int64_t)j * ld_kv + h * hd;
    const float p = s[j];
#pragma omp simd
    for (int e = 0; e < hd; ++e) acc[e] += p * vj[e];
  }
  float* o = out + (int64_t)i * ld_o + h * hd;
  const float inv = 1.0f / sum;
  for (int e = 0; e < hd; ++e) o[e] = acc[e] * inv;
}

}  // namespace

// q: (m, ld_q), k/v cache: (L, ld_kv), out: (m, ld_o); heads at columns [h*hd, (h+1)*hd).
void attention_cached(const float* q, int ld_q, int m, const float* k, const float* v, int ld_kv, int L, int H, int hd,
                      float* out, int ld_o, float* scratch) {
  const float scale = 1.0f / std::sqrt((float)hd);
#pragma omp parallel
  {
    float* s = scratch + (size_t)omp_get_thread_num() * attention_cached_scratch_floats(L, hd);
    float* acc = s + (L + 15) / 16 * 16;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < m; ++i) attend_row(q, ld_q, m, k, v, ld_kv, L, hd, out, ld_o, h, i, scale, s, acc);
  }
}

void attention_cached_many(const CachedAttentionItem* items, int count, int max_L, int H, int hd, float* scratch) {
  const float scale = 1.0f / std::sqrt((float)hd);
  // One parallel region for every sequence: each thread takes (head, query) pairs of one
  // sequence after another without waiting at the end of each.
#pragma omp parallel
  {
    float* s = scratch + (size_t)omp_get_thread_num() * attention_cached_scratch_floats(max_L, hd);
    float* acc = s + (max_L + 15) / 16 * 16;
    for (int b = 0; b < count; ++b) {
      const CachedAttentionItem& it = items[b];
#pragma omp for collapse(2) schedule(dynamic, 1) nowait
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < it.m; ++i)
          attend_row(it.q, it.ld_q, it.m, it.k, it.v, it.ld_kv, it.L, hd, it.out, it.ld_o, h, i, scale, s, acc);
    }
  }
}

}  // namespace subllm::kernels
