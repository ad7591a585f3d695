#include <cmath>

#include "backend/backend.h"
#include "subllm/error.h"
#include "subllm/optim.h"
#include "subllm/safetensors.h"

namespace subllm {

AdamW::AdamW(const Model& model, AdamWOptions opt)
    : opt_(opt),
      params_(model.params()),
      m_(model.backend().zeros({model.num_params()})),
      v_(model.backend().zeros({model.num_params()})),
      norm_sq_(model.backend().zeros({1}, DType::F64)) {}

StepReport AdamW::step(Model& model, float lr) {
  Backend& be = model.backend();
  StepReport r;
  // The global gradient norm, reduced on the backend; the step's one read.
  be.sum_squares(vec(model.grad_data(), model.num_params()), view_of(norm_sq_));
  double sq = 0;
  be.to_host(&sq, norm_sq_.raw(), sizeof sq);
  r.grad_norm = std::sqrt(sq);
  if (!std::isfinite(r.grad_norm)) {
    r.skipped = true;
    r.clip_factor = 0;
    return r;
  }
  if (opt_.grad_clip > 0) {
    const double coef = opt_.grad_clip / (r.grad_norm + 1e-6);
    if (coef < 1.0) {
      be.scale(vec(model.grad_data(), model.num_params()), (float)coef);
      r.clip_factor = coef;
    }
  }
  ++step_;
  for (const ParamInfo& p : params_) {
    be.adamw_step(vec(model.param_data() + p.offset, p.numel), vec(model.grad_data() + p.offset, p.numel),
                  vec(m_.f32() + p.offset, p.numel), vec(v_.f32() + p.offset, p.numel), lr * p.lr_scale, opt_.beta1,
                  opt_.beta2, opt_.eps, p.decay ? opt_.weight_decay : 0.0f, step_);
  }
  model.weights().params_changed();
  return r;
}

void AdamW::save_state(const std::string& path) const {
  Backend& be = *m_.backend();
  std::vector<float> m(m_.numel()), v(v_.numel());
  be.to_host(m.data(), m_.raw(), m_.nbytes());
  be.to_host(v.data(), v_.raw(), v_.nbytes());
  std::vector<SafetensorsOut> out;
  for (const auto& p : params_) {
    out.push_back({"m/" + p.name, DType::F32, p.shape, m.data() + p.offset});
    out.push_back({"v/" + p.name, DType::F32, p.shape, v.data() + p.offset});
  }
  write_safetensors(path, out, {{"format", "subllm.adamw.v1"}, {"steps", std::to_string(step_)}});
}

void AdamW::load_state(const std::string& path) {
  SafetensorsFile f(path);
  auto it = f.metadata().find("format");
  check(it != f.metadata().end() && it->second == "subllm.adamw.v1",
        path + ": not an AdamW state (was the run trained with another --optimizer?)");
  // Read everything before the live moments change.
  std::vector<float> m(m_.numel(), 0.f), v(v_.numel(), 0.f);
  for (const auto& p : params_) {
    f.read_f32("m/" + p.name, p.shape, m.data() + p.offset);
    f.read_f32("v/" + p.name, p.shape, v.data() + p.offset);
  }
  const int steps = std::stoi(f.metadata().at("steps"));
  Backend& be = *m_.backend();
  be.to_device(m_.raw(), m.data(), m_.nbytes());
  be.to_device(v_.raw(), v.data(), v_.nbytes());
  step_ = steps;
}

ScaledAdamOptimizer::ScaledAdamOptimizer(const Model& model, ScaledAdamOptions opt)
    : impl_(model.params(), model.num_params(), opt, &model.backend()) {}

StepReport ScaledAdamOptimizer::step(Model& model, float lr) {
  const ScaledAdamStepInfo info = impl_.step(model.param_data(), model.grad_data(), lr);
  if (!info.skipped) model.weights().params_changed();
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
