// Model: Weights, their gradients and one Session, as training and single-user tools use them.
#include "subllm/model.h"

#include <cstdio>

#include "backend/backend.h"
#include "model/passes.h"
#include "subllm/error.h"
#include "subllm/host_memory.h"

namespace subllm {

namespace {

// The keys behind most of a config's memory: what to lower when it does not fit.
std::string largest_sizes(const ModelConfig& c) {
  const double C = c.dim, F = c.ffn_dim, KV = c.kv_dim();
  const double blocks = c.n_layers * (2 * C * C + 2 * KV * C + 3 * C * F);
  const double embed = (c.tie_weights ? 1.0 : 2.0) * c.vocab_size * C;
  const double rope = (double)c.context * c.head_dim();
  if (rope >= blocks && rope >= embed) return "tokens_per_sample (" + std::to_string(c.context) + ")";
  if (embed >= blocks)
    return "num_embeddings (" + std::to_string(c.vocab_size) + ") or decoder_embed_dim (" + std::to_string(c.dim) + ")";
  return "decoder_layers (" + std::to_string(c.n_layers) + "), decoder_embed_dim (" + std::to_string(c.dim) +
         ") or decoder_ffn_embed_dim (" + std::to_string(c.ffn_dim) + ")";
}

// Refuses a config whose model does not fit in host memory, before anything is allocated.
// On the CPU the host holds the weights, their gradients, the staging copy that init and
// load fill, and the RoPE tables; on a device only the staging copy is on the host (the
// device's allocator reports its own shortage).
// A valid config (the device is named by backend_for, which refuses one it cannot run).
ModelConfig runnable(ModelConfig cfg, const std::string& device) {
  cfg.validate();
  backend_for(device);
  return cfg;
}

ModelConfig fitting_host_memory(ModelConfig cfg, const std::string& device) {
  cfg = runnable(std::move(cfg), device);
  const bool on_host = std::string(backend_for(device).name()) == "cpu";
  const double params = (double)cfg.param_count();
  const double bytes = 4.0 * (on_host ? 3 * params + (double)cfg.context * cfg.head_dim() : params);
  char count[32];
  std::snprintf(count, sizeof count, "%.3g", params);
  check_host_memory(bytes, cfg.source + ": the model (" + count + " parameters)",
                    "reduce " + largest_sizes(cfg));
  return cfg;
}

}  // namespace

Model::Model(ModelConfig cfg, const std::string& device)
    : weights_(fitting_host_memory(std::move(cfg), device), backend_for(device)),
      session_(std::make_unique<Session>(weights_)) {}

Model::Model(ModelConfig cfg, const std::string& device, const std::string& weights_path)
    : weights_(runnable(std::move(cfg), device), backend_for(device), weights_path),
      session_(std::make_unique<Session>(weights_)) {}

Model::~Model() = default;

Tensor Model::param(const std::string& name) {
  const ParamInfo& p = param_info(name);
  return Tensor::view(param_data() + p.offset, p.shape, DType::F32, &backend());
}

Tensor Model::grad(const std::string& name) {
  const ParamInfo& p = param_info(name);
  return Tensor::view(grad_data() + p.offset, p.shape, DType::F32, &backend());
}

float* Model::grad_data() {
  if (!grads_.raw()) {
    check(weights_.weight_dtype() == DType::F32,
          "the model holds " + std::string(weights_.weight_dtype() == DType::Q8 ? "q8" : "bf16") +
              " inference weights, which have no gradients: train from an fp32 checkpoint");
    grads_ = backend().zeros({weights_.num_params()});
  }
  return grads_.f32();
}

void Model::zero_grad() { backend().zero(grad_data(), sizeof(float) * (size_t)num_params()); }

std::vector<int> Model::segment_lengths(int T) const { return plan_lengths(structure(), T, Mode::Train); }

double Model::train_flops_per_token(int T) const {
  const ModelConfig& c = config();
  const double C = c.dim, F = c.ffn_dim, V = c.vocab_size, KV = c.kv_dim();
  const std::vector<int> len = segment_lengths(T);
  double flops = 6 * V * C;
  for (size_t s = 0; s < structure().segments.size(); ++s) {
    const double frac = (double)len[s] / T;
    for (const SegmentItem& it : structure().segments[s].items)
      if (it.is_block) flops += frac * (6 * (2 * C * C + 2 * KV * C + 3 * C * F) + 6.0 * len[s] * C);
  }
  return flops;
}

}  // namespace subllm
