// Finite-difference checks of every kernel backward except attention (test_attention.cpp).
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>

#include "grad_check.h"
#include "kernels/kernels.h"

namespace subllm {
namespace kernels_tests {

using testing::dot;
using testing::expect_grad_matches;
using testing::random_vec;
namespace k = kernels;

TEST(Kernels, LinearBackwardMatchesFiniteDifferences) {
  const int n = 5, in = 7, out = 3;
  auto x = random_vec(n * in, 1), w = random_vec(out * in, 2), r = random_vec(n * out, 3);
  std::vector<float> y(n * out);
  auto loss = [&] { k::linear_forward(x.data(), w.data(), y.data(), n, in, out); return dot(y, r); };
  std::vector<float> dx(n * in), dw(out * in, 0.f);
  k::linear_backward(x.data(), w.data(), r.data(), dx.data(), dw.data(), n, in, out);
  expect_grad_matches("dx", x, dx, loss);
  expect_grad_matches("dw", w, dw, loss);
  // accumulate_dx adds on top of what is there; dw always accumulates.
  std::vector<float> dx2(n * in, 1.0f), dw2(out * in, 1.0f);
  k::linear_backward(x.data(), w.data(), r.data(), dx2.data(), dw2.data(), n, in, out, true);
  for (int i = 0; i < n * in; ++i) EXPECT_NEAR(dx2[i], dx[i] + 1.0f, 1e-5);
  for (int i = 0; i < out * in; ++i) EXPECT_NEAR(dw2[i], dw[i] + 1.0f, 1e-5);
}

TEST(Kernels, EmbeddingBackwardScattersRepeatedTokens) {
  const int V = 6, C = 5, n = 8;
  std::vector<int32_t> tok = {0, 3, 3, 5, 1, 3, 0, 2};
  auto table = random_vec(V * C, 4), r = random_vec(n * C, 5);
  std::vector<float> out(n * C);
  auto loss = [&] { k::embedding_forward(tok.data(), table.data(), out.data(), n, C); return dot(out, r); };
  loss();
  for (int i = 0; i < n; ++i)
    for (int c = 0; c < C; ++c) EXPECT_EQ(out[i * C + c], table[tok[i] * C + c]);
  std::vector<float> dt(V * C, 0.f);
  k::embedding_backward(tok.data(), r.data(), dt.data(), n, C, V);
  expect_grad_matches("dtable", table, dt, loss);
  for (int c = 0; c < C; ++c) EXPECT_EQ(dt[4 * C + c], 0.f);  // token 4 never appears
}

TEST(Kernels, RmsNormForwardAndBackward) {
  const int n = 4, C = 33;
  auto x = random_vec(n * C, 6), g = random_vec(C, 7), r = random_vec(n * C, 8);
  std::vector<float> y(n * C), rstd(n);
  const float eps = 1e-6f;
  auto loss = [&] { k::rmsnorm_forward(x.data(), g.data(), y.data(), rstd.data(), n, C, eps); return dot(y, r); };
  loss();
  for (int i = 0; i < n; ++i) {
    double ss = 0;
    for (int c = 0; c < C; ++c) ss += (double)x[i * C + c] * x[i * C + c];
    double ref = 1.0 / std::sqrt(ss / C + eps);
    EXPECT_NEAR(rstd[i], ref, 1e-5 * ref);
    EXPECT_NEAR(y[i * C + 3], x[i * C + 3] * ref * g[3], 1e-5);
  }
  std::vector<float> dx(n * C), dg(C, 0.f);
  std::vector<float> part((size_t)omp_get_max_threads() * C);
  k::rmsnorm_backward(x.data(), g.data(), rstd.data(), r.data(), dx.data(), dg.data(), n, C, false, part.data());
  expect_grad_matches("dx", x, dx, loss, 2e-2f);
  expect_grad_matches("dg", g, dg, loss, 2e-2f);
}

TEST(Kernels, RopeRotatesPairsAndInverseIsTheAdjoint) {
  const int hd = 8, H = 2, n = 5, ld = 3 * H * hd, max_pos = 64;
  std::vector<float> cs(max_pos * hd / 2), sn(max_pos * hd / 2);
  k::RopeTable t{hd, max_pos, cs.data(), sn.data()};
  k::rope_table_fill(t, 10000.f);
  std::vector<int32_t> pos = {0, 7, 3, 63, 12};
  auto x = random_vec(n * ld, 9), r = random_vec(n * ld, 10);
  // Direct evaluation of the rotate-half formula for one element.
  std::vector<float> y = x;
  k::rope_apply(y.data(), ld, n, H, pos.data(), t, false);
  {
    int row = 3, h = 1, i = 2;
    double ang = pos[row] * std::pow(10000.0, -2.0 * i / hd);
    double a = x[row * ld + h * hd + i], b = x[row * ld + h * hd + i + hd / 2];
    EXPECT_NEAR(y[row * ld + h * hd + i], a * std::cos(ang) - b * std::sin(ang), 1e-5);
    EXPECT_NEAR(y[row * ld + h * hd + i + hd / 2], b * std::cos(ang) + a * std::sin(ang), 1e-5);
    // Columns past the rotated heads are untouched.
    EXPECT_EQ(y[row * ld + H * hd + 1], x[row * ld + H * hd + 1]);
  }
  auto loss = [&] {
    std::vector<float> z = x;
    k::rope_apply(z.data(), ld, n, H, pos.data(), t, false);
    return dot(z, r);
  };
  std::vector<float> dx = r;
  k::rope_apply(dx.data(), ld, n, H, pos.data(), t, true);
  // Untouched columns pass the gradient through.
  expect_grad_matches("dx", x, dx, loss, 1e-2f, 2e-2, 200);
}

TEST(Kernels, SwigluForwardAndBackward) {
  const int n = 3, F = 21;
  auto gu = random_vec(n * 2 * F, 11, 2.0f), r = random_vec(n * F, 12);
  std::vector<float> a(n * F);
  auto loss = [&] { k::swiglu_forward(gu.data(), a.data(), n, F); return dot(a, r); };
  loss();
  double g = gu[2 * F + 5], u = gu[2 * F + F + 5];
  EXPECT_NEAR(a[F + 5], g / (1 + std::exp(-g)) * u, 1e-5);
  std::vector<float> dgu(n * 2 * F);
  k::swiglu_backward(gu.data(), r.data(), dgu.data(), n, F);
  expect_grad_matches("dgu", gu, dgu, loss, 2e-2f);
}

TEST(Kernels, LmHeadCrossEntropyMatchesDirectSoftmax) {
  const int n = 7, C = 9, V = 23;
  auto x = random_vec(n * C, 13), w = random_vec(V * C, 14);
  std::vector<int32_t> tgt = {3, 0, 22, -1, 5, 5, 11};
  std::vector<float> scratch(3 * V), logits(n * V);
  int64_t count = 0;
  // chunk of 3 rows: the last chunk is partial
  double sum = k::lm_head_xent(x.data(), w.data(), tgt.data(), n, C, V, 1.0f, nullptr, nullptr, logits.data(),
                               scratch.data(), 3, &count);
  EXPECT_EQ(count, 6);
  double ref = 0;
  for (int i = 0; i < n; ++i) {
    if (tgt[i] < 0) continue;
    double mx = -1e30, s = 0;
    std::vector<double> l(V);
    for (int v = 0; v < V; ++v) {
      double d = 0;
      for (int c = 0; c < C; ++c) d += (double)x[i * C + c] * w[v * C + c];
      l[v] = d;
      mx = std::max(mx, d);
      EXPECT_NEAR(logits[i * V + v], d, 1e-4);
    }
    for (int v = 0; v < V; ++v) s += std::exp(l[v] - mx);
    ref += mx + std::log(s) - l[tgt[i]];
  }
  EXPECT_NEAR(sum, ref, 1e-4 * std::fabs(ref));
  auto loss = [&] {
    return k::lm_head_xent(x.data(), w.data(), tgt.data(), n, C, V, 1.0f, nullptr, nullptr, nullptr, scratch.data(),
                           3, nullptr);
  };
  std::vector<float> dx(n * C), dw(V * C, 0.f);
  k::lm_head_xent(x.data(), w.data(), tgt.data(), n, C, V, 1.0f, dx.data(), dw.data(), nullptr, scratch.data(), 3,
                  nullptr);
  // The loss sums float softmaxes (about 1e-6 of rounding noise), so the steps are wide enough
  // that the noise stays under a percent of the smallest gradients checked.
  expect_grad_matches("dx", x, dx, loss, 4e-2f, 2e-2, 200);
  expect_grad_matches("dw", w, dw, loss, 4e-2f, 2e-2, 200);
  for (int c = 0; c < C; ++c) EXPECT_EQ(dx[3 * C + c], 0.f);  // ignored row
}

TEST(Kernels, AdamWStepMatchesHandComputation) {
  std::vector<float> p = {1.0f, -2.0f}, g = {0.5f, -0.25f}, m = {0.f, 0.f}, v = {0.f, 0.f};
  const float lr = 0.1f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.01f;
  k::adamw_step(p.data(), g.data(), m.data(), v.data(), 2, lr, b1, b2, eps, wd, 1);
  // Step 1: m_hat = g, v_hat = g^2, so the update is lr * sign(g) (up to eps).
  EXPECT_NEAR(p[0], 1.0 * (1 - lr * wd) - lr, 1e-6);
  EXPECT_NEAR(p[1], -2.0 * (1 - lr * wd) + lr, 1e-6);
  EXPECT_NEAR(m[0], 0.05, 1e-7);
  EXPECT_NEAR(v[1], 0.001 * 0.0625, 1e-9);
  // Step 2 with a new gradient, checked against the formula in double.
  std::vector<float> g2 = {-0.1f, 0.3f};
  double m0 = 0.9 * 0.05 + 0.1 * -0.1, v0 = 0.999 * 0.001 * 0.25 + 0.001 * 0.01;
  double expect0 = p[0] * (1 - lr * wd) - lr / (1 - 0.81) * m0 / (std::sqrt(v0) / std::sqrt(1 - 0.999 * 0.999) + eps);
  k::adamw_step(p.data(), g2.data(), m.data(), v.data(), 2, lr, b1, b2, eps, wd, 2);
  EXPECT_NEAR(p[0], expect0, 1e-5);
}

TEST(Kernels, SumSquaresAndElementwise) {
  auto x = random_vec(10001, 15);
  double ref = 0;
  for (float f : x) ref += (double)f * f;
  EXPECT_NEAR(k::sum_squares(x.data(), (int64_t)x.size()), ref, 1e-4 * ref);
  std::vector<float> y = x;
  k::scale_inplace(y.data(), 2.0f, (int64_t)x.size());
  EXPECT_FLOAT_EQ(y[77], 2.0f * x[77]);
}

}  // namespace kernels_tests
}  // namespace subllm
