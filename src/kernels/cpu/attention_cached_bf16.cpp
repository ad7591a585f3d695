// Attention of new queries against a BF16 key/value cache: attention_cached's walk, with each
// cached key and value widened to F32 as it is read. Decoding is bound by reading the cache,
// which is half the bytes of an F32 one. The per-query work is compiled for AVX-512 and for
// plain x86-64 (target clones, picked by the loader from cpuid), so one binary runs anywhere.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/cpu/vec_math.h"
#include "kernels/kernels.h"
#include "kernels/quant_kernels.h"
#include "kernels/cpu/team.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SUBLLM_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define SUBLLM_CLONES
#endif

namespace subllm::kernels {

namespace {

inline float widen(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One query row of one head against n cached rows: s (n) and acc (hd) are scratch.
SUBLLM_CLONES void attend_one(const float* qi, const uint16_t* k, const uint16_t* v, int64_t ld_kv, int n, int hd,
                              float scale, float* s, float* acc, float* o) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < n; ++j) {
    const uint16_t* kj = k + (int64_t)j * ld_kv;
    float d = 0.f;
#pragma omp simd reduction(+ : d)
    for (int e = 0; e < hd; ++e) d += qi[e] * widen(kj[e]);
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
    const uint16_t* vj = v + (int64_t)j * ld_kv;
    const float p = s[j];
#pragma omp simd
    for (int e = 0; e < hd; ++e) acc[e] += p * widen(vj[e]);
  }
  const float inv = 1.0f / sum;
  for (int e = 0; e < hd; ++e) o[e] = acc[e] * inv;
}

}  // namespace

void attention_cached_bf16(const float* q, int ld_q, int m, const uint16_t* k, const uint16_t* v, int ld_kv, int L,
                           int H, int Hkv, int hd, float* out, int ld_o, float* scratch) {
  const float scale = 1.0f / std::sqrt((float)hd);
  const int group = H / Hkv;  // query heads per key/value head
  parallel([&] {
    float* s = scratch + (size_t)omp_get_thread_num() * attention_cached_scratch_floats(L, hd);
    float* acc = s + (L + 15) / 16 * 16;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < m; ++i)
        attend_one(q + (int64_t)i * ld_q + h * hd, k + (h / group) * hd, v + (h / group) * hd, ld_kv, L - m + i + 1, hd,
                   scale, s, acc, out + (int64_t)i * ld_o + h * hd);
  });
}

}  // namespace subllm::kernels
