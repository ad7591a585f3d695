#pragma once
// ScaledAdam (the zipformer family's optimizer, SUBLLM.md section 7) over a model's flat
// parameter and gradient buffers.
//
// Per tensor, at step s (counting from 0), with lr_t = lr * ParamInfo::lr_scale and g the
// clipped gradient:
//   v <- beta2 v + (1 - beta2) g^2; while 1 - beta2^(s+1) < 0.99, v is divided by it for the
//   step (second-moment bias correction); d = -lr_t g / (sqrt(v) + eps).
//   Scalars (numel == 1): lr_t is multiplied by scalar_lr_scale, and the parameter is clamped
//   to +-scalar_max after the update.
//   Other tensors: d is multiplied by max(param_rms, param_min_rms), where param_rms is the
//   tensor's RMS measured at step 0 and then every size_update_period steps (on steps with
//   s % period == period - 1, before that step's update). On those steps (s > 0) the
//   tensor's overall scale also moves: from the last `period` values of sum(p * g), with
//   their own second moment (beta2^period, bias-corrected), scale_step is
//   -lr_t scalar_lr_scale sum / (sqrt(moment) + eps), zero when param_rms < param_min_rms,
//   clamped to +-0.1 and to at most (param_max_rms - param_rms) / param_rms; d += p scale_step.
//   Momentum without bias correction: m <- beta1 m + (1 - beta1) d; p <- p + m.
// Clipping (clipping_scale > 0) acts per clipping group, as icefall's ScaledAdam does per
// parameter group: by default (Clipping::per_group) the tensors sharing one lr_scale form a
// group (icefall's get_parameter_groups_with_lrs makes one group per learning rate), in order
// of first appearance; Clipping::global makes all tensors one group. Per group: the norm
// sqrt(sum over its tensors of |g|^2 param_rms^2, with scalar_lr_scale in place of param_rms
// for scalars) is kept in the group's own window of clipping_update_period steps (from step
// 1; every group counts the optimizer's steps, as the states of icefall's groups all step
// together). The group's threshold is clipping_scale times its window's median, recomputed when
// s % clipping_update_period == 0 and at steps 10, 20, 40 (those below the period: from the
// `s` largest window entries, and doubled). The group's grads are scaled by
// min(1, threshold / norm) once a threshold exists. A non-finite group norm zeroes that
// group's gradients for the step (the step still runs: momentum and moments decay).
#include <cstdint>
#include <string>
#include <vector>

#include "subllm/model.h"

namespace subllm {

class Communicator;  // src/dist/communicator.h

// How gradient clipping groups the tensors (see the top of this file).
enum class Clipping { per_group, global };

struct ScaledAdamOptions {
  float beta1 = 0.9f, beta2 = 0.98f, eps = 1e-8f;
  float scalar_lr_scale = 0.1f, param_min_rms = 1e-5f, param_max_rms = 3.0f, scalar_max = 10.0f;
  int size_update_period = 4;
  float clipping_scale = 2.0f;  // <= 0 disables clipping
  int clipping_update_period = 100;
  Clipping clipping = Clipping::per_group;
};

// One clipping group's step.
struct ClipGroupStats {
  bool whole_model = false;  // global clipping: the one group holds every tensor (lr_scale unused)
  float lr_scale = 1;        // the lr_scale its tensors share
  int tensors = 0;           // how many tensors it holds
  int64_t elements = 0;      // and their elements
  double grad_norm = 0;      // its clipping norm, before clipping
  double clip_factor = 1;    // what its gradients were multiplied by (0: not finite, zeroed)
  double threshold = 0;      // its threshold in force (0: none yet, or clipping off)
  bool quartiles_changed = false;
  double quartiles[5] = {0, 0, 0, 0, 0};  // of its window, when quartiles_changed
};

// Apart from grad_norm, the scalar fields describe the main group: the one holding the most
// elements (the first such); with a single group they are that group's.
struct ScaledAdamStepInfo {
  double grad_norm = 0;    // the whole-model clipping norm (over all groups), before clipping
  double clip_factor = 1;  // what the main group's gradients were multiplied by
  bool skipped = false;    // some group's norm was not finite: its gradients were zeroed
  bool quartiles_changed = false;  // the thresholds were recomputed on this step (all groups at once)
  double quartiles[5] = {0, 0, 0, 0, 0};  // of the main group's window, when quartiles_changed
  double threshold = 0;    // the main group's threshold (0: none yet, or clipping off)
  std::vector<ClipGroupStats> groups;  // every clipping group, in group order
};

class ScaledAdam {
 public:
  // `params` are the tensors to train, laid out in buffers of `total_elements` floats.
  // Its state lives in `backend` memory (null: the CPU), as must params and grads of step().
  ScaledAdam(const std::vector<ParamInfo>& params, int64_t total_elements, ScaledAdamOptions opt,
             Backend* backend = nullptr);

  // One step at learning rate `lr` (each tensor's lr_scale multiplies it). `grads` is
  // scaled in place by the clip factor (zeroed on a skipped step). Throws subllm::Error
  // when a recomputed median of the clipping window is not finite (too many bad steps).
  ScaledAdamStepInfo step(float* params, float* grads, float lr);
  int steps_taken() const { return step_; }
  const ScaledAdamOptions& options() const { return opt_; }

  // Every buffer and counter, for an exact resume. The file is written atomically; loading
  // checks that the layout (tensor count, element count, periods) matches this optimizer.
  // Format subllm.scaled_adam.v2 keeps every clipping group's window, threshold and count.
  // A file with one group (a v1 file, from before per-group clipping, or one written with
  // Clipping::global) loads exactly into an optimizer with one group; into one with several
  // its window and threshold are copied to every group (the groups' own norms replace them
  // within clipping_update_period steps), and a note says so on stderr. A file with several
  // groups loads only into an optimizer with the same groups (an error names both).
  // When sharded, both are collective: save gathers the state to rank 0, which alone writes
  // it; load reads the whole file on every rank and keeps the rank's slice.
  void save_state(const std::string& safetensors_path) const;
  void load_state(const std::string& safetensors_path);

  // ZeRO-1: keep exp_avg_sq and momentum only for this rank's slice of the buffers and update
  // only that slice, then all-gather the parameters in step(). The slices are runs of whole
  // chunks, balanced by element count. Per-tensor statistics (sums, param_rms, the scale and
  // clipping state) are still computed from the full parameters and gradients on every rank,
  // so every rank holds them identically and steps are bit-identical to the unsharded ones.
  // Call once, before step and load_state; comm serves `backend` and outlives this. One rank:
  // nothing changes.
  void shard(Communicator& comm);
  bool sharded() const { return comm_ != nullptr; }
  // Element offsets of every rank's slice (size + 1 entries); empty when not sharded.
  const std::vector<int64_t>& slice_bounds() const { return bounds_; }

  // The clipping groups: their number, the group of each tensor, and the main group.
  int clip_groups() const { return (int)groups_.size(); }
  int clip_group_of(size_t tensor) const { return group_of_[tensor]; }
  int main_clip_group() const { return main_group_; }

 private:
  struct ClipGroup {
    float lr_scale = 1;
    std::vector<int> tensors;
    int64_t elements = 0;
    // Its chunks (tensor, begin, end), in Backend memory; unset when one group holds all.
    Tensor chunk_tensor, chunk_begin, chunk_end;
    std::vector<float> norms;  // the window, [clipping_update_period]
    double threshold = 0;
    bool has_threshold = false;
    int64_t num_clipped = 0;  // since the last recomputation (diagnostics)
  };
  bool is_scalar(size_t t) const { return params_[t].numel == 1; }
  double clip_factor(ClipGroup& grp, double norm, ClipGroupStats& st);

  ScaledAdamOptions opt_;
  std::vector<ParamInfo> params_;
  int64_t total_ = 0;
  // Fixed split of every tensor into chunks, so sums do not depend on threads: chunk c is
  // tensor chunk_tensor_[c], absolute element indices [chunk_begin_[c], chunk_end_[c]).
  // Backend memory: the chunk split, clamp flags (per tensor: 1 for scalars, clamped to
  // +-scalar_max), per-step sums and coefficients, and the per-element state.
  Backend* be_;
  Tensor chunk_tensor_, chunk_begin_, chunk_end_, clamp_tensor_;
  Tensor sums_dev_, sums_scratch_, step_coef_dev_, scale_step_dev_;
  Tensor exp_avg_sq_, momentum_;  // per element of the slice, [hi_ - lo_]
  // This rank's slice [lo_, hi_) of the buffers (everything when not sharded) and its chunks,
  // with begins and ends relative to lo_ (the full tables when not sharded).
  int64_t lo_ = 0, hi_ = 0;
  Tensor local_tensor_, local_begin_, local_end_;
  Communicator* comm_ = nullptr;  // set when sharded over more than one rank
  std::vector<int64_t> bounds_;   // every rank's slice, in elements

  // Host copies of the per-tensor values the step's control reads and writes.
  std::vector<double> sums_;                   // per tensor x (grad^2, param*grad, param^2)
  std::vector<float> step_coef_, scale_step_;  // per-tensor coefficients of the update

  std::vector<float> param_rms_;              // per tensor
  std::vector<float> scale_exp_avg_sq_;       // per tensor
  std::vector<float> scale_grads_;            // per tensor x size_update_period
  std::vector<ClipGroup> groups_;             // clipping groups
  std::vector<int> group_of_;                 // per tensor: its clipping group
  int main_group_ = 0;                        // the group with the most elements
  int step_ = 0;
};

}  // namespace subllm
