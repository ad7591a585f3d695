#include <cmath>

#include "kernels/kernels.h"
#include "subllm/optim.h"

namespace subllm {

double grad_norm(const float* g, int64_t n) { return std::sqrt(kernels::sum_squares(g, n)); }

double clip_grad_norm(float* g, int64_t n, float max_norm) {
  const double norm = grad_norm(g, n);
  if (max_norm > 0 && std::isfinite(norm)) {
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) kernels::scale_inplace(g, (float)coef, n);
  }
  return norm;
}

AdamW::AdamW(const Model& model, AdamWOptions opt)
    : opt_(opt), m_(model.num_params(), 0.f), v_(model.num_params(), 0.f) {}

double AdamW::step(Model& model, float lr) {
  const double norm = clip_grad_norm(model.grad_data(), model.num_params(), opt_.grad_clip);
  if (!std::isfinite(norm)) return norm;  // the caller reports the skipped step
  ++step_;
  for (const ParamInfo& p : model.params()) {
    kernels::adamw_step(model.param_data() + p.offset, model.grad_data() + p.offset, m_.data() + p.offset,
                        v_.data() + p.offset, p.numel, lr * p.lr_scale, opt_.beta1, opt_.beta2, opt_.eps,
                        p.decay ? opt_.weight_decay : 0.0f, step_);
  }
  return norm;
}

}  // namespace subllm
