// SUBLLM: subsampling, upsampling, bypass and balancer, in training and inference modes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "grad_check.h"
#include "kernels/kernels.h"
#include "subllm/error.h"
#include "subllm/model.h"
#include "test_util.h"

namespace subllm {
namespace subllm_tests {

// Working memory for kernels::balancer_backward (n doubles).
double* balancer_scratch(int64_t n) {
  static std::vector<double> buf;
  buf.resize((size_t)n);
  return buf.data();
}

ModelConfig subllm_config(const std::string& structure, std::vector<float> retentions) {
  ModelConfig c;
  c.vocab_size = 13;
  c.dim = 16;
  c.ffn_dim = 24;
  c.n_heads = 2;
  c.context = 32;
  c.structure = structure;
  c.n_layers = (int)std::count(structure.begin(), structure.end(), 'T');
  c.retentions = std::move(retentions);
  return c;
}

// Random weights large enough that every path carries gradient; score layers scaled so
// scores spread over about [-1, 1] and many fall inside the (0, 1) clamp window.
void randomize(Model& m, uint64_t seed) {
  Rng r(seed);
  for (const auto& p : m.params()) {
    float* w = m.param_data() + p.offset;
    const bool score = p.name.find("to_scores") != std::string::npos;
    const bool bypass = p.name.find("bypass_scale") != std::string::npos;
    for (int64_t i = 0; i < p.numel; ++i) {
      if (bypass) w[i] = (float)(0.5 + 0.2 * r.normal());
      else if (score) w[i] = (float)(0.12 * r.normal());
      else if (p.shape.size() == 1) w[i] = (float)(1.0 + 0.2 * r.normal());
      else w[i] = (float)(0.3 * r.normal());
    }
  }
}

// Everything a finite difference must not cross: which tokens are kept and on which side
// of the clamp's kinks each score lies.
std::vector<int> decision_signature(const Model& m) {
  std::vector<int> sig;
  for (const auto& t : m.last_traces()) {
    sig.insert(sig.end(), t.kept.begin(), t.kept.end());
    for (float s : t.scores) sig.push_back(s < 0 ? 0 : (s > 1 ? 2 : 1));
  }
  return sig;
}

// Finite differences in training mode with fixed random choices; entries whose
// perturbation changes a discrete decision are skipped (at most a quarter of them).
void check_subllm_gradients(const std::string& structure, std::vector<float> ret, uint64_t seed) {
  Model m(subllm_config(structure, ret));
  m.knobs().balancer_prob = ScheduledFloat(0.0f);  // the balancer's edit is not a gradient
  m.knobs().bypass_limit_prob = 0.0f;              // nor is the bypass limit's flip
  m.set_train_context(3, seed);
  randomize(m, seed);
  const int B = 2, T = 11;
  Rng r(seed + 1);
  std::vector<int32_t> tok(B * T), tgt(B * T);
  for (int i = 0; i < B * T; ++i) {
    tok[i] = (int32_t)r.below(13);
    tgt[i] = (int32_t)r.below(13);
  }
  m.zero_grad();
  m.forward_backward(tok.data(), tgt.data(), B, T);
  const std::vector<int> base = decision_signature(m);
  int checked = 0, skipped = 0;
  for (const auto& p : m.params()) {
    const size_t stride = std::max<size_t>(1, p.numel / 16);
    for (size_t i = 0; i < (size_t)p.numel; i += stride) {
      float* w = m.param_data() + p.offset + i;
      const float keep = *w;
      bool stable = true;
      auto loss_at = [&](float h) {
        *w = keep + h;
        double l = m.forward(tok.data(), tgt.data(), B, T, nullptr, Mode::Train);
        stable = stable && decision_signature(m) == base;
        *w = keep;
        return l;
      };
      const float h = 1e-2f;
      auto central = [&](float step) { return (loss_at(step) - loss_at(-step)) / (2.0 * step); };
      const double fd = (4.0 * central(h / 2) - central(h)) / 3.0;
      if (!stable) {
        ++skipped;
        continue;
      }
      ++checked;
      const double g = m.grad_data()[p.offset + i];
      const double err = std::fabs(fd - g) / std::max({std::fabs(fd), std::fabs(g), 2e-3});
      EXPECT_LT(err, 3e-2) << p.name << "[" << i << "]: finite difference " << fd << " vs analytic " << g;
    }
  }
  EXPECT_GT(checked, 3 * skipped) << "too many entries crossed a decision boundary";
  // The score and bypass parameters must actually carry gradient in this test.
  for (const auto& p : m.params()) {
    if (p.name.find("to_scores") == std::string::npos && p.name.find("bypass") == std::string::npos) continue;
    double norm = 0;
    for (int64_t i = 0; i < p.numel; ++i) norm += std::fabs(m.grad_data()[p.offset + i]);
    EXPECT_GT(norm, 1e-4) << p.name << " has no gradient";
  }
}

TEST(Subllm, GradientsMatchFiniteDifferencesOneLevel) { check_subllm_gradients("TT(TT)T", {0.6f}, 21); }
TEST(Subllm, GradientsMatchFiniteDifferencesNested) { check_subllm_gradients("T(T(T)T)T", {0.6f, 0.5f}, 26); }
TEST(Subllm, GradientsMatchFiniteDifferencesAtTheEdges) { check_subllm_gradients("(T)T(T)", {0.7f}, 23); }

TEST(Subllm, TrainingSelectionKeepsTopScoresInOrderAtOriginalPositions) {
  Model m(subllm_config("T(T(T)T)T", {0.6f, 0.5f}));
  randomize(m, 5);
  m.set_train_context(0, 9);
  const int B = 3, T = 17;
  std::vector<int32_t> tok(B * T, 4), tgt(B * T, 1);
  for (int i = 0; i < B * T; ++i) tok[i] = (int32_t)(i * 7 % 13);
  m.forward(tok.data(), tgt.data(), B, T, nullptr, Mode::Train);
  const auto& tr = m.last_traces();
  ASSERT_EQ(tr.size(), 2u);
  EXPECT_EQ(tr[0].kept_per_seq, 11);  // ceil(17 * 0.6)
  EXPECT_EQ(tr[1].kept_per_seq, 6);   // ceil(11 * 0.5)
  for (int level = 0; level < 2; ++level) {
    const int Tp = level == 0 ? T : 11, Tc = tr[level].kept_per_seq;
    for (int b = 0; b < B; ++b) {
      const float* s = tr[level].scores.data() + b * Tp;
      const int32_t* k = tr[level].kept.data() + b * Tc;
      std::set<int> kept(k, k + Tc);
      for (int i = 1; i < Tc; ++i) EXPECT_LT(k[i - 1], k[i]) << "kept tokens must be in sequence order";
      float lowest_kept = 1e30f, highest_dropped = -1e30f;
      for (int t = 0; t < Tp; ++t) (kept.count(t) ? lowest_kept : highest_dropped) =
          kept.count(t) ? std::min(lowest_kept, s[t]) : std::max(highest_dropped, s[t]);
      EXPECT_GE(lowest_kept, highest_dropped);
    }
  }
  // The same context gives the same choices; another step may flip differently but keeps
  // the same tokens (the scores did not change).
  auto before = tr[0].kept;
  m.forward(tok.data(), tgt.data(), B, T, nullptr, Mode::Train);
  EXPECT_EQ(m.last_traces()[0].kept, before);
}

TEST(Subllm, ScoreStatsSummariseTheLastPass) {
  Model m(subllm_config("T(T(T)T)T", {0.6f, 0.5f}));
  randomize(m, 5);
  m.set_train_context(0, 9);
  const int B = 3, T = 17;
  std::vector<int32_t> tok(B * T), tgt(B * T, 1);
  for (int i = 0; i < B * T; ++i) tok[i] = (int32_t)(1 + i * 7 % 12);
  m.knobs().keep_threshold = 0.1f;
  m.forward(tok.data(), tgt.data(), B, T, nullptr, Mode::Train);
  const auto& tr = m.last_traces();
  const auto st = m.score_stats();
  ASSERT_EQ(st.size(), 2u);
  for (int j = 0; j < 2; ++j) {
    const int Tp = (int)tr[j].scores.size() / B, Tc = tr[j].kept_per_seq;
    int above = 0;
    double sq = 0, w = 0;
    for (float s : tr[j].scores) {
      above += s > 0.1f;
      sq += (double)s * s;
    }
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < Tc; ++i) w += std::clamp(tr[j].scores[b * Tp + tr[j].kept[b * Tc + i]], 0.0f, 1.0f);
    EXPECT_NEAR(st[j].above, (double)above / (B * Tp), 1e-12);
    EXPECT_NEAR(st[j].rms, std::sqrt(sq / (B * Tp)), 1e-6);
    EXPECT_NEAR(st[j].kept_weight, w / (B * Tc), 1e-6);
    EXPECT_GT(st[j].rms, 0.0);
  }
}

TEST(Subllm, InferenceKeepsExactlyTheTokensAboveTheThreshold) {
  // With a subsampler first, its input is the embedding, so the scores are computed here
  // independently of the model.
  Model m(subllm_config("(TT)T", {0.5f}));
  randomize(m, 7);
  const int T = 20;
  std::vector<int32_t> tok(T);
  for (int t = 0; t < T; ++t) tok[t] = (int32_t)(t % 13);
  tok[4] = 0;  // padding is never kept
  const float* emb = m.param("decoder.embed_tokens.weight").f32();
  const float* ws = m.param("decoder.downsamplers.0.to_scores.weight").f32();
  for (float v : {0.0f, 0.3f, -0.2f}) {
    m.knobs().keep_threshold = v;
    m.reset_retention_stats();
    m.forward(tok.data(), nullptr, 1, T, nullptr, Mode::Inference);
    std::vector<int32_t> expect;
    for (int t = 0; t < T; ++t) {
      double s = 0;
      for (int c = 0; c < 16; ++c) s += (double)emb[tok[t] * 16 + c] * ws[c];
      if (s > v && tok[t] != 0) expect.push_back(t);
    }
    EXPECT_EQ(m.last_traces()[0].kept, expect) << "threshold " << v;
    EXPECT_NEAR(m.retention()[0], (double)expect.size() / T, 1e-12);
  }
}

TEST(Subllm, InferenceSkipsASegmentThatKeepsNothing) {
  Model m(subllm_config("T(T)T", {0.5f}));
  randomize(m, 8);
  m.knobs().keep_threshold = 1e9f;
  const int T = 9;
  std::vector<int32_t> tok(T, 3), tgt(T, 2);
  const float with_none = m.forward(tok.data(), tgt.data(), 1, T, nullptr, Mode::Inference);
  EXPECT_TRUE(m.last_traces()[0].kept.empty());
  // Keeping nothing equals the same model with the inner block's contribution removed:
  // zero bypass scales make the segment a no-op whatever it keeps.
  m.knobs().keep_threshold = -1e9f;
  Tensor c = m.param("decoder.bypasses.0.bypass_scale");
  std::fill(c.f32(), c.f32() + c.numel(), 0.0f);
  EXPECT_FLOAT_EQ(m.forward(tok.data(), tgt.data(), 1, T, nullptr, Mode::Inference), with_none);
}

TEST(Subllm, PlainStructureIsTheLlamaPathInBothModes) {
  ModelConfig c = subllm_config("TTT", {});
  Model a(c);
  randomize(a, 9);
  const int B = 2, T = 9;
  std::vector<int32_t> tok(B * T), tgt(B * T);
  for (int i = 0; i < B * T; ++i) {
    tok[i] = (int32_t)(1 + i % 12);  // no padding tokens, which inference never keeps
    tgt[i] = (int32_t)((i * 5) % 13);
  }
  std::vector<float> la(B * T * 13), lb(B * T * 13);
  const float train = a.forward(tok.data(), tgt.data(), B, T, la.data(), Mode::Train);
  const float infer = a.forward(tok.data(), tgt.data(), B, T, lb.data(), Mode::Inference);
  EXPECT_EQ(train, infer);
  EXPECT_EQ(la, lb);
  // Training and inference modes agree on a SUBLLM whose subsampler keeps every token with
  // weight 1 in both: retention 1 and scores far above 1.
  ModelConfig s = subllm_config("T(T)T", {1.0f});
  Model b(s);
  randomize(b, 10);
  for (int k = 0; k < 16; ++k) b.param("decoder.downsamplers.0.to_scores.weight").f32()[k] = 0.f;
  // A constant direction: add a large bias through one channel of the embedding.
  for (int v = 0; v < 13; ++v) b.param("decoder.embed_tokens.weight").f32()[v * 16] = 50.f;
  b.param("decoder.downsamplers.0.to_scores.weight").f32()[0] = 1.f;
  const float t2 = b.forward(tok.data(), tgt.data(), B, T, la.data(), Mode::Train);
  const float i2 = b.forward(tok.data(), tgt.data(), B, T, lb.data(), Mode::Inference);
  EXPECT_NEAR(t2, i2, 1e-5);
}

TEST(Subllm, BalancerEditMatchesItsFormula) {
  // Scores with too few positives (mean/std far below the bound) and too small an RMS.
  const int n = 40;
  Rng r(3);
  std::vector<float> x(n), d(n);
  for (int i = 0; i < n; ++i) {
    x[i] = (float)(-0.3 + 0.2 * r.normal());
    d[i] = (float)r.normal();
  }
  const double mmin = kernels::proportion_positive_to_mean(0.55), mmax = kernels::proportion_positive_to_mean(0.65);
  const double rmin = 1.25331413732, rmax = 4 * 1.25331413732, scale = 0.04;
  // The constraint loss, evaluated directly in double.
  auto loss = [&](const std::vector<double>& v) {
    double s = 0, ss = 0;
    for (double e : v) {
      s += e;
      ss += e * e;
    }
    const double mean = s / n, uv = ss / n, sd = std::sqrt(std::max(uv - mean * mean, 1e-20));
    const double rms = std::sqrt(std::max(uv, 1e-20)), m = mean / sd;
    return std::fabs(m - std::clamp(m, mmin, mmax)) + std::fabs(std::log(std::clamp(rms, rmin, rmax) / rms));
  };
  std::vector<double> xd(x.begin(), x.end()), g(n);
  double g_sq = 0;
  for (int i = 0; i < n; ++i) {
    auto p = xd, q = xd;
    p[i] += 1e-6;
    q[i] -= 1e-6;
    g[i] = (loss(p) - loss(q)) / 2e-6;
    g_sq += g[i] * g[i];
  }
  const double g_rms = std::sqrt(g_sq / n);
  std::vector<float> edited = d;
  kernels::balancer_backward(x.data(), edited.data(), n, balancer_scratch(n), mmin, mmax, rmin, rmax, scale);
  for (int i = 0; i < n; ++i) {
    const double expect = d[i] + std::fabs(d[i]) * g[i] * scale / g_rms;
    EXPECT_NEAR(edited[i], expect, 1e-5 * (1 + std::fabs(expect))) << i;
  }
  // The edit pushes toward more positive scores: negative gradients (which raise x under
  // gradient descent) grow.
  double before = 0, after = 0;
  for (int i = 0; i < n; ++i) {
    before += d[i];
    after += edited[i];
  }
  EXPECT_LT(after, before);
  // Inside the bounds nothing changes.
  std::vector<float> ok(n), dd = d;
  for (int i = 0; i < n; ++i) ok[i] = (float)(2.0 * r.normal() + 0.6);
  const double m_ok = kernels::proportion_positive_to_mean(0.5);
  kernels::balancer_backward(ok.data(), dd.data(), n, balancer_scratch(n), m_ok - 10, m_ok + 10, 0.1, 100, scale);
  EXPECT_EQ(dd, d);
}

// Skewed scores: 30 % positive but a long positive tail, so mean/std says "too many positive"
// while the count says too few. The counted variant acts on the count: the mean/std term's
// gradient, weighted by how far the count is from its target and spread over every score at
// the mean |d| (so scores whose own gradient is 0, as below the clamp, move too).
TEST(Subllm, CountedBalancerJudgesThePositiveFractionByCounting) {
  const int n = 100;
  std::vector<float> x(n), d(n);
  Rng r(5);
  for (int i = 0; i < n; ++i) {
    x[i] = i % 10 < 3 ? 3.0f : -0.5f;
    d[i] = i % 10 == 9 ? 0.0f : (float)r.normal();
  }
  const double mmin = kernels::proportion_positive_to_mean(0.55), mmax = kernels::proportion_positive_to_mean(0.65);
  const double rmin = 1.25331413732, rmax = 4 * 1.25331413732, scale = 0.04;
  double s = 0, ss = 0, sum_abs_d = 0;
  int with_grad = 0;
  for (int i = 0; i < n; ++i) {
    s += x[i];
    ss += (double)x[i] * x[i];
    sum_abs_d += std::fabs(d[i]);
    with_grad += d[i] != 0.0f;
  }
  const double mean = s / n, sd = std::sqrt(ss / n - mean * mean), m = mean / sd, rms = std::sqrt(ss / n);
  ASSERT_GT(m, mmax);  // mean/std above the window: the paper's balancer pushes scores down
  ASSERT_GT(rms, rmin);
  ASSERT_LT(rms, rmax);
  auto sum = [](const std::vector<float>& v) { return std::accumulate(v.begin(), v.end(), 0.0); };
  std::vector<float> gaussian = d, counted = d;
  kernels::balancer_backward(x.data(), gaussian.data(), n, balancer_scratch(n), mmin, mmax, rmin, rmax, scale);
  kernels::balancer_backward(x.data(), counted.data(), n, balancer_scratch(n), mmin, mmax, rmin, rmax, scale, 0.6, 0.05);
  EXPECT_GT(sum(gaussian), sum(d));  // larger gradients: scores pushed down
  EXPECT_LT(sum(counted), sum(d));   // smaller gradients: scores pushed up
  // 0.3 positive against 0.6 +- 0.05: full strength. The edit is -d(mean/std)/dx rescaled to
  // RMS `scale`, times the mean |d| of the scores that have a gradient.
  std::vector<double> g(n);
  double g_sq = 0;
  for (int i = 0; i < n; ++i) {
    g[i] = (1.0 - m * (x[i] - mean) / sd) / (n * sd);
    g_sq += g[i] * g[i];
  }
  const double g_rms = std::sqrt(g_sq / n);
  for (int i = 0; i < n; ++i) {
    const double expect = d[i] - sum_abs_d / with_grad * g[i] * scale / g_rms;
    EXPECT_NEAR(counted[i], expect, 1e-5 * (1 + std::fabs(expect))) << i;
    if (d[i] == 0.0f) {
      EXPECT_LT(counted[i], 0.0f) << i;  // no gradient of its own, pushed up all the same
    }
  }
  // Inside the window the push is proportional to the distance from the target: 0.3 against
  // 0.32 +- 0.05 is 0.4 of full strength, and a count on the target leaves d alone.
  std::vector<float> near = d, on = d;
  kernels::balancer_backward(x.data(), near.data(), n, balancer_scratch(n), mmin, mmax, rmin, rmax, scale, 0.32, 0.05);
  for (int i = 0; i < n; ++i) EXPECT_NEAR(near[i] - d[i], 0.4 * (counted[i] - d[i]), 1e-6) << i;
  kernels::balancer_backward(x.data(), on.data(), n, balancer_scratch(n), mmin, mmax, rmin, rmax, scale, 0.3, 0.05);
  EXPECT_EQ(on, d);
}

TEST(Subllm, BalancerAndBypassLimitChangeTheGradientsWhenOn) {
  Model m(subllm_config("T(T)T", {0.6f}));
  m.init_weights(4);
  const int B = 2, T = 12;
  std::vector<int32_t> tok(B * T), tgt(B * T);
  for (int i = 0; i < B * T; ++i) {
    tok[i] = (int32_t)(i * 3 % 13);
    tgt[i] = (int32_t)(i * 5 % 13);
  }
  auto grads = [&](float bal, float lim) {
    m.knobs().balancer_prob = ScheduledFloat(bal);
    m.knobs().bypass_limit_prob = lim;
    m.set_train_context(0, 1);
    m.zero_grad();
    m.forward_backward(tok.data(), tgt.data(), B, T);
    return std::pair{std::vector<float>(m.grad("decoder.downsamplers.0.to_scores.weight").f32(),
                                        m.grad("decoder.downsamplers.0.to_scores.weight").f32() + 16),
                     std::vector<float>(m.grad("decoder.bypasses.0.bypass_scale").f32(),
                                        m.grad("decoder.bypasses.0.bypass_scale").f32() + 16)};
  };
  auto [s0, c0] = grads(0.f, 0.f);
  auto [s1, c1] = grads(1.f, 0.f);
  EXPECT_NE(s0, s1) << "the balancer must edit the score gradient (initial scores violate its bounds)";
  EXPECT_EQ(c0, c1);
  auto [s2, c2] = grads(0.f, 1.f);
  EXPECT_EQ(s0, s2);
  // At step 0, c = 0.5 lies below c_min = 0.9: positive gradients (pushing c down) flip.
  for (int i = 0; i < 16; ++i) EXPECT_EQ(c2[i], c0[i] > 0 ? -c0[i] : c0[i]) << i;
  EXPECT_TRUE(m.last_traces()[0].limit_on);
}

// The data-parallel hook: each span is reported once, when its gradient is final, and the
// spans of a pass tile the whole gradient buffer.
TEST(Subllm, GradientReadyHookReportsEverySpanOnceWhenFinal) {
  for (const bool tie : {false, true}) {
    ModelConfig c = subllm_config("T(T(T)T)T", {0.6f, 0.5f});
    c.tie_weights = tie;
    Model m(c);
    randomize(m, 31);
    std::vector<int32_t> tokens(2 * 12), targets(2 * 12);
    Rng r(3);
    for (size_t i = 0; i < tokens.size(); ++i) {
      tokens[i] = (int32_t)r.below(c.vocab_size);
      targets[i] = (int32_t)r.below(c.vocab_size);
    }
    std::vector<std::pair<int64_t, int64_t>> spans;
    std::vector<std::vector<float>> at_report;
    m.session().on_grad_ready([&](int64_t first, int64_t last) {
      spans.emplace_back(first, last);
      at_report.emplace_back(m.grad_data() + first, m.grad_data() + last);
    });
    m.set_train_context(4, 9);
    m.zero_grad();
    m.forward_backward(tokens.data(), targets.data(), 2, 12);
    // Backward order: the head (untied), the final norm, the last block, ..., the embedding.
    const Weights& w = m.weights();
    std::vector<int64_t> expect_first;
    if (!tie) expect_first.push_back(w.head_span().first);
    expect_first.push_back(w.final_norm_span().first);
    expect_first.push_back(w.block_span(4).first);
    ASSERT_GT(spans.size(), expect_first.size());
    for (size_t i = 0; i < expect_first.size(); ++i) EXPECT_EQ(spans[i].first, expect_first[i]) << "tie " << tie;
    EXPECT_EQ(spans.back().first, w.embed_span().first);
    for (size_t i = 0; i < spans.size(); ++i)
      EXPECT_EQ(at_report[i], std::vector<float>(m.grad_data() + spans[i].first, m.grad_data() + spans[i].second))
          << "span " << i << " changed after it was reported final";
    std::sort(spans.begin(), spans.end());
    int64_t at = 0;
    for (const auto& [first, last] : spans) {
      EXPECT_EQ(first, at) << "gap or overlap before " << first;
      at = last;
    }
    EXPECT_EQ(at, m.num_params());
  }
}

TEST(Subllm, PublishedConfigLoadsWithTheAuthorsNames) {
  ModelConfig c = load_config(std::string(SUBLLM_SOURCE_DIR) + "/configs/subllm-1.3B-keep0p4-4k.json");
  Model m(c);
  EXPECT_EQ(m.structure().num_subsamplers, 2);
  EXPECT_EQ(m.param_info("decoder.downsamplers.1.to_scores.weight").shape, (Shape{1, 2048}));
  EXPECT_EQ(m.param_info("decoder.bypasses.0.bypass_scale").shape, (Shape{2048}));
  EXPECT_FLOAT_EQ(m.param_info("decoder.downsamplers.0.to_scores.weight").lr_scale, 0.5f);
  // 24 blocks of 4·2048² + 3·2048·5504, embeddings, output, norms, scores and bypasses.
  const int64_t expect = 24 * (4LL * 2048 * 2048 + 3LL * 2048 * 5504 + 2 * 2048) + 2 * 32000LL * 2048 + 2048 + 4 * 2048;
  int64_t total = 0;
  for (const auto& p : m.params()) total += p.numel;
  EXPECT_EQ(total, expect);
  EXPECT_EQ(m.segment_lengths(4096), (std::vector<int>{4096, 2622, 1679}));
}

TEST(Subllm, SaveLoadRoundTripsAndRejectsALlamaCheckpoint) {
  testing::TempDir tmp("subllm");
  Model a(subllm_config("T(T(T)T)T", {0.6f, 0.5f}));
  a.init_weights(3);
  a.save(tmp.file("m.safetensors"));
  Model b(subllm_config("T(T(T)T)T", {0.6f, 0.5f}));
  b.load(tmp.file("m.safetensors"));
  for (int64_t i = 0; i < a.num_params(); ++i) ASSERT_EQ(a.param_data()[i], b.param_data()[i]);
  Model llama(subllm_config("TTTTT", {}));
  llama.save(tmp.file("l.safetensors"));
  std::string msg = testing::error_of([&] { b.load(tmp.file("l.safetensors")); });
  EXPECT_NE(msg.find("decoder.downsamplers.0.to_scores.weight"), std::string::npos) << msg;
}

}  // namespace subllm_tests
}  // namespace subllm
