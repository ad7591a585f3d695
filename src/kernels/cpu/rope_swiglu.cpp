// Rotary position embedding at explicit positions, and SwiGLU on the packed w12 output.
#include <cmath>

#include "kernels/cpu/for_rows.h"
#include "kernels/cpu/vec_math.h"
#include "kernels/kernels.h"

namespace subllm::kernels {

void rope_table_fill(RopeTable& t, float base) {
  const int half = t.head_dim / 2;
  for (int p = 0; p < t.max_pos; ++p)
    for (int i = 0; i < half; ++i) {
      // The frequency is rounded to float first, as a float32 reference computes it.
      float inv_freq = (float)(1.0 / std::pow((double)base, (2.0 * i) / t.head_dim));
      double ang = (double)p * (double)inv_freq;
      t.cos[(int64_t)p * half + i] = (float)std::cos(ang);
      t.sin[(int64_t)p * half + i] = (float)std::sin(ang);
    }
}

// x: (n, ld) with heads at columns [h*hd, (h+1)*hd); pos: (n)
void rope_apply(float* x, int ld, int n, int nheads, const int32_t* pos, const RopeTable& t, bool inverse) {
  const int hd = t.head_dim, half = hd / 2;
  const float sgn = inverse ? -1.0f : 1.0f;
  for_rows(n, n > 1, [&](int64_t r) {
    const float* cs = t.cos + (int64_t)pos[r] * half;
    const float* sn = t.sin + (int64_t)pos[r] * half;
    for (int h = 0; h < nheads; ++h) {
      float* a = x + (int64_t)r * ld + (int64_t)h * hd;
      float* b = a + half;
#pragma omp simd
      for (int i = 0; i < half; ++i) {
        float c = cs[i], s = sgn * sn[i];
        float x1 = a[i], x2 = b[i];
        a[i] = x1 * c - x2 * s;
        b[i] = x2 * c + x1 * s;
      }
    }
  });
}

// gu: (n, 2F) = [gate | up] -> a: (n, F)
void swiglu_forward(const float* gu, float* a, int n, int F) {
  for_rows(n, n > 1, [&](int64_t r) {
    const float* g = gu + r * 2 * F;
    const float* u = g + F;
    float* ar = a + (int64_t)r * F;
#pragma omp simd
    for (int i = 0; i < F; ++i) ar[i] = g[i] * sigmoid_approx(g[i]) * u[i];
  });
}

// da: (n, F) -> dgu: (n, 2F); silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g)
void swiglu_backward(const float* gu, const float* da, float* dgu, int n, int F) {
#pragma omp parallel for schedule(static)
  for (int r = 0; r < n; ++r) {
    const float* g = gu + (int64_t)r * 2 * F;
    const float* u = g + F;
    const float* d = da + (int64_t)r * F;
    float* dg = dgu + (int64_t)r * 2 * F;
    float* du = dg + F;
#pragma omp simd
    for (int i = 0; i < F; ++i) {
      float s = sigmoid_approx(g[i]);
      float silu = g[i] * s;
      du[i] = d[i] * silu;
      dg[i] = d[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    }
  }
}

void scale_inplace(float* y, float s, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] *= s;
}

double sum_squares(const float* x, int64_t n) {
  double total = 0.0;
#pragma omp parallel for reduction(+ : total) schedule(static)
  for (int64_t b = 0; b < n; b += 4096) {
    float s = 0.f;
    int64_t e = b + 4096 < n ? b + 4096 : n;
#pragma omp simd reduction(+ : s)
    for (int64_t i = b; i < e; ++i) s += x[i] * x[i];
    total += s;
  }
  return total;
}

}  // namespace subllm::kernels
