// The ScaledAdam kernels: per-chunk sums, gradient scaling and the elementwise update.
#include <algorithm>
#include <cmath>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "kernels/optimizer_kernels.h"

namespace subllm::kernels {

namespace {

// The update of one chunk. GCC does not vectorize a loop with std::sqrt unless errno
// handling is off for the whole build (-fno-math-errno), and this loop is most of the
// optimizer's time, so on AVX machines it is written out by hand. A short tail goes through
// the same 8-wide code via a padded copy: a scalar tail could be contracted into FMAs by the
// compiler and round differently from the other elements.
void update_chunk(float* __restrict p, const float* __restrict g, float* __restrict v, float* __restrict m,
                  int64_t n, float step_coef, float scale_step, float inv_bc2, float b1, float one_minus_b1,
                  float b2, float one_minus_b2, float eps) {
#if defined(__AVX__)
  const __m256 c_b1 = _mm256_set1_ps(b1), c_omb1 = _mm256_set1_ps(one_minus_b1);
  const __m256 c_b2 = _mm256_set1_ps(b2), c_omb2 = _mm256_set1_ps(one_minus_b2);
  const __m256 c_inv = _mm256_set1_ps(inv_bc2), c_eps = _mm256_set1_ps(eps);
  const __m256 c_step = _mm256_set1_ps(step_coef), c_scale = _mm256_set1_ps(scale_step);
  auto block = [&](float* pp, const float* gg, float* vv, float* mm) {
    const __m256 gi = _mm256_loadu_ps(gg);
    const __m256 vi = _mm256_add_ps(_mm256_mul_ps(c_b2, _mm256_loadu_ps(vv)), _mm256_mul_ps(c_omb2, _mm256_mul_ps(gi, gi)));
    _mm256_storeu_ps(vv, vi);
    const __m256 den = _mm256_add_ps(_mm256_sqrt_ps(_mm256_mul_ps(vi, c_inv)), c_eps);
    const __m256 pi = _mm256_loadu_ps(pp);
    const __m256 d = _mm256_add_ps(_mm256_div_ps(_mm256_mul_ps(c_step, gi), den), _mm256_mul_ps(pi, c_scale));
    const __m256 mi = _mm256_add_ps(_mm256_mul_ps(c_b1, _mm256_loadu_ps(mm)), _mm256_mul_ps(c_omb1, d));
    _mm256_storeu_ps(mm, mi);
    _mm256_storeu_ps(pp, _mm256_add_ps(pi, mi));
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) block(p + i, g + i, v + i, m + i);
  if (i < n) {
    const int64_t r = n - i;
    float tp[8] = {0}, tg[8] = {0}, tv[8] = {0}, tm[8] = {0};
    std::copy(p + i, p + n, tp);
    std::copy(g + i, g + n, tg);
    std::copy(v + i, v + n, tv);
    std::copy(m + i, m + n, tm);
    block(tp, tg, tv, tm);
    std::copy(tp, tp + r, p + i);
    std::copy(tv, tv + r, v + i);
    std::copy(tm, tm + r, m + i);
  }
#else
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float vi = b2 * v[i] + one_minus_b2 * (gi * gi);
    v[i] = vi;
    const float d = step_coef * gi / (std::sqrt(vi * inv_bc2) + eps) + p[i] * scale_step;
    const float mi = b1 * m[i] + one_minus_b1 * d;
    m[i] = mi;
    p[i] += mi;
  }
#endif
}

}  // namespace

size_t optim_chunk_sums_scratch(int n_chunks) { return (size_t)std::max(n_chunks, 0) * 3; }

void optim_chunk_sums(const float* params, const float* grads, const int32_t* chunk_tensor,
                      const int64_t* chunk_begin, const int64_t* chunk_end, int n_chunks, int n_tensors,
                      bool want_param_sq, double* out, double* scratch) {
#pragma omp parallel for schedule(static)
  for (int c = 0; c < n_chunks; ++c) {
    const int64_t b = chunk_begin[c], e = chunk_end[c];
    double gg = 0, pg = 0, pp = 0;
    if (want_param_sq) {
#pragma omp simd reduction(+ : gg, pg, pp)
      for (int64_t i = b; i < e; ++i) {
        const double g = grads[i], p = params[i];
        gg += g * g;
        pg += p * g;
        pp += p * p;
      }
    } else {
#pragma omp simd reduction(+ : gg, pg)
      for (int64_t i = b; i < e; ++i) {
        const double g = grads[i], p = params[i];
        gg += g * g;
        pg += p * g;
      }
    }
    scratch[(size_t)c * 3 + 0] = gg;
    scratch[(size_t)c * 3 + 1] = pg;
    scratch[(size_t)c * 3 + 2] = pp;
  }
  std::fill(out, out + (size_t)n_tensors * 3, 0.0);
  for (int c = 0; c < n_chunks; ++c) {
    double* s = out + (size_t)chunk_tensor[c] * 3;
    s[0] += scratch[(size_t)c * 3 + 0];
    s[1] += scratch[(size_t)c * 3 + 1];
    s[2] += scratch[(size_t)c * 3 + 2];
  }
}

void optim_scale_chunks(float* grads, const int64_t* chunk_begin, const int64_t* chunk_end, int n_chunks,
                        float factor) {
#pragma omp parallel for schedule(static)
  for (int c = 0; c < n_chunks; ++c) {
    const int64_t b = chunk_begin[c], e = chunk_end[c];
    if (factor == 0.f) {
      // A product with 0 would keep NaN and Inf.
      std::fill(grads + b, grads + e, 0.f);
    } else {
#pragma omp simd
      for (int64_t i = b; i < e; ++i) grads[i] *= factor;
    }
  }
}

void optim_scaled_adam_update(float* p, const float* g, float* v, float* m, const int32_t* chunk_tensor,
                              const int64_t* chunk_begin, const int64_t* chunk_end, int n_chunks,
                              const float* step_coef, const float* scale_step, const uint8_t* clamp_tensor,
                              float clamp_max, float inv_bc2, float b1, float one_minus_b1, float b2,
                              float one_minus_b2, float eps) {
#pragma omp parallel for schedule(static)
  for (int c = 0; c < n_chunks; ++c) {
    const int t = chunk_tensor[c];
    const int64_t b = chunk_begin[c];
    update_chunk(p + b, g + b, v + b, m + b, chunk_end[c] - b, step_coef[t], scale_step[t], inv_bc2, b1,
                 one_minus_b1, b2, one_minus_b2, eps);
    if (clamp_tensor[t]) p[b] = std::clamp(p[b], -clamp_max, clamp_max);
  }
}

}  // namespace subllm::kernels
