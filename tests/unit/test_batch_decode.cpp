// Batched cached inference (Session::forward_cached_batch): several sequences' steps in one
// pass give what each would give alone through forward_cached, with per-step keep thresholds
// and token depths; bad batches are refused before any cache changes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "subllm/error.h"
#include "subllm/model.h"
#include "subllm/rng.h"
#include "test_util.h"

namespace subllm {
namespace {

using testing::error_of;
using Step = Session::CachedStep;

ModelConfig batch_config(const std::string& structure, std::vector<float> ret) {
  ModelConfig c;
  c.vocab_size = 300;
  c.dim = 32;
  c.ffn_dim = 48;
  c.n_heads = 4;
  c.context = 80;
  c.structure = structure;
  c.n_layers = (int)std::count(structure.begin(), structure.end(), 'T');
  c.retentions = std::move(ret);
  return c;
}

// Weights large enough that tokens interact, and score layers that spread scores around 0.
void randomize(Model& m, uint64_t seed) {
  m.init_weights(seed);
  Rng r(seed);
  for (const auto& p : m.params()) {
    float* w = m.param_data() + p.offset;
    if (p.name.find("to_scores") != std::string::npos)
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)(1.5 * r.normal());
    else if (p.shape.size() == 2 && p.name.find("embed") == std::string::npos)
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)(0.08 * r.normal());
  }
  m.weights().params_changed();
}

std::vector<int32_t> random_tokens(int n, int V, uint64_t seed) {
  Rng r(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = (int32_t)(1 + r.below(V - 1));
  return t;
}

// The depth of every token of `tok` from a full inference-mode pass's traces: the deepest
// segment whose subsampler kept it.
std::vector<int> depths_from_traces(Model& m, const std::vector<int32_t>& tok) {
  const int T = (int)tok.size();
  m.forward(tok.data(), nullptr, 1, T, nullptr, Mode::Inference);
  const auto traces = m.last_traces();
  const Structure& s = m.structure();
  std::vector<std::vector<int>> root(s.segments.size());
  root[0].resize(T);
  for (int t = 0; t < T; ++t) root[0][t] = t;
  std::vector<int> depth(T, 0);
  for (size_t seg = 1; seg < s.segments.size(); ++seg) {  // parents come before children
    const Segment& g = s.segments[seg];
    for (int32_t p : traces[g.subsampler].kept) {
      const int r = root[g.parent][p];
      root[seg].push_back(r);
      depth[r] = std::max(depth[r], g.depth);
    }
  }
  return depth;
}

TEST(BatchDecode, PerStepKeepThresholdsEqualASessionWithThoseKnobs) {
  Model m(batch_config("T(TT(TT)TT)T", {0.6f, 0.5f}));
  randomize(m, 11);
  const int V = m.config().vocab_size;
  const std::vector<float> thr = {0.4f, -0.3f};
  Session tuned(m.weights());
  tuned.knobs().keep_thresholds = thr;
  Session plain(m.weights());  // keep_threshold 0: the batch's per-step values must override it
  const auto tok = random_tokens(30, V, 5);
  SequenceCache alone = tuned.new_cache(), batched = plain.new_cache();
  std::vector<float> want((size_t)30 * V), got((size_t)30 * V);
  tuned.forward_cached(alone, tok.data(), 20, want.data(), true);
  plain.forward_cached_batch({Step{&batched, tok.data(), 20, true, thr.data(), nullptr}}, got.data());
  for (int t = 20; t < 30; ++t) {
    tuned.forward_cached(alone, tok.data() + t, 1, want.data() + (size_t)t * V, false);
    plain.forward_cached_batch({Step{&batched, tok.data() + t, 1, false, thr.data(), nullptr}},
                               got.data() + (size_t)t * V);
  }
  for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-5f * (1 + std::fabs(want[i]))) << i;
  EXPECT_EQ(batched.kept, alone.kept);
  EXPECT_EQ(batched.seen, alone.seen);
  // The thresholds matter: the session's own knob keeps a different number of tokens.
  SequenceCache other = plain.new_cache();
  plain.forward_cached(other, tok.data(), 30, got.data(), false);
  EXPECT_NE(other.kept, alone.kept);
}

TEST(BatchDecode, DepthFollowsTheKeptPositions) {
  for (const char* structure : {"T(TT(TT)TT)T", "T(T)(TT)T", "TTT"}) {
    const std::string st = structure;
    std::vector<float> ret = st == "TTT" ? std::vector<float>{} : std::vector<float>{0.6f, 0.5f};
    Model m(batch_config(st, ret));
    randomize(m, 7);
    const int V = m.config().vocab_size, T = 40;
    const auto tok = random_tokens(T, V, 9);
    const std::vector<int> want = depths_from_traces(m, tok);
    SequenceCache c = m.new_cache();
    std::vector<uint8_t> depth(T, 99);
    std::vector<float> logits((size_t)T * V);
    m.session().forward_cached_batch({Step{&c, tok.data(), 17, false, nullptr, depth.data()}}, logits.data());
    for (int t = 17; t < T; ++t)
      m.session().forward_cached_batch({Step{&c, tok.data() + t, 1, false, nullptr, depth.data() + t}},
                                       logits.data());
    int deepest = 0, zeros = 0;
    for (int t = 0; t < T; ++t) {
      EXPECT_EQ((int)depth[t], want[t]) << structure << " token " << t;
      deepest = std::max(deepest, (int)depth[t]);
      zeros += depth[t] == 0;
    }
    if (st == "T(TT(TT)TT)T") {
      EXPECT_EQ(deepest, 2) << "the test should keep some tokens through both subsamplers";
      EXPECT_GT(zeros, 0) << "the test should drop some tokens at the first subsampler";
    }
    if (st == "TTT") EXPECT_EQ(deepest, 0);
  }
}

}  // namespace
}  // namespace subllm
