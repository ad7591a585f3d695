#include <algorithm>
#include <cmath>

#include "backend/backend.h"
#include "dist/communicator.h"
#include "subllm/error.h"
#include "subllm/optim.h"
#include "subllm/safetensors.h"

namespace subllm {

AdamW::AdamW(const Model& model, AdamWOptions opt)
    : opt_(opt),
      params_(model.params()),
      total_(model.num_params()),
      lo_(0),
      hi_(model.num_params()),
      m_(model.backend().zeros({model.num_params()})),
      v_(model.backend().zeros({model.num_params()})),
      norm_sq_(model.backend().zeros({1}, DType::F64)) {}

void AdamW::shard(Communicator& comm) {
  check(!comm_ && step_ == 0, "AdamW::shard: call it once, before the first step and before load_state");
  if (comm.size() <= 1) return;
  bounds_ = shard_bounds(total_, comm.size(), 16);
  lo_ = bounds_[comm.rank()];
  hi_ = bounds_[comm.rank() + 1];
  Backend& be = *m_.backend();
  // At least one element, so an empty slice still owns memory; views use hi_ - lo_.
  m_ = be.zeros({std::max<int64_t>(hi_ - lo_, 1)});
  v_ = be.zeros({std::max<int64_t>(hi_ - lo_, 1)});
  comm_ = &comm;
}

StepReport AdamW::step(Model& model, float lr) {
  Backend& be = model.backend();
  StepReport r;
  // The global gradient norm, reduced on the backend; the step's one read. Over the full
  // gradient on every rank (identical everywhere), so clipping agrees across ranks.
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
  // Each tensor's part of this rank's slice (the whole tensor when not sharded).
  for (const ParamInfo& p : params_) {
    const int64_t b = std::max(p.offset, lo_), e = std::min(p.offset + p.numel, hi_);
    if (b >= e) continue;
    be.adamw_step(vec(model.param_data() + b, e - b), vec(model.grad_data() + b, e - b),
                  vec(m_.f32() + (b - lo_), e - b), vec(v_.f32() + (b - lo_), e - b), lr * p.lr_scale, opt_.beta1,
                  opt_.beta2, opt_.eps, p.decay ? opt_.weight_decay : 0.0f, step_);
  }
  if (comm_) comm_->all_gather(vec(model.param_data(), total_), bounds_);
  model.weights().params_changed();
  return r;
}

void AdamW::save_state(const std::string& path) const {
  Backend& be = *m_.backend();
  const int64_t n = hi_ - lo_;
  std::vector<float> m, v;
  if (comm_) {
    // Every rank sends its slice; rank 0 alone assembles and writes.
    const bool root = comm_->rank() == 0;
    std::vector<float> lm(n), lv(n);
    be.to_host(lm.data(), m_.raw(), sizeof(float) * n);
    be.to_host(lv.data(), v_.raw(), sizeof(float) * n);
    if (root) {
      m.assign(total_, 0.f);
      v.assign(total_, 0.f);
    }
    comm_->gather_host(lm.data(), m.data(), bounds_);
    comm_->gather_host(lv.data(), v.data(), bounds_);
    if (!root) return;
  } else {
    m.resize(total_);
    v.resize(total_);
    be.to_host(m.data(), m_.raw(), sizeof(float) * total_);
    be.to_host(v.data(), v_.raw(), sizeof(float) * total_);
  }
  std::vector<SafetensorsOut> out;
  for (const auto& p : params_) {
    out.push_back({"m/" + p.name, DType::F32, p.shape, m.data() + p.offset});
    out.push_back({"v/" + p.name, DType::F32, p.shape, v.data() + p.offset});
  }
  write_safetensors(path, out,
                    {{"format", "subllm.adamw.v1"}, {"steps", std::to_string(step_)}, {"subllm_format", "2"}});
}

void AdamW::load_state(const std::string& path) {
  SafetensorsFile f(path);
  auto it = f.metadata().find("format");
  check(it != f.metadata().end() && it->second == "subllm.adamw.v1",
        path + ": not an AdamW state (was the run trained with another --optimizer?)");
  // Read everything before the live moments change; the whole file on every rank.
  std::vector<float> m(total_, 0.f), v(total_, 0.f);
  // States written before the bypass renumbering name the moments by the old numbering.
  const bool legacy = f.metadata().count("subllm_format") == 0;
  for (const auto& p : params_) {
    const std::string& name = legacy && !p.legacy_name.empty() ? p.legacy_name : p.name;
    f.read_f32("m/" + name, p.shape, m.data() + p.offset);
    f.read_f32("v/" + name, p.shape, v.data() + p.offset);
  }
  const int steps = std::stoi(f.metadata().at("steps"));
  Backend& be = *m_.backend();
  be.to_device(m_.raw(), m.data() + lo_, sizeof(float) * (hi_ - lo_));
  be.to_device(v_.raw(), v.data() + lo_, sizeof(float) * (hi_ - lo_));
  step_ = steps;
}

ScaledAdamOptimizer::ScaledAdamOptimizer(const Model& model, ScaledAdamOptions opt)
    : impl_(model.params(), model.num_params(), opt, &model.backend()) {}

StepReport ScaledAdamOptimizer::step(Model& model, float lr) {
  const ScaledAdamStepInfo info = impl_.step(model.param_data(), model.grad_data(), lr);
  // Even a skipped step moves the parameters (momentum keeps acting on zeroed gradients).
  model.weights().params_changed();
  StepReport r;
  r.grad_norm = info.grad_norm;
  r.clip_factor = info.clip_factor;
  r.skipped = info.skipped;
  r.quartiles_changed = info.quartiles_changed;
  for (int i = 0; i < 5; ++i) r.quartiles[i] = info.quartiles[i];
  r.clip_groups = info.groups;
  return r;
}

std::unique_ptr<Optimizer> make_optimizer(const std::string& kind, const Model& model, const AdamWOptions& adamw,
                                          const ScaledAdamOptions& scaled_adam) {
  if (kind == "adamw") return std::make_unique<AdamW>(model, adamw);
  if (kind == "scaled_adam" || kind == "scaled-adam") return std::make_unique<ScaledAdamOptimizer>(model, scaled_adam);
  throw Error("unknown optimizer '" + kind + "': use adamw or scaled-adam");
}

}  // namespace subllm
