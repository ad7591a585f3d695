#pragma once
// Shared helpers for the tests that run whole models: random weights that make inference
// interesting (tokens interact, subsamplers keep some tokens and drop others).
#include <cstdint>
#include <string>

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

}  // namespace subllm::testing
