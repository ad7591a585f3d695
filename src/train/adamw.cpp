#include <cmath>

#include "kernels/kernels.h"
#include "subllm/error.h"
#include "subllm/optim.h"
#include "subllm/safetensors.h"

namespace subllm {

double grad_norm(const float* g, int64_t n) { return std::sqrt(kernels::sum_squares(g, n)); }

AdamW::AdamW(const Model& model, AdamWOptions opt)
    : opt_(opt), params_(model.params()), m_(model.num_params(), 0.f), v_(model.num_params(), 0.f) {}

StepReport AdamW::step(Model& model, float lr) {
  StepReport r;
  r.grad_norm = grad_norm(model.grad_data(), model.num_params());
  if (!std::isfinite(r.grad_norm)) {
    r.skipped = true;
    r.clip_factor = 0;
    return r;
  }
  if (opt_.grad_clip > 0) {
    const double coef = opt_.grad_clip / (r.grad_norm + 1e-6);
    if (coef < 1.0) {
      kernels::scale_inplace(model.grad_data(), (float)coef, model.num_params());
      r.clip_factor = coef;
    }
  }
  ++step_;
  for (const ParamInfo& p : params_) {
    kernels::adamw_step(model.param_data() + p.offset, model.grad_data() + p.offset, m_.data() + p.offset,
                        v_.data() + p.offset, p.numel, lr * p.lr_scale, opt_.beta1, opt_.beta2, opt_.eps,
                        p.decay ? opt_.weight_decay : 0.0f, step_);
  }
  return r;
}

void AdamW::save_state(const std::string& path) const {
  std::vector<SafetensorsOut> out;
  for (const auto& p : params_) {
    out.push_back({"m/" + p.name, DType::F32, p.shape, m_.data() + p.offset});
    out.push_back({"v/" + p.name, DType::F32, p.shape, v_.data() + p.offset});
  }
  write_safetensors(path, out, {{"format", "subllm.adamw.v1"}, {"steps", std::to_string(step_)}});
}

void AdamW::load_state(const std::string& path) {
  SafetensorsFile f(path);
  auto it = f.metadata().find("format");
  check(it != f.metadata().end() && it->second == "subllm.adamw.v1",
        path + ": not an AdamW state (was the run trained with another --optimizer?)");
  for (const auto& p : params_) {
    f.read_f32("m/" + p.name, p.shape, m_.data() + p.offset);
    f.read_f32("v/" + p.name, p.shape, v_.data() + p.offset);
  }
  step_ = std::stoi(f.metadata().at("steps"));
}

ScaledAdamOptimizer::ScaledAdamOptimizer(const Model& model, ScaledAdamOptions opt)
    : impl_(model.params(), model.num_params(), opt) {}

StepReport ScaledAdamOptimizer::step(Model& model, float lr) {
  const ScaledAdamStepInfo info = impl_.step(model.param_data(), model.grad_data(), lr);
  StepReport r;
  r.grad_norm = info.grad_norm;
  r.clip_factor = info.clip_factor;
  r.skipped = info.skipped;
  r.quartiles_changed = info.quartiles_changed;
  for (int i = 0; i < 5; ++i) r.quartiles[i] = info.quartiles[i];
  return r;
}

std::unique_ptr<Optimizer> make_optimizer(const std::string& kind, const Model& model, const AdamWOptions& adamw,
                                          const ScaledAdamOptions& scaled_adam) {
  if (kind == "adamw") return std::make_unique<AdamW>(model, adamw);
  if (kind == "scaled_adam" || kind == "scaled-adam") return std::make_unique<ScaledAdamOptimizer>(model, scaled_adam);
  throw Error("unknown optimizer '" + kind + "': use adamw or scaled-adam");
}

}  // namespace subllm
