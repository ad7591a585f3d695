#pragma once
// Picking the next token from logits: greedy, temperature, top-k, top-p and a repetition
// penalty, with a seeded generator so a seed fixes the output.
#include <cstdint>
#include <vector>

#include "subllm/rng.h"

namespace subllm {

struct SamplingOptions {
  float temperature = 0.8f;   // <= 0: greedy
  int top_k = 40;             // <= 0: no limit
  float top_p = 0.95f;        // >= 1: no limit
  float repeat_penalty = 1.0f;  // > 1 discourages tokens among the last repeat_last_n
  int repeat_last_n = 64;
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(SamplingOptions opt) : opt_(opt), rng_(opt.seed) {}
  // `logits` (V) is modified in place; `history` is every token so far.
  int32_t sample(std::vector<float>& logits, const std::vector<int32_t>& history);

 private:
  SamplingOptions opt_;
  Rng rng_;
};

}  // namespace subllm
