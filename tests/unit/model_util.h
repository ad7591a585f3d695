#pragma once
// Shared helpers for the tests that run whole models: random weights that make inference
// interesting (tokens interact, subsamplers keep some tokens and drop others), random prompts,
// and how far one run's outputs are from another's.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "subllm/model.h"
#include "subllm/rng.h"

namespace subllm::testing {

// How spread_weights draws, each from N(0, sd²) (0: left as the init made it).
struct Spread {
  double matrix_sd = 0.08;  // the 2-D weights but the embedding: larger than the init, so tokens interact
  double score_sd = 1.5;    // score layers: scores spread around 0 (the init keeps them tiny)
  double norm_sd = 0;       // 1-D weights, drawn around 1
};

// The init's weights from `seed`, then the draws of `spread` from `r`, parameter by parameter
// in order.
inline void spread_weights(Model& m, uint64_t seed, Spread spread, Rng& r) {
  m.init_weights(seed);
  for (const auto& p : m.params()) {
    float* w = m.param_data() + p.offset;
    double sd = 0, mean = 0;
    if (p.name.find("to_scores") != std::string::npos) {
      sd = spread.score_sd;
    } else if (p.shape.size() == 2 && p.name.find("embed") == std::string::npos) {
      sd = spread.matrix_sd;
    } else if (p.shape.size() == 1) {
      sd = spread.norm_sd;
      mean = 1.0;
    }
    if (sd > 0)
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)(mean + sd * r.normal());
  }
  m.weights().params_changed();
}

// The same with the draws from Rng(seed).
inline void spread_weights(Model& m, uint64_t seed, Spread spread = {}) {
  Rng r(seed);
  spread_weights(m, seed, spread, r);
}

// n token ids drawn uniformly from [1, vocab): anything but the padding id 0.
inline std::vector<int32_t> random_tokens(int n, int vocab, uint64_t seed) {
  Rng r(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = (int32_t)(1 + r.below(vocab - 1));
  return t;
}

// The largest |a - b| over the largest |b|: a's error relative to b's scale.
inline double rel_diff(const float* a, const float* b, int64_t n) {
  double scale = 0, worst = 0;
  for (int64_t i = 0; i < n; ++i) scale = std::max(scale, (double)std::fabs(b[i]));
  for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs((double)a[i] - b[i]));
  return worst / std::max(scale, 1e-30);
}

}  // namespace subllm::testing
