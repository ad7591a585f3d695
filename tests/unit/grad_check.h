#pragma once
// Central finite differences against an analytic gradient, for float kernels.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "subllm/rng.h"

namespace subllm::testing {

inline std::vector<float> random_vec(size_t n, uint64_t seed, float scale = 1.0f) {
  Rng r(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = (float)(r.normal() * scale);
  return v;
}

// Perturbs up to `samples` entries of x (evenly spread) and compares the central difference,
// Richardson-extrapolated from steps h and h/2 so the h^2 error term cancels, with grad.
// Error is relative to max(|fd|, |grad|, floor).
inline void expect_grad_matches(const std::string& what, std::vector<float>& x, const std::vector<float>& grad,
                                const std::function<double()>& loss, float h = 1e-2f, double tol = 2e-2,
                                int samples = 64, double floor = 1e-2) {
  ASSERT_EQ(x.size(), grad.size());
  size_t stride = x.size() <= (size_t)samples ? 1 : x.size() / samples;
  double worst = 0;
  for (size_t i = 0; i < x.size(); i += stride) {
    const float keep = x[i];
    auto central = [&](float step) {
      x[i] = keep + step;
      double lp = loss();
      x[i] = keep - step;
      double lm = loss();
      x[i] = keep;
      return (lp - lm) / (2.0 * step);
    };
    const double fd = (4.0 * central(h / 2) - central(h)) / 3.0;
    double err = std::fabs(fd - grad[i]) / std::max({std::fabs(fd), std::fabs((double)grad[i]), floor});
    worst = std::max(worst, err);
    EXPECT_LT(err, tol) << what << "[" << i << "]: finite difference " << fd << " vs analytic " << grad[i];
  }
  ::testing::Test::RecordProperty(what + "_worst_rel_err", std::to_string(worst));
}

inline double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (double)a[i] * b[i];
  return s;
}

}  // namespace subllm::testing
