// Model: Weights, their gradients and one Session, as training and single-user tools use them.
#include "subllm/model.h"

#include "backend/backend.h"
#include "model/passes.h"

namespace subllm {

Model::Model(ModelConfig cfg, const std::string& device)
    : weights_(std::move(cfg), backend_for(device)),
      grads_(weights_.backend().zeros({weights_.num_params()})),
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

void Model::zero_grad() { backend().zero(grads_.raw(), grads_.nbytes()); }

std::vector<int> Model::segment_lengths(int T) const { return plan_lengths(structure(), T, Mode::Train); }

double Model::train_flops_per_token(int T) const {
  const ModelConfig& c = config();
  const double C = c.dim, F = c.ffn_dim, V = c.vocab_size;
  const std::vector<int> len = segment_lengths(T);
  double flops = 6 * V * C;
  for (size_t s = 0; s < structure().segments.size(); ++s) {
    const double frac = (double)len[s] / T;
    for (const SegmentItem& it : structure().segments[s].items)
      if (it.is_block) flops += frac * (6 * (4 * C * C + 3 * C * F) + 6.0 * len[s] * C);
  }
  return flops;
}

}  // namespace subllm
