// The balancer's gradient edit (a backward-only constraint on the statistics of activations).
#include <algorithm>
#include <cmath>

#include "kernels/kernels.h"

namespace subllm::kernels {

// loss = |m - clamp(m, m_min, m_max)| + |log(clamp(rms, r_min, r_max) / rms)|, m = mean/std.
void balancer_backward(const float* x, float* d, int64_t n, double* scratch, double m_min, double m_max, double r_min, double r_max,
                       double grad_scale, double p_target, double p_window) {
  double sum = 0, sum_sq = 0, sum_abs_d = 0;
  int64_t positive = 0, with_grad = 0;
  for (int64_t i = 0; i < n; ++i) {
    sum += x[i];
    sum_sq += (double)x[i] * x[i];
    sum_abs_d += std::fabs((double)d[i]);
    with_grad += d[i] != 0.0f;
    positive += x[i] > 0;
  }
  const double mean = sum / n, uvar = sum_sq / n;
  const double var = std::max(uvar - mean * mean, 1e-20), sd = std::sqrt(var), rms = std::sqrt(std::max(uvar, 1e-20));
  const double m = mean / sd;
  // d(m_loss)/dm and d(r_loss)/d(rms); zero inside the allowed ranges. Where the variance
  // floor is hit its derivative is zero, as a clamp's is.
  const bool counted = p_target >= 0;
  const double dm = counted ? std::clamp(((double)positive / n - p_target) / p_window, -1.0, 1.0)
                            : (m > m_max ? 1.0 : (m < m_min ? -1.0 : 0.0));
  const double dr = rms > r_max ? 1.0 / rms : (rms < r_min ? -1.0 / rms : 0.0);
  if (dm == 0.0 && dr == 0.0) return;
  const bool var_live = uvar - mean * mean > 1e-20, rms_live = uvar > 1e-20;
  // The two terms' gradients (gm kept, gr cheap to recompute), and the scale that brings their
  // full-strength sum to RMS grad_scale.
  double* gm = scratch;
  const auto gr = [&](int64_t i) { return dr * (rms_live ? x[i] / (n * rms) : 0.0); };
  const double dm_sign = dm > 0 ? 1.0 : (dm < 0 ? -1.0 : 0.0);
  double g_sq = 0;
  for (int64_t i = 0; i < n; ++i) {
    gm[i] = var_live ? (1.0 - m * (x[i] - mean) / sd) / (n * sd) : 1.0 / (n * sd);
    const double g = dm_sign * gm[i] + gr(i);
    g_sq += g * g;
  }
  const double scale = grad_scale / std::max(std::sqrt(g_sq / n), 1e-20);
  // The typical size of a gradient among the values that have one: when few do (most scores
  // below the clamp), this keeps the push on the others from vanishing with them.
  const double mean_abs_d = with_grad ? sum_abs_d / with_grad : 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double ad = std::fabs((double)d[i]);
    if (counted)
      d[i] = (float)(d[i] + (mean_abs_d * dm * gm[i] + ad * gr(i)) * scale);
    else
      d[i] = (float)(d[i] + ad * (dm * gm[i] + gr(i)) * scale);
  }
}

double proportion_positive_to_mean(double p) {
  const double x = 2.0 * p - 1.0, eps = 1e-10;
  return 0.8139535143 * (std::log(1 + x + eps) - std::log(1 - x + eps)) / 2.0;
}

}  // namespace subllm::kernels
