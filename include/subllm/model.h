#pragma once
// The decoder-only transformer (LLaMA layout; SUBLLM segments build on the same blocks).
// Parameters and their gradients each live in one flat buffer, so optimizers, clipping and
// checkpoint I/O walk plain arrays; every named tensor is a view into it.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "subllm/config.h"
#include "subllm/tensor.h"

namespace subllm {

struct ParamInfo {
  std::string name;   // official SUBLLM checkpoint name
  Shape shape;
  int64_t offset = 0; // into the flat parameter / gradient buffers (elements)
  int64_t numel = 0;
  bool decay = true;  // weight decay applies (matrices yes, gains and scales no)
  float lr_scale = 1.0f;
};

struct ModelActivations;  // planned per (batch, length); defined in the model's source

// Offsets of one transformer block's tensors in the flat buffers; q, k, v are adjacent.
struct BlockOffsets {
  int64_t attn_norm, wqkv, wo, ffn_norm, w12, w3;
};

class Model {
 public:
  explicit Model(ModelConfig cfg);  // validates the config; parameters start at zero
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return cfg_; }
  const std::vector<ParamInfo>& params() const { return params_; }
  const ParamInfo& param_info(const std::string& name) const;  // error names the tensor
  int64_t num_params() const { return num_params_; }
  float* param_data() { return params_buf_.f32(); }
  float* grad_data() { return grads_buf_.f32(); }
  Tensor param(const std::string& name);
  Tensor grad(const std::string& name);

  // The authors' initialisation (SUBLLM.md §3), seeded.
  void init_weights(uint64_t seed);
  // Safetensors with the official names; load checks every name and shape against the
  // config and converts BF16/F16 to fp32.
  void load(const std::string& path);
  void save(const std::string& path) const;

  void zero_grad();
  // tokens, targets: (B, T) row-major; targets < 0 are ignored. Returns the mean loss over
  // counted targets. With backward, gradients of (mean loss * grad_multiplier) are ADDED to
  // the gradient buffer, so micro-batches accumulate.
  float forward_backward(const int32_t* tokens, const int32_t* targets, int B, int T, float grad_multiplier = 1.0f);
  // Forward only. Writes the (B, T, V) logits when `logits` is given; returns the mean loss
  // when targets are given (else 0).
  float forward(const int32_t* tokens, const int32_t* targets, int B, int T, float* logits = nullptr);

  // Bytes of planned activation memory for (B, T) in training.
  size_t activation_bytes(int B, int T);
  // Matmul FLOPs per trained token: 6 * matrix params + 6 * L * T * d (causal attention).
  double train_flops_per_token(int T) const;

 private:
  void check_tokens(const int32_t* tokens, const int32_t* targets, int64_t n) const;
  ModelActivations& plan(int B, int T);
  double run(const int32_t* tokens, const int32_t* targets, int B, int T, bool backward, float grad_multiplier,
             float* logits, int64_t* count);

  ModelConfig cfg_;
  std::vector<ParamInfo> params_;
  std::vector<BlockOffsets> blocks_;
  int64_t num_params_ = 0;
  Tensor params_buf_, grads_buf_;
  std::unique_ptr<ModelActivations> acts_;
};

}  // namespace subllm
