#pragma once
// Optimizers over a Model's flat parameter and gradient buffers, behind one interface so the
// trainer, checkpoints and benchmarks treat AdamW and ScaledAdam alike.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "subllm/model.h"
#include "subllm/scaled_adam.h"

namespace subllm {

// What one optimizer step did.
struct StepReport {
  double grad_norm = 0;     // the norm the clipping looked at, before clipping
  double clip_factor = 1;   // what the gradients were multiplied by
  bool skipped = false;     // the gradients were not finite: no update was made
  bool quartiles_changed = false;  // ScaledAdam recomputed its clipping threshold
  double quartiles[5] = {0, 0, 0, 0, 0};
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  virtual const char* name() const = 0;
  // One update at learning rate `lr` (each tensor's lr_scale multiplies it); may scale the
  // model's gradient buffer in place (clipping).
  virtual StepReport step(Model& model, float lr) = 0;
  virtual int steps_taken() const = 0;
  // Every buffer and counter, for an exact resume (atomic write; load checks the layout).
  virtual void save_state(const std::string& path) const = 0;
  virtual void load_state(const std::string& path) = 0;
};

struct AdamWOptions {
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;  // applied to tensors with ParamInfo::decay (matrices)
  float grad_clip = 1.0f;     // global norm; <= 0 disables
};

// torch.optim.AdamW semantics with global-norm clipping first (torch.nn.utils.clip_grad_norm_). A non-finite gradient norm
// leaves parameters and state untouched (the step is reported as skipped).
class AdamW : public Optimizer {
 public:
  AdamW(const Model& model, AdamWOptions opt);
  const char* name() const override { return "adamw"; }
  StepReport step(Model& model, float lr) override;
  int steps_taken() const override { return step_; }
  void save_state(const std::string& path) const override;
  void load_state(const std::string& path) override;

 private:
  AdamWOptions opt_;
  std::vector<ParamInfo> params_;
  Tensor m_, v_;   // moments, in the model's backend memory
  Tensor norm_sq_;  // (1) f64: the squared gradient norm of a step
  int step_ = 0;
};

class ScaledAdamOptimizer : public Optimizer {
 public:
  ScaledAdamOptimizer(const Model& model, ScaledAdamOptions opt);
  const char* name() const override { return "scaled_adam"; }
  StepReport step(Model& model, float lr) override;
  int steps_taken() const override { return impl_.steps_taken(); }
  void save_state(const std::string& path) const override { impl_.save_state(path); }
  void load_state(const std::string& path) override { impl_.load_state(path); }

 private:
  ScaledAdam impl_;
};

// kind: "adamw" or "scaled_adam" (error otherwise, naming the choices).
std::unique_ptr<Optimizer> make_optimizer(const std::string& kind, const Model& model, const AdamWOptions& adamw,
                                          const ScaledAdamOptions& scaled_adam);

}  // namespace subllm
