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

class Communicator;  // src/dist/communicator.h

// What one optimizer step did.
// ScaledAdam clips per group of tensors (scaled_adam.h): there, grad_norm is the whole-model
// norm and clip_factor, quartiles and quartiles_changed are the main group's (the one with the
// most elements); clip_groups has every group. AdamW clips one global norm (no clip_groups).
struct StepReport {
  double grad_norm = 0;     // the norm the clipping looked at, before clipping
  double clip_factor = 1;   // what the gradients were multiplied by
  bool skipped = false;     // the gradients were not finite: no update was made (ScaledAdam:
                            // some group's gradients were zeroed)
  bool quartiles_changed = false;  // ScaledAdam recomputed its clipping thresholds
  double quartiles[5] = {0, 0, 0, 0, 0};
  std::vector<ClipGroupStats> clip_groups;  // ScaledAdam: every clipping group
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
  // When sharded, both are collective (every rank calls them, in the same order as the other
  // collectives): save gathers the full state to rank 0, and only rank 0 writes the file
  // (other ranks ignore `path`), in the same format and with the same bytes as an unsharded
  // optimizer holding that state; load reads the whole file on every rank and keeps the
  // rank's slice. Files are therefore interchangeable between sharded and unsharded runs and
  // between rank counts.
  virtual void save_state(const std::string& path) const = 0;
  virtual void load_state(const std::string& path) = 0;

  // ZeRO-1 (--shard-optimizer): split the per-element state and the update across comm's
  // ranks. Every rank still holds the full parameters and, at step time, the full gradients,
  // summed across ranks (identical on every rank); rank r keeps state for and updates only its
  // slice of the flat buffer, then the slices are all-gathered into every rank's parameters.
  // Steps are bit-identical to the unsharded optimizer's. Call once, right after construction,
  // before load_state and step; comm serves the model's backend and outlives the optimizer.
  // With one rank nothing changes (sharded() stays false).
  virtual void shard(Communicator& comm) = 0;
  virtual bool sharded() const = 0;
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
  // Slices: shard_bounds(num_params, ranks, 16), ignoring tensor boundaries (the update is
  // elementwise, so a tensor split between ranks updates exactly as a whole one).
  void shard(Communicator& comm) override;
  bool sharded() const override { return comm_ != nullptr; }

 private:
  AdamWOptions opt_;
  std::vector<ParamInfo> params_;
  int64_t total_ = 0;          // elements of the flat buffers
  int64_t lo_ = 0, hi_ = 0;    // this rank's slice [lo_, hi_) of them (all when not sharded)
  Communicator* comm_ = nullptr;  // set when sharded over more than one rank
  std::vector<int64_t> bounds_;   // every rank's slice: size + 1 element offsets
  Tensor m_, v_;   // moments of the slice, (hi_ - lo_) in the model's backend memory
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
  void shard(Communicator& comm) override { impl_.shard(comm); }
  bool sharded() const override { return impl_.sharded(); }

 private:
  ScaledAdam impl_;
};

// kind: "adamw" or "scaled_adam" (error otherwise, naming the choices).
std::unique_ptr<Optimizer> make_optimizer(const std::string& kind, const Model& model, const AdamWOptions& adamw,
                                          const ScaledAdamOptions& scaled_adam);

}  // namespace subllm
