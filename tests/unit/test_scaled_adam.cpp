// ScaledAdam and the Eden schedules: each rule against values worked out by hand, exact
// resume, and a 50-step trajectory against an independent PyTorch implementation
// (tests/oracle/scaled_adam_ref.py, run under Debian's python3-torch).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <set>

#include "subllm/eden.h"
#include "subllm/rng.h"
#include "subllm/safetensors.h"
#include "subllm/scaled_adam.h"
#include "subllm/schedule.h"
#include "subllm/threads.h"
#include "test_util.h"

namespace subllm {
namespace scaled_adam_tests {

using testing::error_of;
using testing::TempDir;

// Tensors laid out one after another in flat buffers, as a Model does.
struct Layout {
  std::vector<ParamInfo> infos;
  int64_t total = 0;
  int add(const std::string& name, Shape shape, float lr_scale = 1.0f) {
    ParamInfo p;
    p.name = name;
    p.shape = shape;
    p.numel = shape_numel(shape);
    p.offset = total;
    p.lr_scale = lr_scale;
    total += p.numel;
    infos.push_back(p);
    return (int)infos.size() - 1;
  }
};

// Only the rule under test: no momentum, no clipping.
ScaledAdamOptions plain() {
  ScaledAdamOptions o;
  o.beta1 = 0.f;
  o.clipping_scale = 0.f;
  return o;
}

void expect_rel(double got, double want, double rel, const std::string& what) {
  EXPECT_NEAR(got, want, rel * std::fabs(want)) << what;
}

TEST(ScaledAdam, FirstStepsScaleByRmsWithoutFirstMomentCorrection) {
  Layout l;
  l.add("w", {2, 2});
  ScaledAdamOptions o;
  o.clipping_scale = 0.f;
  ScaledAdam opt(l.infos, l.total, o);
  std::vector<float> p = {1, 2, 3, 4};
  const std::vector<float> g0 = {0.5f, -1.f, 2.f, -0.25f};
  const double lr = 0.05, rms = std::sqrt(7.5), eps = 1e-8;
  std::vector<double> want(p.begin(), p.end()), d(4);
  // Step 0: v = 0.02 g^2 corrected by 1 - 0.98 gives g^2; momentum keeps 0.1 of the step.
  for (int i = 0; i < 4; ++i) {
    d[i] = -lr * rms * g0[i] / (std::fabs(g0[i]) + eps);
    want[i] += 0.1 * d[i];
  }
  std::vector<float> g = g0;
  opt.step(p.data(), g.data(), (float)lr);
  for (int i = 0; i < 4; ++i) expect_rel(p[i], want[i], 1e-6, "step 0 element " + std::to_string(i));
  // Step 1: the same corrected v, momentum 0.9 * 0.1 d + 0.1 d (Adam would have taken d twice).
  for (int i = 0; i < 4; ++i) want[i] += 0.19 * d[i];
  g = g0;
  opt.step(p.data(), g.data(), (float)lr);
  for (int i = 0; i < 4; ++i) expect_rel(p[i], want[i], 1e-6, "step 1 element " + std::to_string(i));
  EXPECT_EQ(opt.steps_taken(), 2);
}

TEST(ScaledAdam, MomentumHasNoBiasCorrection) {
  Layout l;
  l.add("s", {1});
  ScaledAdamOptions o = plain();
  o.beta1 = 0.9f;
  o.scalar_lr_scale = 1.f;
  ScaledAdam opt(l.infos, l.total, o);
  float p = 0, g;
  const double want[] = {-0.1, -0.29, -0.561};  // m = 0.1, 0.19, 0.271 of the unit step
  for (int s = 0; s < 3; ++s) {
    g = 1.f;
    opt.step(&p, &g, 1.f);
    EXPECT_NEAR(p, want[s], 1e-6) << "step " << s;
  }
}

TEST(ScaledAdam, SecondMomentCorrectionStopsAtPoint99) {
  Layout l;
  l.add("s", {1});
  ScaledAdamOptions o = plain();
  o.beta2 = 0.5f;
  o.scalar_lr_scale = 1.f;
  ScaledAdam opt(l.infos, l.total, o);
  float p = 0, g;
  double want = 0;
  for (int s = 0; s < 9; ++s) {
    g = 1.f;
    opt.step(&p, &g, 1.f);
    // v = 1 - 0.5^(s+1); corrected (to exactly 1) only while that is below 0.99, i.e. s <= 5.
    const double v = 1.0 - std::pow(0.5, s + 1);
    want -= 1.0 / (std::sqrt(v < 0.99 ? 1.0 : v) + 1e-8);
    EXPECT_NEAR(p, want, 1e-6) << "step " << s;
  }
  EXPECT_LT(p, -8.01);  // the uncorrected steps are larger than 1
}

// A uniform 4-vector stays uniform, so its RMS is its value x and sum(p g) = 4 x g.
struct UniformRun {
  std::vector<float> p = std::vector<float>(4);
  std::vector<double> x;  // x before each step
};

UniformRun run_uniform(ScaledAdamOptions o, float x0, float grad, float lr, int steps) {
  Layout l;
  l.add("v", {4});
  ScaledAdam opt(l.infos, l.total, o);
  UniformRun r;
  std::fill(r.p.begin(), r.p.end(), x0);
  for (int s = 0; s < steps; ++s) {
    r.x.push_back(r.p[0]);
    std::vector<float> g(4, grad);
    opt.step(r.p.data(), g.data(), lr);
    for (int i = 1; i < 4; ++i) EXPECT_EQ(r.p[i], r.p[0]);
  }
  r.x.push_back(r.p[0]);
  return r;
}

// The scale step of step s (s % 4 == 3) for a uniform vector under constant gradient `grad`,
// with the scale moment `sea` carried between calls.
double scale_step(const std::vector<double>& x, int s, double grad, double lr, double scalar_lr_scale,
                  double& sea) {
  const double b2c = std::pow(0.98, 4);
  double sum = 0, sq = 0;
  for (int k = s - 3; k <= s; ++k) {
    const double sg = 4 * x[k] * grad;
    sum += sg;
    sq += sg * sg;
  }
  sea = b2c * sea + (1 - b2c) * sq / 4;
  const double bc = 1 - std::pow(b2c, (s + 1) / 4);
  return -lr * scalar_lr_scale * std::sqrt(bc) * sum / (std::sqrt(sea) + 1e-8);
}

TEST(ScaledAdam, SizeUpdateOnlyOnItsPeriod) {
  const double lr = 0.01;
  UniformRun r = run_uniform(plain(), 1.f, 1.f, (float)lr, 8);
  // Steps 0-2 use the RMS measured at step 0 (1), although x has moved since.
  std::vector<double> x = {1.0};
  for (int s = 0; s < 3; ++s) x.push_back(x.back() - lr * 1.0 / (1 + 1e-8));
  // Step 3 re-measures the RMS (x3) and moves the scale.
  double sea = 0;
  double rms = x[3];
  double ss = scale_step(x, 3, 1.0, lr, 0.1, sea);
  EXPECT_LT(ss, -0.003);  // about -lr * 0.1 * 4
  EXPECT_GT(ss, -0.1);    // inside the clamp
  x.push_back(x[3] - lr * rms / (1 + 1e-8) + x[3] * ss);
  // Steps 4-6 keep the RMS of step 3 and do not touch the scale.
  for (int s = 4; s < 7; ++s) x.push_back(x.back() - lr * rms / (1 + 1e-8));
  rms = x[7];
  ss = scale_step(x, 7, 1.0, lr, 0.1, sea);
  x.push_back(x[7] - lr * rms / (1 + 1e-8) + x[7] * ss);
  for (int s = 0; s <= 8; ++s) expect_rel(r.x[s], x[s], 2e-6, "x before step " + std::to_string(s));
}

TEST(ScaledAdam, ScaleStepClampedToPointOne) {
  ScaledAdamOptions o = plain();
  o.scalar_lr_scale = 10.f;  // makes the raw scale step about 0.4
  const double lr = 0.01;
  UniformRun shrink = run_uniform(o, 1.f, 1.f, (float)lr, 4);
  expect_rel(shrink.x[3], 0.97, 1e-6, "x3");
  expect_rel(shrink.x[4], 0.97 * (1 - lr - 0.1), 1e-6, "shrinking by at most 0.1");
  UniformRun grow = run_uniform(o, 1.f, -1.f, (float)lr, 4);
  expect_rel(grow.x[4], 1.03 * (1 + lr + 0.1), 1e-6, "growing by at most 0.1");
}

TEST(ScaledAdam, ScaleNeverGrowsPastMaxRms) {
  ScaledAdamOptions o = plain();
  o.scalar_lr_scale = 10.f;  // a raw scale step of about +0.4, clamped to 0.1 first
  const double lr = 0.01;
  UniformRun r = run_uniform(o, 2.9f, -1.f, (float)lr, 5);
  const double x3 = 2.9 + 3 * lr * 2.9;
  expect_rel(r.x[3], x3, 1e-6, "x3");
  // The scale part brings the RMS exactly to 3; the Adam part of the same step adds lr * x3.
  expect_rel(r.x[4], 3.0 + lr * x3, 1e-6, "x4");
  // Step 4 uses the RMS of step 3.
  expect_rel(r.x[5], r.x[4] + lr * x3, 1e-6, "x5");
  // Above the maximum the same rule shrinks, by more than the 0.1 clamp if need be.
  UniformRun above = run_uniform(o, 3.5f, -1.f, (float)lr, 4);
  const double y3 = 3.5 + 3 * lr * 3.5;
  EXPECT_LT((3.0 - y3) / y3, -0.1);
  expect_rel(above.x[4], 3.0 + lr * y3, 1e-6, "above max");
}

TEST(ScaledAdam, NoScaleChangeBelowMinRms) {
  const double lr = 0.01, min_rms = 1e-5;
  // The Adam step uses max(rms, min_rms), and the scale step is zero in both directions.
  UniformRun shrink = run_uniform(plain(), 1e-6f, 1.f, (float)lr, 5);
  for (int s = 0; s <= 5; ++s) EXPECT_NEAR(shrink.x[s], 1e-6 - s * lr * min_rms, 1e-12) << s;
  UniformRun grow = run_uniform(plain(), 1e-6f, -1.f, (float)lr, 5);
  for (int s = 0; s <= 5; ++s) EXPECT_NEAR(grow.x[s], 1e-6 + s * lr * min_rms, 1e-12) << s;
}

TEST(ScaledAdam, ScalarsAreOneElementTensors) {
  Layout l;
  const int a = l.add("a", {1}), b = l.add("b", {1, 1}), c = l.add("c", {1}), v = l.add("v", {3});
  ScaledAdam opt(l.infos, l.total, plain());
  std::vector<float> p(l.total), g(l.total);
  auto at = [&](int t) { return l.infos[t].offset; };
  p[at(a)] = 9.97f, g[at(a)] = -1.f;    // +0.05 overshoots 10
  p[at(b)] = -9.98f, g[at(b)] = 1.f;    // -0.05 overshoots -10
  p[at(c)] = 4.f, g[at(c)] = 1.f;       // lr * 0.1, not scaled by its size
  for (int i = 0; i < 3; ++i) p[at(v) + i] = 2.f, g[at(v) + i] = 1.f;  // a vector is not a scalar
  opt.step(p.data(), g.data(), 0.5f);
  EXPECT_EQ(p[at(a)], 10.f);
  EXPECT_EQ(p[at(b)], -10.f);
  EXPECT_NEAR(p[at(c)], 3.95, 1e-6);
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(p[at(v) + i], 2.0 - 0.5 * 2.0, 1e-6);
}

TEST(ScaledAdam, ScalarMaxIsAnOption) {
  Layout l;
  l.add("a", {1});
  ScaledAdamOptions o = plain();
  o.scalar_max = 2.f;
  ScaledAdam opt(l.infos, l.total, o);
  float p = 1.99f, g = -1.f;
  opt.step(&p, &g, 1.f);
  EXPECT_EQ(p, 2.f);
}

std::vector<float> run_lr_case(float lr, float scale_a, float scale_b, int steps) {
  Layout l;
  l.add("a", {5, 3}, scale_a);
  l.add("b", {4}, scale_b);
  l.add("s", {1}, scale_a);
  ScaledAdamOptions o;
  o.clipping_update_period = 4;
  ScaledAdam opt(l.infos, l.total, o);
  Rng r(3);
  std::vector<float> p(l.total), g(l.total);
  for (auto& x : p) x = (float)r.normal();
  for (int s = 0; s < steps; ++s) {
    for (auto& x : g) x = (float)(r.normal() * (s == 5 ? 30 : 1));
    opt.step(p.data(), g.data(), lr);
  }
  return p;
}

TEST(ScaledAdam, LrScaleMultipliesEveryLearningRateOfItsTensor) {
  // lr 0.02 with scales (0.5, 1) must equal lr 0.01 with scales (1, 2) bit for bit, over
  // steps that include size updates, clipping and a scalar.
  EXPECT_EQ(run_lr_case(0.02f, 0.5f, 1.f, 13), run_lr_case(0.01f, 1.f, 2.f, 13));
  EXPECT_NE(run_lr_case(0.02f, 0.5f, 1.f, 13), run_lr_case(0.02f, 1.f, 1.f, 13));
  // One plain step: half the rate, half the change.
  Layout l;
  l.add("a", {2, 2}, 0.5f);
  l.add("b", {2, 2}, 1.f);
  ScaledAdam opt(l.infos, l.total, plain());
  std::vector<float> p = {1, -2, 3, 0.5f, 1, -2, 3, 0.5f}, p0 = p;
  std::vector<float> g = {0.3f, 0.1f, -0.2f, 1, 0.3f, 0.1f, -0.2f, 1};
  opt.step(p.data(), g.data(), 0.1f);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(p[i] - p0[i], 0.5 * (p[4 + i] - p0[4 + i]), 1e-6);
}

// A 2x2 tensor of ones with lr 0: its RMS stays 1 and the clipping norm is 2 |g|.
struct ClipRun {
  std::vector<ScaledAdamStepInfo> info;
  std::vector<float> grad_after;  // one element of the gradient after the step
};

ClipRun run_clip(int period, const std::map<int, double>& norms, int steps) {
  Layout l;
  l.add("w", {2, 2});
  ScaledAdamOptions o;
  o.clipping_update_period = period;
  ScaledAdam opt(l.infos, l.total, o);
  std::vector<float> p(4, 1.f), g(4);
  ClipRun r;
  for (int s = 0; s < steps; ++s) {
    auto it = norms.find(s);
    const double n = it != norms.end() ? it->second : (s == 0 ? 5.0 : (double)s);
    std::fill(g.begin(), g.end(), (float)(n / 2));
    r.info.push_back(opt.step(p.data(), g.data(), 0.f));
    r.grad_after.push_back(g[0]);
    for (float x : p) EXPECT_EQ(x, 1.f);
  }
  return r;
}

TEST(ScaledAdam, ClippingThresholdFromWindowMedian) {
  // Norms: step s has norm s, except spikes of 100 at 15, 1000 at 30 and 104 at 51.
  ClipRun r = run_clip(50, {{15, 100.0}, {30, 1000.0}, {51, 104.0}}, 52);
  std::set<int> changed;
  for (int s = 0; s < 52; ++s) {
    EXPECT_NEAR(r.info[s].grad_norm, s == 15 ? 100 : s == 30 ? 1000 : s == 51 ? 104 : s == 0 ? 5 : s, 1e-9);
    if (r.info[s].quartiles_changed) changed.insert(s);
    if (s < 10) {
      EXPECT_EQ(r.info[s].threshold, 0.0) << s;
    }
  }
  EXPECT_EQ(changed, (std::set<int>{10, 20, 40, 50}));
  auto quartiles = [&](int s) { return std::vector<double>(r.info[s].quartiles, r.info[s].quartiles + 5); };
  // Step 10: the 10 largest entries (the norms of steps 1-10), index (10/4)*k; median 5, x2 x2.
  EXPECT_EQ(quartiles(10), (std::vector<double>{1, 3, 5, 7, 9}));
  EXPECT_EQ(r.info[10].threshold, 20.0);
  EXPECT_EQ(quartiles(20), (std::vector<double>{1, 6, 11, 17, 100}));
  EXPECT_EQ(r.info[20].threshold, 44.0);
  EXPECT_EQ(quartiles(40), (std::vector<double>{1, 11, 22, 33, 1000}));
  EXPECT_EQ(r.info[40].threshold, 88.0);
  // Step 50: the whole window (steps 1-50), no doubling.
  EXPECT_EQ(quartiles(50), (std::vector<double>{1, 13, 26, 39, 100}));  // index min(49, 48)
  EXPECT_EQ(r.info[50].threshold, 52.0);
  for (int s = 0; s < 52; ++s) {
    const double want = s == 15 ? 20.0 / 100 : s == 30 ? 44.0 / 1000 : s == 51 ? 0.5 : 1.0;
    EXPECT_NEAR(r.info[s].clip_factor, want, 1e-12) << "step " << s;
    EXPECT_FALSE(r.info[s].skipped);
  }
  // The gradients are scaled in place: 50 * 0.2, 500 * 0.044.
  EXPECT_NEAR(r.grad_after[15], 10.0, 1e-5);
  EXPECT_NEAR(r.grad_after[30], 22.0, 1e-4);
  EXPECT_EQ(r.grad_after[14], 7.f);
}

TEST(ScaledAdam, EarlyRecomputationsOnlyBelowThePeriod) {
  ClipRun r = run_clip(16, {}, 50);
  std::set<int> changed;
  for (int s = 0; s < 50; ++s)
    if (r.info[s].quartiles_changed) changed.insert(s);
  EXPECT_EQ(changed, (std::set<int>{10, 16, 32, 48}));
  // Step 16: window of steps 1-16 (step 16 at index 0), index 4k: median 9, not doubled.
  EXPECT_EQ(r.info[16].quartiles[2], 9.0);
  EXPECT_EQ(r.info[16].threshold, 18.0);
}

// Two 2x2 tensors of ones at lr 0 (their RMS stays 1): `a` (lr scale 1) with norm s (100 at
// step 15), `b` (lr scale 0.5) with norm 3 s (1000 at step 30); period 50.
struct TwoGroupRun {
  std::vector<ScaledAdamStepInfo> info;
  std::vector<float> a_after, b_after;  // one gradient element of each after the step
};

TwoGroupRun run_two_groups(Clipping clipping, int steps, int nan_in_b_at = -1) {
  Layout l;
  l.add("a", {2, 2}, 1.f);
  l.add("b", {2, 2}, 0.5f);
  ScaledAdamOptions o;
  o.clipping_update_period = 50;
  o.clipping = clipping;
  ScaledAdam opt(l.infos, l.total, o);
  std::vector<float> p(8, 1.f), g(8);
  TwoGroupRun r;
  for (int s = 0; s < steps; ++s) {
    const double na = s == 0 ? 5.0 : s == 15 ? 100.0 : s;
    const double nb = s == 0 ? 5.0 : s == 30 ? 1000.0 : 3.0 * s;
    std::fill(g.begin(), g.begin() + 4, (float)(na / 2));
    std::fill(g.begin() + 4, g.end(), (float)(nb / 2));
    if (s == nan_in_b_at) g[5] = std::numeric_limits<float>::quiet_NaN();
    r.info.push_back(opt.step(p.data(), g.data(), 0.f));
    r.a_after.push_back(g[0]);
    r.b_after.push_back(g[4]);
  }
  return r;
}

TEST(ScaledAdam, ClipsEachLrScaleGroupAgainstItsOwnWindow) {
  TwoGroupRun r = run_two_groups(Clipping::per_group, 32);
  for (int s = 0; s < 32; ++s) {
    ASSERT_EQ(r.info[s].groups.size(), 2u);
    const ClipGroupStats &a = r.info[s].groups[0], &b = r.info[s].groups[1];
    EXPECT_EQ(a.lr_scale, 1.f);
    EXPECT_EQ(b.lr_scale, 0.5f);
    EXPECT_FALSE(a.whole_model);
    EXPECT_EQ(a.tensors, 1);
    EXPECT_EQ(b.elements, 4);
    const double na = s == 0 ? 5.0 : s == 15 ? 100.0 : s, nb = s == 0 ? 5.0 : s == 30 ? 1000.0 : 3.0 * s;
    EXPECT_NEAR(a.grad_norm, na, 1e-9) << s;
    EXPECT_NEAR(b.grad_norm, nb, 1e-9) << s;
    // The step's grad_norm is the whole model's.
    EXPECT_NEAR(r.info[s].grad_norm, std::sqrt(na * na + nb * nb), 1e-9) << s;
    EXPECT_EQ(a.quartiles_changed, s == 10 || s == 20) << s;
    EXPECT_EQ(b.quartiles_changed, s == 10 || s == 20) << s;
  }
  // Step 10 (steps 1-10, median x2 x2): a's median 5, b's 15.
  const ClipGroupStats &a10 = r.info[10].groups[0], &b10 = r.info[10].groups[1];
  EXPECT_EQ(std::vector<double>(a10.quartiles, a10.quartiles + 5), (std::vector<double>{1, 3, 5, 7, 9}));
  EXPECT_EQ(std::vector<double>(b10.quartiles, b10.quartiles + 5), (std::vector<double>{3, 9, 15, 21, 27}));
  EXPECT_EQ(a10.threshold, 20.0);
  EXPECT_EQ(b10.threshold, 60.0);
  // Step 15: a's spike is clipped by a's own threshold; b (45 < 60) is left alone. One global
  // norm would have scaled both by 20 sqrt(10) / sqrt(100^2 + 45^2) = 0.577.
  EXPECT_NEAR(r.info[15].groups[0].clip_factor, 0.2, 1e-12);
  EXPECT_EQ(r.info[15].groups[1].clip_factor, 1.0);
  EXPECT_NEAR(r.a_after[15], 10.0, 1e-5);
  EXPECT_EQ(r.b_after[15], 22.5f);
  // Step 20: a's window (steps 1-20 with 100 at 15) has median 11 -> 44; b's 33 -> 132.
  EXPECT_EQ(r.info[20].groups[0].threshold, 44.0);
  EXPECT_EQ(r.info[20].groups[1].threshold, 132.0);
  // Step 30: b's spike is clipped by b's threshold alone.
  EXPECT_EQ(r.info[30].groups[0].clip_factor, 1.0);
  EXPECT_NEAR(r.info[30].groups[1].clip_factor, 0.132, 1e-12);
  EXPECT_EQ(r.a_after[30], 15.f);
  EXPECT_NEAR(r.b_after[30], 66.0, 1e-4);
  // The step's own fields are the main group's (4 elements each: the first, `a`).
  EXPECT_EQ(r.info[15].clip_factor, r.info[15].groups[0].clip_factor);
  EXPECT_EQ(r.info[30].threshold, 44.0);
  for (const auto& info : r.info) EXPECT_FALSE(info.skipped);
}

TEST(ScaledAdam, GlobalClippingKeepsOneWindowForAll) {
  TwoGroupRun r = run_two_groups(Clipping::global, 32);
  for (int s = 0; s < 32; ++s) {
    ASSERT_EQ(r.info[s].groups.size(), 1u);
    EXPECT_TRUE(r.info[s].groups[0].whole_model);
    EXPECT_EQ(r.info[s].groups[0].tensors, 2);
    EXPECT_EQ(r.info[s].groups[0].grad_norm, r.info[s].grad_norm);
  }
  // Step 10: norms s sqrt(10), median 5 sqrt(10), threshold 20 sqrt(10) for both tensors (the
  // window holds floats).
  const double thr = 20 * std::sqrt(10.0), f15 = thr / std::sqrt(100.0 * 100 + 45 * 45);
  EXPECT_NEAR(r.info[10].threshold, thr, 1e-6 * thr);
  EXPECT_NEAR(r.info[15].clip_factor, f15, 1e-6 * f15);
  EXPECT_EQ(r.info[15].groups[0].clip_factor, r.info[15].clip_factor);
  EXPECT_NEAR(r.a_after[15], 50 * f15, 1e-4);
  EXPECT_NEAR(r.b_after[15], 22.5 * f15, 1e-4);
}

TEST(ScaledAdam, NonFiniteNormZeroesOnlyItsGroup) {
  TwoGroupRun r = run_two_groups(Clipping::per_group, 14, 12);
  EXPECT_TRUE(r.info[12].skipped);
  EXPECT_EQ(r.info[12].groups[1].clip_factor, 0.0);
  EXPECT_EQ(r.b_after[12], 0.f);
  EXPECT_EQ(r.info[12].groups[0].clip_factor, 1.0);
  EXPECT_EQ(r.a_after[12], 6.f);
  EXPECT_FALSE(r.info[13].skipped);
}

TEST(ScaledAdam, GroupsByLrScaleInOrderOfFirstAppearance) {
  Layout l;
  l.add("w1", {3, 3}, 1.f);
  l.add("score", {1, 4}, 0.5f);
  l.add("w2", {2, 2}, 1.f);
  l.add("fast", {5}, 2.f);
  l.add("score2", {1, 4}, 0.5f);
  ScaledAdam opt(l.infos, l.total, ScaledAdamOptions{});
  EXPECT_EQ(opt.clip_groups(), 3);
  const std::vector<int> want = {0, 1, 0, 2, 1};
  for (size_t t = 0; t < want.size(); ++t) EXPECT_EQ(opt.clip_group_of(t), want[t]) << t;
  EXPECT_EQ(opt.main_clip_group(), 0);  // 13 elements
  ScaledAdamOptions global;
  global.clipping = Clipping::global;
  ScaledAdam one(l.infos, l.total, global);
  EXPECT_EQ(one.clip_groups(), 1);
  for (size_t t = 0; t < want.size(); ++t) EXPECT_EQ(one.clip_group_of(t), 0);
}

TEST(ScaledAdam, NonFiniteNormZeroesGradients) {
  Layout l;
  l.add("w", {2, 2});
  ScaledAdamOptions o;
  o.beta1 = 0.f;
  ScaledAdam opt(l.infos, l.total, o);
  std::vector<float> p = {1, -1, 0.5f, 2}, g(4);
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (int s = 0; s < 16; ++s) {
    g = {0.1f, 0.2f, -0.3f, 0.1f};
    // Before the first threshold (step 2) and after it (steps 12, 13); none is a size step.
    if (s == 2 || s == 12) g[1] = nan;
    if (s == 13) g[2] = -inf;
    const std::vector<float> before = p;
    ScaledAdamStepInfo info = opt.step(p.data(), g.data(), 0.01f);
    const bool bad = s == 2 || s == 12 || s == 13;
    EXPECT_EQ(info.skipped, bad) << s;
    EXPECT_EQ(std::isfinite(info.grad_norm), !bad) << s;
    if (bad) {
      EXPECT_EQ(info.clip_factor, 0.0);
      EXPECT_EQ(g, std::vector<float>(4, 0.f));
      EXPECT_EQ(p, before) << "without momentum a zeroed gradient moves nothing, step " << s;
    }
    for (float x : p) EXPECT_TRUE(std::isfinite(x));
  }
}

TEST(ScaledAdam, TooManyNonFiniteNormsThrow) {
  Layout l;
  l.add("w", {2, 2});
  ScaledAdam opt(l.infos, l.total, ScaledAdamOptions{});
  std::vector<float> p(4, 1.f), g(4);
  std::string err;
  for (int s = 0; s <= 10 && err.empty(); ++s) {
    std::fill(g.begin(), g.end(), s >= 4 ? std::numeric_limits<float>::quiet_NaN() : 1.f);
    err = error_of([&] { opt.step(p.data(), g.data(), 0.01f); });
  }
  EXPECT_NE(err.find("not finite"), std::string::npos) << err;
  EXPECT_NE(err.find("step 10"), std::string::npos) << err;
}

TEST(ScaledAdam, ClippingOffLeavesGradients) {
  Layout l;
  l.add("w", {2, 2});
  ScaledAdamOptions o;
  o.clipping_scale = 0.f;
  ScaledAdam opt(l.infos, l.total, o);
  std::vector<float> p(4, 1.f), g(4);
  for (int s = 0; s < 30; ++s) {
    std::fill(g.begin(), g.end(), s == 20 ? 1000.f : 1.f);
    ScaledAdamStepInfo info = opt.step(p.data(), g.data(), 0.001f);
    EXPECT_EQ(info.clip_factor, 1.0);
    EXPECT_EQ(info.threshold, 0.0);
    EXPECT_FALSE(info.quartiles_changed);
    EXPECT_EQ(g[0], s == 20 ? 1000.f : 1.f);
  }
}

TEST(ScaledAdam, RejectsBadLayout) {
  Layout l;
  l.add("w", {2, 2});
  EXPECT_NE(error_of([&] { ScaledAdam(l.infos, 3, ScaledAdamOptions{}); }).find("'w'"), std::string::npos);
  EXPECT_NE(error_of([&] { ScaledAdam({}, 0, ScaledAdamOptions{}); }), "");
  ScaledAdamOptions o;
  o.size_update_period = 0;
  EXPECT_NE(error_of([&] { ScaledAdam(l.infos, l.total, o); }).find("size_update_period"), std::string::npos);
}

// A varied model: a scalar, a [1,1] scalar, a gain vector, small and large matrices (the
// large one spans several reduction chunks), one at lr_scale 0.5.
Layout varied_layout() {
  Layout l;
  l.add("scalar", {1});
  l.add("gain", {7});
  l.add("proj", {6, 5});
  l.add("conv", {4, 3, 2}, 0.5f);
  l.add("embed", {130, 70});
  l.add("scalar2", {1, 1});
  return l;
}

std::vector<float> varied_grads(Rng& r, const Layout& l, int s) {
  std::vector<float> g(l.total);
  const double spike = s == 15 ? 20 : s == 27 ? 50 : 1;
  for (auto& x : g) x = (float)(r.normal() * 0.1 * spike);
  return g;
}

// 40 steps of the varied model straight, and 20 + save + load + 20: bit-exact.
void resume_is_bit_exact(Clipping clipping) {
  SCOPED_TRACE(clipping == Clipping::global ? "global clipping" : "per-group clipping");
  TempDir tmp("scaled_adam");
  Layout l = varied_layout();
  ScaledAdamOptions o;
  o.clipping_update_period = 16;
  o.clipping = clipping;
  std::vector<float> init(l.total);
  Rng ri(5);
  for (auto& x : init) x = (float)(ri.normal() * 0.3);
  std::vector<std::vector<float>> grads;
  Rng rg(6);
  for (int s = 0; s < 40; ++s) grads.push_back(varied_grads(rg, l, s));

  std::vector<float> straight = init;
  ScaledAdam a(l.infos, l.total, o);
  std::vector<ScaledAdamStepInfo> ia;
  for (int s = 0; s < 40; ++s) {
    std::vector<float> g = grads[s];
    ia.push_back(a.step(straight.data(), g.data(), 0.03f));
  }

  std::vector<float> resumed = init;
  {
    ScaledAdam b(l.infos, l.total, o);
    for (int s = 0; s < 20; ++s) {
      std::vector<float> g = grads[s];
      b.step(resumed.data(), g.data(), 0.03f);
    }
    b.save_state(tmp.file("opt.safetensors"));
  }
  ScaledAdam c(l.infos, l.total, o);
  c.load_state(tmp.file("opt.safetensors"));
  EXPECT_EQ(c.steps_taken(), 20);
  for (int s = 20; s < 40; ++s) {
    std::vector<float> g = grads[s];
    ScaledAdamStepInfo info = c.step(resumed.data(), g.data(), 0.03f);
    EXPECT_EQ(info.clip_factor, ia[s].clip_factor) << s;
    EXPECT_EQ(info.threshold, ia[s].threshold) << s;
    ASSERT_EQ(info.groups.size(), ia[s].groups.size());
    for (size_t gi = 0; gi < info.groups.size(); ++gi) {
      EXPECT_EQ(info.groups[gi].clip_factor, ia[s].groups[gi].clip_factor) << s << " group " << gi;
      EXPECT_EQ(info.groups[gi].threshold, ia[s].groups[gi].threshold) << s << " group " << gi;
    }
  }
  EXPECT_EQ(c.steps_taken(), 40);
  ASSERT_EQ(std::memcmp(straight.data(), resumed.data(), straight.size() * sizeof(float)), 0);
  // The clipping window and the size updates were live across the save, in every group.
  EXPECT_EQ(ia[20].groups.size(), clipping == Clipping::global ? 1u : 2u);
  for (size_t gi = 0; gi < ia[20].groups.size(); ++gi) {
    bool clipped = false;
    for (int s = 20; s < 40; ++s) clipped |= ia[s].groups[gi].clip_factor < 1.0;
    EXPECT_TRUE(clipped) << "group " << gi;
  }
}

TEST(ScaledAdam, ResumeIsBitExact) {
  resume_is_bit_exact(Clipping::per_group);
  resume_is_bit_exact(Clipping::global);
}

// Rewrites a one-group v2 state file as the v1 format (before per-group clipping).
void write_as_v1(const std::string& v2, const std::string& v1, const Layout& l, const ScaledAdamOptions& o) {
  SafetensorsFile f(v2);
  const int64_t nt = (int64_t)l.infos.size(), period = o.clipping_update_period;
  std::vector<float> v(l.total), m(l.total), rms(nt), sea(nt), sg(nt * o.size_update_period), norms(period);
  f.read_f32("exp_avg_sq", {l.total}, v.data());
  f.read_f32("momentum", {l.total}, m.data());
  f.read_f32("param_rms", {nt}, rms.data());
  f.read_f32("scale_exp_avg_sq", {nt}, sea.data());
  f.read_f32("scale_grads", {nt, (int64_t)o.size_update_period}, sg.data());
  f.read_f32("model_norms", {1, period}, norms.data());
  const auto& meta = f.metadata();
  write_safetensors(v1,
                    {{"exp_avg_sq", DType::F32, {l.total}, v.data()},
                     {"momentum", DType::F32, {l.total}, m.data()},
                     {"param_rms", DType::F32, {nt}, rms.data()},
                     {"scale_exp_avg_sq", DType::F32, {nt}, sea.data()},
                     {"scale_grads", DType::F32, {nt, (int64_t)o.size_update_period}, sg.data()},
                     {"model_norms", DType::F32, {period}, norms.data()}},
                    {{"format", "subllm.scaled_adam.v1"},
                     {"step", meta.at("step")},
                     {"has_threshold", meta.at("has_threshold")},
                     {"threshold", meta.at("threshold")},
                     {"num_clipped", meta.at("num_clipped")}});
}

TEST(ScaledAdam, LoadsV1StateFiles) {
  TempDir tmp("scaled_adam_v1");
  Layout l = varied_layout();
  ScaledAdamOptions global;
  global.clipping_update_period = 16;
  global.clipping = Clipping::global;
  std::vector<float> init(l.total);
  Rng ri(8);
  for (auto& x : init) x = (float)(ri.normal() * 0.3);
  Rng rg(9);
  std::vector<std::vector<float>> grads;
  for (int s = 0; s < 30; ++s) grads.push_back(varied_grads(rg, l, s));
  auto run = [&](ScaledAdam& opt, std::vector<float>& p, int from, int to, std::vector<ScaledAdamStepInfo>* infos) {
    for (int s = from; s < to; ++s) {
      std::vector<float> g = grads[s];
      ScaledAdamStepInfo info = opt.step(p.data(), g.data(), 0.03f);
      if (infos) infos->push_back(info);
    }
  };
  std::vector<float> straight = init, half = init;
  ScaledAdam a(l.infos, l.total, global);
  run(a, straight, 0, 30, nullptr);
  ScaledAdam b(l.infos, l.total, global);
  run(b, half, 0, 18, nullptr);
  b.save_state(tmp.file("v2.safetensors"));
  write_as_v1(tmp.file("v2.safetensors"), tmp.file("v1.safetensors"), l, global);
  // Into a global optimizer: the same state, so the same steps.
  {
    std::vector<float> p = half;
    ScaledAdam c(l.infos, l.total, global);
    c.load_state(tmp.file("v1.safetensors"));
    EXPECT_EQ(c.steps_taken(), 18);
    run(c, p, 18, 30, nullptr);
    EXPECT_EQ(std::memcmp(p.data(), straight.data(), p.size() * sizeof(float)), 0);
  }
  // Into a per-group optimizer: the one window starts both groups.
  ScaledAdamOptions per_group = global;
  per_group.clipping = Clipping::per_group;
  std::vector<ScaledAdamStepInfo> ib, id;
  {
    std::vector<float> p = half;
    ScaledAdam ref(l.infos, l.total, global);
    ref.load_state(tmp.file("v1.safetensors"));
    run(ref, p, 18, 19, &ib);
  }
  std::vector<float> p = half;
  ScaledAdam d(l.infos, l.total, per_group);
  d.load_state(tmp.file("v1.safetensors"));
  run(d, p, 18, 19, &id);
  ASSERT_EQ(id[0].groups.size(), 2u);
  EXPECT_EQ(id[0].groups[0].threshold, ib[0].threshold);
  EXPECT_EQ(id[0].groups[1].threshold, ib[0].threshold);
  // A global v2 file does the same.
  ScaledAdam e(l.infos, l.total, per_group);
  e.load_state(tmp.file("v2.safetensors"));
  EXPECT_EQ(e.steps_taken(), 18);
}

TEST(ScaledAdam, PerGroupStateNeedsTheSameGroups) {
  TempDir tmp("scaled_adam_groups");
  Layout l = varied_layout();  // lr scales 1 and 0.5
  ScaledAdam a(l.infos, l.total, ScaledAdamOptions{});
  a.save_state(tmp.file("groups.safetensors"));
  ScaledAdamOptions global;
  global.clipping = Clipping::global;
  ScaledAdam b(l.infos, l.total, global);
  const std::string err = error_of([&] { b.load_state(tmp.file("groups.safetensors")); });
  EXPECT_NE(err.find("2 clipping groups"), std::string::npos) << err;
  EXPECT_NE(err.find("--clipping global"), std::string::npos) << err;
  // Other lr scales: other groups.
  Layout other = varied_layout();
  other.infos[3].lr_scale = 0.25f;
  ScaledAdam c(other.infos, other.total, ScaledAdamOptions{});
  EXPECT_NE(error_of([&] { c.load_state(tmp.file("groups.safetensors")); }).find("lr scales"), std::string::npos);
  // With one lr scale, per-group and global files are the same thing.
  Layout flat;
  flat.add("w", {4, 4});
  flat.add("s", {1});
  ScaledAdam one(flat.infos, flat.total, ScaledAdamOptions{});
  one.save_state(tmp.file("one.safetensors"));
  ScaledAdam one_global(flat.infos, flat.total, global);
  EXPECT_EQ(error_of([&] { one_global.load_state(tmp.file("one.safetensors")); }), "");
}

TEST(ScaledAdam, LoadStateNamesWhatIsWrong) {
  TempDir tmp("scaled_adam_err");
  Layout l = varied_layout();
  ScaledAdam a(l.infos, l.total, ScaledAdamOptions{});
  a.save_state(tmp.file("ok.safetensors"));
  // Another clipping period: the window has the wrong shape.
  ScaledAdamOptions other;
  other.clipping_update_period = 50;
  ScaledAdam b(l.infos, l.total, other);
  EXPECT_NE(error_of([&] { b.load_state(tmp.file("ok.safetensors")); }).find("model_norms"), std::string::npos);
  // A file without the momentum.
  std::vector<float> zeros(l.total);
  write_safetensors(tmp.file("partial.safetensors"), {{"exp_avg_sq", DType::F32, {l.total}, zeros.data()}});
  EXPECT_NE(error_of([&] { a.load_state(tmp.file("partial.safetensors")); }).find("momentum"), std::string::npos);
  EXPECT_NE(error_of([&] { a.load_state(tmp.file("absent.safetensors")); }), "");
}

TEST(ScaledAdam, SameResultForAnyThreadCount) {
  Layout l = varied_layout();
  auto run = [&](int threads) {
    const int saved = num_threads();
    set_num_threads(threads);
    ScaledAdam opt(l.infos, l.total, ScaledAdamOptions{});
    std::vector<float> p(l.total);
    Rng r(9);
    for (auto& x : p) x = (float)r.normal();
    for (int s = 0; s < 12; ++s) {
      std::vector<float> g = varied_grads(r, l, s);
      opt.step(p.data(), g.data(), 0.04f);
    }
    set_num_threads(saved);
    return p;
  };
  EXPECT_EQ(run(1), run(3));
}

TEST(ScaledAdam, VectorAndTailPathsAgree) {
  // Elements 0-7 of a 15-element tensor take the 8-wide path, 8-14 the element loop; equal
  // inputs must give equal bits.
  Layout l;
  l.add("w", {15});
  ScaledAdam opt(l.infos, l.total, ScaledAdamOptions{});
  Rng r(4);
  std::vector<float> p(15), g(15);
  for (int i = 0; i < 7; ++i) p[i] = p[i + 8] = (float)r.normal();
  p[7] = 0.5f;
  for (int s = 0; s < 9; ++s) {
    for (int i = 0; i < 7; ++i) g[i] = g[i + 8] = (float)(r.normal() * 1e-3);
    g[7] = 0.f;
    opt.step(p.data(), g.data(), 0.05f);
  }
  for (int i = 0; i < 7; ++i) EXPECT_EQ(p[i], p[i + 8]) << i;
}

TEST(Eden, WarmupAndDecay) {
  EdenSchedule e;  // base 0.045, B 5000, E 6, warmup 500 from 0.5
  EXPECT_DOUBLE_EQ(e.at(0, 0), (double)0.045f * 0.5);
  const double f250 = std::pow((250.0 * 250 + 5000.0 * 5000) / (5000.0 * 5000), -0.25);
  EXPECT_DOUBLE_EQ(e.at(250, 0), (double)0.045f * f250 * 0.75);
  const double f499 = std::pow((499.0 * 499 + 5000.0 * 5000) / (5000.0 * 5000), -0.25);
  EXPECT_DOUBLE_EQ(e.at(499, 0), (double)0.045f * f499 * (0.5 + 0.5 * 499 / 500));
  // At b = B and e = E both factors are 2^-0.25.
  EXPECT_DOUBLE_EQ(e.at(5000, 6), (double)0.045f * std::pow(2.0, -0.5));
  EXPECT_NEAR(e.at(5000, 0), (double)0.045f * std::pow(2.0, -0.25), 1e-15);
  // A fractional epoch counts: e = 3 gives (1.25)^-0.25.
  EXPECT_NEAR(e.at(20000, 3.0), (double)0.045f * std::pow(17.0, -0.25) * std::pow(1.25, -0.25), 1e-15);
  EXPECT_LT(e.at(10000, 2.5), e.at(10000, 2.0));
  EdenSchedule s = e;
  s.warmup_start = 0.1f;
  s.warmup_batches = 100;
  EXPECT_NEAR(s.at(50, 0), (double)0.045f * std::pow((2500.0 + 25e6) / 25e6, -0.25) * ((double)0.1f + (1 - (double)0.1f) * 0.5), 1e-15);
  EXPECT_NEAR(s.at(100, 0), (double)0.045f * std::pow((1e4 + 25e6) / 25e6, -0.25), 1e-15);
}

TEST(Eden, Eden2HasNoEpochTerm) {
  EdenSchedule e;
  e.eden2 = true;
  EXPECT_DOUBLE_EQ(e.at(0, 0), (double)0.045f * 0.5);
  EXPECT_DOUBLE_EQ(e.at(5000, 0), (double)0.045f * std::pow(2.0, -0.5));
  EXPECT_EQ(e.at(5000, 0), e.at(5000, 30));
  EXPECT_NEAR(e.at(15000, 1), (double)0.045f / std::sqrt(10.0), 1e-15);
  EXPECT_NEAR(e.at(100, 0), (double)0.045f * std::pow(1.0004, -0.5) * 0.6, 1e-15);
}

TEST(ScheduledFloat, ParsesPointsAndConstants) {
  const ScheduledFloat p = ScheduledFloat::parse("0:1,8000:0.25", "--balancer-prob");
  EXPECT_DOUBLE_EQ(p.at(-5), 1.0);
  EXPECT_DOUBLE_EQ(p.at(4000), 0.625);
  EXPECT_DOUBLE_EQ(p.at(9000), 0.25);
  EXPECT_EQ(p.str(), "0:1,8000:0.25");
  EXPECT_EQ(ScheduledFloat::parse(p.str(), "x").str(), p.str());
  EXPECT_DOUBLE_EQ(ScheduledFloat::parse("0.3", "x").at(123), 0.3);
  EXPECT_DOUBLE_EQ(ScheduledFloat::parse("100:0.5", "x").at(0), 0.5);
  for (const char* bad : {"", "abc", "0:1,", "0:1,0:2", "5:1,2:2", "0:1,0.5", "1:2:3", "0:nan"}) {
    const std::string e = error_of([&] { ScheduledFloat::parse(bad, "--balancer-prob"); });
    EXPECT_NE(e.find("--balancer-prob '" + std::string(bad) + "'"), std::string::npos) << bad << ": " << e;
    EXPECT_NE(e.find("STEP:VALUE"), std::string::npos) << e;
  }
}

// ---------------------------------------------------------------------------------------
// Oracle: 50 steps against tests/oracle/scaled_adam_ref.py.

std::string hex(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%a", x);
  return buf;
}

void run_oracle(const ScaledAdamOptions& o, const EdenSchedule& eden) {
  TempDir tmp("scaled_adam_oracle");
  Layout l;
  l.add("scalar", {1});
  l.add("gain", {7});
  l.add("proj", {6, 5});
  l.add("conv", {4, 3, 2}, 0.5f);
  l.add("embed", {130, 70});
  l.add("near_max", {3, 4});
  l.add("tiny", {2, 3});
  const int steps = 50;
  Rng r(2024);
  std::vector<float> init(l.total);
  auto fill = [&](const std::string& name, auto fn) {
    for (const ParamInfo& p : l.infos)
      if (p.name == name)
        for (int64_t i = 0; i < p.numel; ++i) init[p.offset + i] = (float)fn();
  };
  fill("scalar", [] { return 9.97; });
  fill("gain", [&] { return 1.0 + 0.1 * r.normal(); });
  fill("proj", [&] { return 0.05 * r.normal(); });
  fill("conv", [&] { return 1.5 * r.normal(); });
  fill("embed", [&] { return 0.02 * r.normal(); });
  fill("near_max", [&] { return r.normal() < 0 ? -2.97 : 2.97; });
  fill("tiny", [&] { return 3e-6 * r.normal(); });

  // Gradients [step][element]: noise, pulls that grow the scalar and `near_max` and shrink
  // `tiny`, spikes for clipping and one NaN.
  std::vector<std::vector<float>> grads(steps, std::vector<float>(l.total));
  for (int s = 0; s < steps; ++s) {
    const double spike = s == 15 ? 20 : s == 27 ? 50 : s == 44 ? 8 : 1;
    for (const ParamInfo& p : l.infos) {
      for (int64_t i = 0; i < p.numel; ++i) {
        const float x = init[p.offset + i];
        double g;
        if (p.name == "scalar") g = -1.0 + 0.3 * r.normal();
        else if (p.name == "gain") g = 0.5 * r.normal();
        else if (p.name == "proj") g = 2.0 * r.normal();
        else if (p.name == "conv") g = 0.3 * r.normal() + 0.2 * x;  // a steady pull to shrink
        else if (p.name == "embed") g = 0.01 * r.normal();
        else if (p.name == "near_max") g = -0.5 * x + 0.1 * r.normal();
        else g = (x > 0 ? 0.5 : -0.5) + 0.05 * r.normal();
        grads[s][p.offset + i] = (float)(g * spike);
      }
    }
  }
  const ParamInfo& embed = l.infos[4];
  grads[33][embed.offset + 17] = std::numeric_limits<float>::quiet_NaN();

  const double epoch_per_batch = 0.05;

  std::vector<SafetensorsOut> out;
  std::vector<std::vector<float>> stacked(l.infos.size());
  std::map<std::string, std::string> meta = {
      {"beta1", hex(o.beta1)}, {"beta2", hex(o.beta2)}, {"eps", hex(o.eps)},
      {"scalar_lr_scale", hex(o.scalar_lr_scale)}, {"param_min_rms", hex(o.param_min_rms)},
      {"param_max_rms", hex(o.param_max_rms)}, {"scalar_max", hex(o.scalar_max)},
      {"size_update_period", std::to_string(o.size_update_period)}, {"clipping_scale", hex(o.clipping_scale)},
      {"clipping_update_period", std::to_string(o.clipping_update_period)}, {"steps", std::to_string(steps)},
      {"base_lr", hex(eden.base_lr)}, {"lr_batches", hex(eden.lr_batches)}, {"lr_epochs", hex(eden.lr_epochs)},
      {"warmup_batches", hex(eden.warmup_batches)}, {"warmup_start", hex(eden.warmup_start)},
      {"eden2", eden.eden2 ? "1" : "0"}, {"epoch_per_batch", hex(epoch_per_batch)},
      {"clipping", o.clipping == Clipping::global ? "global" : "per-group"}};
  std::string names;
  for (size_t t = 0; t < l.infos.size(); ++t) {
    const ParamInfo& p = l.infos[t];
    names += (t ? "," : "") + p.name;
    meta["lr_scale/" + p.name] = hex(p.lr_scale);
    out.push_back({"init/" + p.name, DType::F32, p.shape, init.data() + p.offset});
    for (int s = 0; s < steps; ++s)
      stacked[t].insert(stacked[t].end(), grads[s].begin() + p.offset, grads[s].begin() + p.offset + p.numel);
    Shape gs = {steps};
    gs.insert(gs.end(), p.shape.begin(), p.shape.end());
    out.push_back({"grads/" + p.name, DType::F32, gs, stacked[t].data()});
  }
  meta["names"] = names;
  write_safetensors(tmp.file("in.safetensors"), out, meta);

  const std::string cmd = "/usr/bin/python3 " SUBLLM_SOURCE_DIR "/tests/oracle/scaled_adam_ref.py " +
                          tmp.file("in.safetensors") + " " + tmp.file("ref.safetensors");
  ASSERT_EQ(std::system(cmd.c_str()), 0) << "reference failed: " << cmd
                                         << " (is python3-torch installed? run scripts/setup.sh)";
  SafetensorsFile ref(tmp.file("ref.safetensors"));
  ScaledAdam opt(l.infos, l.total, o);
  const int ng = opt.clip_groups();
  // Per group: lr 1 (everything else) and lr 0.5 (`conv`); global: one group.
  EXPECT_EQ(ng, o.clipping == Clipping::global ? 1 : 2);
  std::vector<float> ref_lr(steps), ref_norm(steps), ref_scales(ng);
  std::vector<float> ref_gclip((size_t)steps * ng), ref_gnorm((size_t)steps * ng), ref_gthr((size_t)steps * ng);
  ref.read_f32("lr", {steps}, ref_lr.data());
  ref.read_f32("grad_norm", {steps}, ref_norm.data());
  ref.read_f32("group_lr_scale", {ng}, ref_scales.data());
  ref.read_f32("group_clip_factor", {steps, ng}, ref_gclip.data());
  ref.read_f32("group_grad_norm", {steps, ng}, ref_gnorm.data());
  ref.read_f32("group_threshold", {steps, ng}, ref_gthr.data());
  std::vector<std::vector<float>> ref_traj(l.infos.size());
  for (size_t t = 0; t < l.infos.size(); ++t) {
    const ParamInfo& p = l.infos[t];
    Shape ts = {steps};
    ts.insert(ts.end(), p.shape.begin(), p.shape.end());
    ref_traj[t].resize((size_t)steps * p.numel);
    ref.read_f32("traj/" + p.name, ts, ref_traj[t].data());
  }

  std::vector<float> params = init;
  double worst = 0;
  std::string worst_at;
  int clipped = 0, skipped = 0, scalar_at_max = 0, groups_differ = 0;
  for (int s = 0; s < steps; ++s) {
    const double lr = eden.at(s + 1, s * epoch_per_batch);
    EXPECT_NEAR(lr, ref_lr[s], 1e-7 * lr) << "step " << s;
    std::vector<float> g = grads[s];
    ScaledAdamStepInfo info = opt.step(params.data(), g.data(), (float)lr);
    if (std::isfinite(ref_norm[s])) {
      EXPECT_NEAR(info.grad_norm, ref_norm[s], 1e-5 * ref_norm[s]) << "step " << s;
    }
    ASSERT_EQ((int)info.groups.size(), ng);
    for (int gi = 0; gi < ng; ++gi) {
      const ClipGroupStats& st = info.groups[gi];
      const size_t at = (size_t)s * ng + gi;
      if (o.clipping == Clipping::per_group) {
        EXPECT_EQ(st.lr_scale, ref_scales[gi]) << "group " << gi;
      }
      EXPECT_NEAR(st.clip_factor, ref_gclip[at], 1e-5 * ref_gclip[at]) << "step " << s << " group " << gi;
      EXPECT_NEAR(st.threshold, ref_gthr[at], 1e-5 * ref_gthr[at]) << "step " << s << " group " << gi;
      if (std::isfinite(ref_gnorm[at])) {
        EXPECT_NEAR(st.grad_norm, ref_gnorm[at], 1e-5 * ref_gnorm[at]) << "step " << s << " group " << gi;
      }
      groups_differ += gi > 0 && std::fabs(st.clip_factor - info.groups[0].clip_factor) > 1e-3;
    }
    // The main group is the lr-1 one (most elements).
    EXPECT_EQ(info.clip_factor, info.groups[0].clip_factor);
    clipped += info.clip_factor > 0 && info.clip_factor < 1;
    skipped += info.skipped;
    scalar_at_max += params[l.infos[0].offset] == 10.f;
    for (size_t t = 0; t < l.infos.size(); ++t) {
      const ParamInfo& p = l.infos[t];
      const float* want = ref_traj[t].data() + (size_t)s * p.numel;
      double scale = 0, err = 0;
      for (int64_t i = 0; i < p.numel; ++i) scale = std::max(scale, (double)std::fabs(want[i]));
      for (int64_t i = 0; i < p.numel; ++i)
        err = std::max(err, std::fabs((double)params[p.offset + i] - want[i]) / scale);
      if (err > worst) worst = err, worst_at = p.name + " after step " + std::to_string(s);
    }
  }
  std::printf("[ oracle ] worst relative error %.3g (%s); %d clipped, %d skipped, scalar at max %d steps, "
              "%d with group factors apart\n",
              worst, worst_at.c_str(), clipped, skipped, scalar_at_max, groups_differ);
  EXPECT_LE(worst, 1e-5) << worst_at;
  EXPECT_GE(clipped, 3);
  EXPECT_EQ(skipped, 1);
  EXPECT_GT(scalar_at_max, 0);
  // Per group, the groups' factors part on the clipped steps (else the test could not tell).
  if (o.clipping == Clipping::per_group) {
    EXPECT_GE(groups_differ, 2);
  }
}

TEST(ScaledAdamOracle, FiftyStepsMatchPyTorch) {
  ScaledAdamOptions o;
  o.clipping_update_period = 48;  // early estimates at 10, 20, 40 and a full window at 48
  EdenSchedule eden;
  eden.warmup_batches = 30;
  eden.lr_batches = 40;
  eden.lr_epochs = 2;
  run_oracle(o, eden);
}

TEST(ScaledAdamOracle, OtherSettingsMatchPyTorch) {
  // Large scale steps (the 0.1 clamp engages on `conv`), another size period, other betas, Eden2.
  ScaledAdamOptions o;
  o.beta1 = 0.8f;
  o.beta2 = 0.95f;
  o.scalar_lr_scale = 3.f;
  o.size_update_period = 3;
  o.clipping_scale = 1.5f;
  o.clipping_update_period = 30;
  EdenSchedule eden;
  eden.eden2 = true;
  eden.base_lr = 0.03f;
  eden.warmup_batches = 10;
  eden.warmup_start = 0.2f;
  eden.lr_batches = 20;
  run_oracle(o, eden);
}

TEST(ScaledAdamOracle, GlobalClippingMatchesPyTorch) {
  // --clipping global: one window over every tensor, one factor for all.
  ScaledAdamOptions o;
  o.clipping_update_period = 48;
  o.clipping = Clipping::global;
  EdenSchedule eden;
  eden.warmup_batches = 30;
  eden.lr_batches = 40;
  eden.lr_epochs = 2;
  run_oracle(o, eden);
}

}  // namespace scaled_adam_tests
}  // namespace subllm
