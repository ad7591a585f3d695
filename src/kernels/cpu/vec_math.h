#pragma once
// Branch-free float math that the compiler vectorises inside `omp simd` loops (libm calls
// stay scalar). exp_approx has a relative error below 2e-7 over the float range.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace subllm::kernels {

inline float exp_approx(float x) {
  // exp(x) = 2^k * exp(r), k = round(x / ln2), r = x - k*ln2 in [-ln2/2, ln2/2]. Clamping with
  // min/max and rounding by adding and subtracting 1.5 * 2^23 (to nearest even; |x / ln2| < 2^22)
  // keep the function free of branches, so loops that call it vectorize.
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float kf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  // Degree-7 Taylor polynomial of exp(r) in Horner form.
  float p = 1.98412698e-4f;
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = ((int32_t)kf + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

inline float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

// log of the sum of exp(l[j]) over n values, with the largest taken out first.
inline float log_sum_exp(const float* l, int n) {
  float mx = l[0];
#pragma omp simd reduction(max : mx)
  for (int j = 1; j < n; ++j) mx = std::max(mx, l[j]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; ++j) sum += exp_approx(l[j] - mx);
  return mx + std::log(sum);
}

}  // namespace subllm::kernels
