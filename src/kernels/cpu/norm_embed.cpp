// Token embedding and RMSNorm.
#include <omp.h>

#include <cmath>
#include <cstring>

#include "kernels/cpu/for_rows.h"
#include "kernels/kernels.h"

namespace subllm::kernels {

// tokens: (n) -> out: (n, C)
void embedding_forward(const int32_t* tokens, const float* table, float* out, int n, int C) {
  for_rows(n, n > 1, [&](int64_t i) { std::memcpy(out + i * C, table + (int64_t)tokens[i] * C, sizeof(float) * C); });
}

// dout: (n, C) -> dtable: (V, C) += ; threads own disjoint column ranges so no row is raced.
void embedding_backward(const int32_t* tokens, const float* dout, float* dtable, int n, int C, int /*V*/) {
#pragma omp parallel
  {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    int c0 = (int)((int64_t)C * t / nt), c1 = (int)((int64_t)C * (t + 1) / nt);
    for (int i = 0; i < n; ++i) {
      float* dst = dtable + (int64_t)tokens[i] * C;
      const float* src = dout + (int64_t)i * C;
      for (int c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

// x: (n, C), g: (C) -> y: (n, C), rstd: (n)
void rmsnorm_forward(const float* x, const float* g, float* y, float* rstd, int n, int C, float eps) {
  for_rows(n, n > 1, [&](int64_t i) {
    const float* xi = x + i * C;
    float* yi = y + i * C;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int c = 0; c < C; ++c) ss += xi[c] * xi[c];
    float r = 1.0f / std::sqrt(ss / C + eps);
    rstd[i] = r;
#pragma omp simd
    for (int c = 0; c < C; ++c) yi[c] = xi[c] * r * g[c];
  });
}

// y = x * r * g with r = (mean(x^2)+eps)^-1/2:
// dx = r * (dy*g) - x * r^3 / C * sum(dy*g*x); dg += dy * x * r
void rmsnorm_backward(const float* x, const float* g, const float* rstd, const float* dy, float* dx, float* dg, int n,
                      int C, bool accumulate_dx, float* scratch) {
  int nthreads = 1;
  float* dg_part = scratch;
#pragma omp parallel
  {
#pragma omp single
    nthreads = omp_get_num_threads();
    float* dgp = dg_part + (size_t)omp_get_thread_num() * C;
    std::fill(dgp, dgp + C, 0.f);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int i = 0; i < n; ++i) {
      const float* xi = x + (int64_t)i * C;
      const float* dyi = dy + (int64_t)i * C;
      float* dxi = dx + (int64_t)i * C;
      float r = rstd[i];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int c = 0; c < C; ++c) dot += dyi[c] * g[c] * xi[c];
      float k = dot * r * r * r / C;
      if (accumulate_dx) {
#pragma omp simd
        for (int c = 0; c < C; ++c) dxi[c] += r * dyi[c] * g[c] - k * xi[c];
      } else {
#pragma omp simd
        for (int c = 0; c < C; ++c) dxi[c] = r * dyi[c] * g[c] - k * xi[c];
      }
#pragma omp simd
      for (int c = 0; c < C; ++c) dgp[c] += dyi[c] * xi[c] * r;
    }
  }
  for (int t = 0; t < nthreads; ++t)
    for (int c = 0; c < C; ++c) dg[c] += dg_part[(size_t)t * C + c];
}

}  // namespace subllm::kernels
