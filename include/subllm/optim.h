#pragma once
// Optimizers over a Model's flat parameter and gradient buffers.
#include <cstdint>
#include <string>
#include <vector>

#include "subllm/model.h"

namespace subllm {

// Global L2 norm of the gradient buffer (double accumulation). NaN/Inf propagate.
double grad_norm(const float* g, int64_t n);
// Scales g so its norm is at most max_norm (like torch.nn.utils.clip_grad_norm_);
// returns the norm before clipping. max_norm <= 0 disables clipping.
double clip_grad_norm(float* g, int64_t n, float max_norm);

struct AdamWOptions {
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;  // applied to tensors with ParamInfo::decay (matrices)
  float grad_clip = 1.0f;     // global norm; <= 0 disables
};

class AdamW {
 public:
  AdamW(const Model& model, AdamWOptions opt);
  // One update from the gradients in the model's buffer at learning rate `lr` (each
  // tensor's lr_scale applies). Clips first; returns the gradient norm before clipping.
  // A non-finite norm leaves parameters and state untouched.
  double step(Model& model, float lr);
  int steps_taken() const { return step_; }
  const AdamWOptions& options() const { return opt_; }
  std::vector<float>& first_moment() { return m_; }
  std::vector<float>& second_moment() { return v_; }
  void set_steps_taken(int s) { step_ = s; }

 private:
  AdamWOptions opt_;
  std::vector<float> m_, v_;
  int step_ = 0;
};

}  // namespace subllm
