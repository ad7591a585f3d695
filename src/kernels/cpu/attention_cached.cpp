// Attention of new queries against a key/value cache (incremental decoding and chunked
// prefill): query i of m sees cache rows [0, L - m + i]. Decoding is bound by reading the
// cache, so each (head, query) streams its keys and values once.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/vec_math.h"
#include "kernels/kernels.h"
#include "kernels/cpu/team.h"

namespace subllm::kernels {

size_t attention_cached_scratch_floats(int L, int hd) { return (size_t)(L + 15) / 16 * 16 + (size_t)(hd + 15) / 16 * 16; }

namespace {

// Query i of m (head h, reading key/value head kvh) against cache rows [0, L - m + i];
// s: (L) scores, acc: (hd).
inline void attend_row(const float* q, int ld_q, int m, const float* k, const float* v, int ld_kv, int L, int hd,
                       float* out, int ld_o, int h, int kvh, int i, float scale, float* s, float* acc) {
  const float* qi = q + (int64_t)i * ld_q + h * hd;
  const int n = L - m + i + 1;
  float mx = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < n; ++j) {
    const float* kj = k + (int64_t)j * ld_kv + kvh * hd;
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
    const float* vj = v + (int64_t)j * ld_kv + kvh * hd;
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
void attention_cached(const float* q, int ld_q, int m, const float* k, const float* v, int ld_kv, int L, int H,
                      int Hkv, int hd, float* out, int ld_o, float* scratch) {
  const int group = H / Hkv;  // query heads per key/value head
  const float scale = 1.0f / std::sqrt((float)hd);
  parallel([&] {
    float* s = scratch + (size_t)omp_get_thread_num() * attention_cached_scratch_floats(L, hd);
    float* acc = s + (L + 15) / 16 * 16;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < m; ++i) attend_row(q, ld_q, m, k, v, ld_kv, L, hd, out, ld_o, h, h / group, i, scale, s, acc);
  });
}

size_t attention_cached_many_scratch_floats(int max_L, int H, int hd) {
  return std::max(attention_cached_scratch_floats(max_L, hd),
                  (size_t)H * ((max_L + 15) / 16 * 16) + (size_t)(H * hd + 15) / 16 * 16 + (size_t)(H + 15) / 16 * 16);
}

namespace {

// Query i of m against cache rows [0, L - m + i] for every head at once, so each cached key
// and value row is read whole and in order (one head's slice of a row is a 2 KiB stride
// apart at d 512). s: (H, Lp) scores, acc: (H * hd), inv: (H). Same arithmetic as attend_row.
void attend_row_all_heads(const CachedAttentionItem& it, int H, int Hkv, int hd, int i, float scale, float* s, int Lp,
                          float* acc, float* inv) {
  const int n = it.L - it.m + i + 1, C = H * hd;
  const float* qi = it.q + (int64_t)i * it.ld_q;
  for (int j = 0; j < n; ++j) {
    const float* kj = static_cast<const float*>(it.k) + (int64_t)j * it.ld_kv;
    for (int h = 0; h < H; ++h) {
      const float* qh = qi + h * hd;
      const float* kh = kj + (h / (H / Hkv)) * hd;
      float d = 0.f;
#pragma omp simd reduction(+ : d)
      for (int e = 0; e < hd; ++e) d += qh[e] * kh[e];
      s[(int64_t)h * Lp + j] = d * scale;
    }
  }
  for (int h = 0; h < H; ++h) {
    float* sh = s + (int64_t)h * Lp;
    float mx = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < n; ++j) mx = std::max(mx, sh[j]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; ++j) {
      sh[j] = exp_approx(sh[j] - mx);
      sum += sh[j];
    }
    inv[h] = 1.0f / sum;
  }
  std::fill(acc, acc + C, 0.f);
  for (int j = 0; j < n; ++j) {
    const float* vj = static_cast<const float*>(it.v) + (int64_t)j * it.ld_kv;
    for (int h = 0; h < H; ++h) {
      const float p = s[(int64_t)h * Lp + j];
      float* ah = acc + h * hd;
      const float* vh = vj + (h / (H / Hkv)) * hd;
#pragma omp simd
      for (int e = 0; e < hd; ++e) ah[e] += p * vh[e];
    }
  }
  float* o = it.out + (int64_t)i * it.ld_o;
  for (int h = 0; h < H; ++h)
    for (int e = 0; e < hd; ++e) o[h * hd + e] = acc[h * hd + e] * inv[h];
}

}  // namespace

void attention_cached_many(const CachedAttentionItem* items, int count, int max_L, int H, int Hkv, int hd,
                           float* scratch) {
  const int group = H / Hkv;
  const float scale = 1.0f / std::sqrt((float)hd);
  int rows = 0;
  for (int b = 0; b < count; ++b) rows += items[b].m;
  const size_t per_thread = attention_cached_many_scratch_floats(max_L, H, hd);
  if (rows >= 2 * omp_get_max_threads()) {
    // Enough query rows to share out: a thread takes a whole row (every head) at a time.
    const int Lp = (max_L + 15) / 16 * 16;
    parallel([&] {
      float* s = scratch + (size_t)omp_get_thread_num() * per_thread;
      float* acc = s + (size_t)H * Lp;
      float* inv = acc + (H * hd + 15) / 16 * 16;
      for (int b = 0; b < count; ++b) {
        const CachedAttentionItem& it = items[b];
#pragma omp for schedule(dynamic, 1) nowait
        for (int i = 0; i < it.m; ++i) attend_row_all_heads(it, H, Hkv, hd, i, scale, s, Lp, acc, inv);
      }
    });
    return;
  }
  // Few rows (one sequence decoding): (head, query) pairs, so every thread has work; each
  // thread takes pairs of one sequence after another without waiting at the end of each.
  parallel([&] {
    float* s = scratch + (size_t)omp_get_thread_num() * per_thread;
    float* acc = s + (max_L + 15) / 16 * 16;
    for (int b = 0; b < count; ++b) {
      const CachedAttentionItem& it = items[b];
#pragma omp for collapse(2) schedule(dynamic, 1) nowait
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < it.m; ++i)
          attend_row(it.q, it.ld_q, it.m, static_cast<const float*>(it.k), static_cast<const float*>(it.v), it.ld_kv,
                     it.L, hd, it.out, it.ld_o, h, h / group, i, scale, s, acc);
    }
  });
}

}  // namespace subllm::kernels
