#include "subllm/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/kernels.h"
#include "subllm/error.h"
#include "subllm/rng.h"
#include "subllm/safetensors.h"

namespace subllm {

namespace {

// Pointers to one block's tensors inside a flat buffer (parameters or gradients).
struct BlockPtrs {
  float *attn_norm, *wqkv, *wo, *ffn_norm, *w12, *w3;
};

std::string layer_prefix(int i) { return "decoder.layers." + std::to_string(i) + "."; }

}  // namespace

// Activations saved for backward, planned once per (B, T) and reused every step.
struct ModelActivations {
  int B = 0, T = 0;
  Arena arena;
  Tensor pos;                        // (N) int32
  std::vector<Tensor> resid;         // L+1 of (N, C): block inputs, then the last output
  std::vector<Tensor> rstd1, rstd2;  // (N)
  std::vector<Tensor> qkv;           // (N, 3C), q and k after RoPE
  std::vector<Tensor> att;           // (N, C) attention output before out_proj
  std::vector<Tensor> lse;           // (B, H, T)
  std::vector<Tensor> h;             // (N, C) after the attention residual
  std::vector<Tensor> gu;            // (N, 2F)
  Tensor norm_out, rstd_f;           // (N, C), (N) final norm
  Tensor tmp_c, tmp_f;               // (N, C), (N, F): recomputed norm / swiglu outputs
  Tensor d_resid, d_tmp_c, d_att;    // (N, C)
  Tensor d_qkv;                      // (N, 3C)
  Tensor d_f, d_gu;                  // (N, F), (N, 2F)
  Tensor logits_scratch;             // (chunk, V)
  int chunk_rows = 0;
  Tensor rope_cos, rope_sin;
  kernels::RopeTable rope;
};

namespace {

void plan_into(ModelActivations& a, const ModelConfig& c, int B, int T) {
  const int64_t N = (int64_t)B * T, C = c.dim, F = c.ffn_dim, L = c.n_layers;
  Arena& ar = a.arena;
  a.B = B;
  a.T = T;
  a.pos = ar.alloc({N}, DType::I32);
  a.resid.clear(); a.rstd1.clear(); a.rstd2.clear(); a.qkv.clear(); a.att.clear(); a.lse.clear(); a.h.clear(); a.gu.clear();
  for (int64_t i = 0; i <= L; ++i) a.resid.push_back(ar.alloc({N, C}));
  for (int64_t i = 0; i < L; ++i) {
    a.rstd1.push_back(ar.alloc({N}));
    a.rstd2.push_back(ar.alloc({N}));
    a.qkv.push_back(ar.alloc({N, 3 * C}));
    a.att.push_back(ar.alloc({N, C}));
    a.lse.push_back(ar.alloc({(int64_t)B, (int64_t)c.n_heads, (int64_t)T}));
    a.h.push_back(ar.alloc({N, C}));
    a.gu.push_back(ar.alloc({N, 2 * F}));
  }
  a.norm_out = ar.alloc({N, C});
  a.rstd_f = ar.alloc({N});
  a.tmp_c = ar.alloc({N, C});
  a.tmp_f = ar.alloc({N, F});
  a.d_resid = ar.alloc({N, C});
  a.d_tmp_c = ar.alloc({N, C});
  a.d_att = ar.alloc({N, C});
  a.d_qkv = ar.alloc({N, 3 * C});
  a.d_f = ar.alloc({N, F});
  a.d_gu = ar.alloc({N, 2 * F});
  // Chunks of at most ~32 MB of logits.
  a.chunk_rows = (int)std::max<int64_t>(1, std::min<int64_t>(N, (8 << 20) / c.vocab_size));
  a.logits_scratch = ar.alloc({(int64_t)a.chunk_rows, (int64_t)c.vocab_size});
  a.rope_cos = ar.alloc({(int64_t)c.context, (int64_t)c.head_dim() / 2});
  a.rope_sin = ar.alloc({(int64_t)c.context, (int64_t)c.head_dim() / 2});
}

}  // namespace

Model::Model(ModelConfig cfg) : cfg_(std::move(cfg)) {
  cfg_.validate();
  const Structure st = cfg_.parse();
  check(st.is_plain(), "structure '" + cfg_.layout() + "' has subsamplers, which this build does not run yet");
  const int64_t C = cfg_.dim, F = cfg_.ffn_dim, V = cfg_.vocab_size;
  // Tensors start on 64-byte boundaries, except that q, k and v stay back to back so one
  // GEMM against their (3C, C) block computes all three projections.
  auto add = [&](const std::string& name, Shape shape, bool decay, bool pad_after = true) {
    ParamInfo p;
    p.name = name;
    p.shape = std::move(shape);
    p.numel = shape_numel(p.shape);
    p.offset = num_params_;
    p.decay = decay;
    num_params_ += pad_after ? (p.numel + 15) / 16 * 16 : p.numel;
    params_.push_back(std::move(p));
  };
  add("decoder.embed_tokens.weight", {V, C}, true);
  for (int i = 0; i < cfg_.n_layers; ++i) {
    const std::string pre = layer_prefix(i);
    add(pre + "self_attn_layer_norm.weight", {C}, false);
    add(pre + "self_attn.q_proj.weight", {C, C}, true, false);
    add(pre + "self_attn.k_proj.weight", {C, C}, true, false);
    add(pre + "self_attn.v_proj.weight", {C, C}, true);
    add(pre + "self_attn.out_proj.weight", {C, C}, true);
    add(pre + "final_layer_norm.weight", {C}, false);
    add(pre + "feedforward.swiglu.w12.weight", {2 * F, C}, true);
    add(pre + "feedforward.swiglu.w3.weight", {C, F}, true);
  }
  add("decoder.layer_norm.weight", {C}, false);
  if (!cfg_.tie_weights) add("decoder.output_projection.weight", {V, C}, true);
  for (int i = 0; i < cfg_.n_layers; ++i) {
    const std::string pre = layer_prefix(i);
    BlockOffsets b;
    b.attn_norm = param_info(pre + "self_attn_layer_norm.weight").offset;
    b.wqkv = param_info(pre + "self_attn.q_proj.weight").offset;
    b.wo = param_info(pre + "self_attn.out_proj.weight").offset;
    b.ffn_norm = param_info(pre + "final_layer_norm.weight").offset;
    b.w12 = param_info(pre + "feedforward.swiglu.w12.weight").offset;
    b.w3 = param_info(pre + "feedforward.swiglu.w3.weight").offset;
    blocks_.push_back(b);
  }
  params_buf_ = Tensor::zeros({num_params_});
  grads_buf_ = Tensor::zeros({num_params_});
}

Model::~Model() = default;

const ParamInfo& Model::param_info(const std::string& name) const {
  for (const auto& p : params_)
    if (p.name == name) return p;
  throw Error("model has no parameter named '" + name + "'");
}

Tensor Model::param(const std::string& name) {
  const ParamInfo& p = param_info(name);
  return Tensor::view(param_data() + p.offset, p.shape);
}

Tensor Model::grad(const std::string& name) {
  const ParamInfo& p = param_info(name);
  return Tensor::view(grad_data() + p.offset, p.shape);
}

void Model::init_weights(uint64_t seed) {
  Rng rng(seed);
  params_buf_.zero();
  const double C = cfg_.dim;
  for (const auto& p : params_) {
    float* w = param_data() + p.offset;
    const std::string& n = p.name;
    auto ends_with = [&](const char* s) { return n.size() >= std::strlen(s) && n.compare(n.size() - std::strlen(s), std::string::npos, s) == 0; };
    if (n == "decoder.embed_tokens.weight") {
      const double sd = 1.0 / std::sqrt(C);
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)(rng.normal() * sd);
      std::fill(w + (int64_t)cfg_.padding_idx * cfg_.dim, w + (int64_t)(cfg_.padding_idx + 1) * cfg_.dim, 0.f);
    } else if (p.shape.size() == 1) {
      std::fill(w, w + p.numel, 1.0f);
    } else if (ends_with("out_proj.weight") || ends_with("w3.weight")) {
      const int layer = std::stoi(n.substr(std::strlen("decoder.layers.")));
      const double sd = 0.006 / std::sqrt(2.0 * (layer + 1));
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)rng.truncated_normal(sd);
    } else if (n == "decoder.output_projection.weight") {
      const double bound = 1.0 / std::sqrt(C);
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)((2.0 * rng.uniform() - 1.0) * bound);
    } else {  // q, k, v, w12
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)rng.truncated_normal(0.006);
    }
  }
}

void Model::load(const std::string& path) {
  SafetensorsFile f(path);
  for (const auto& p : params_) {
    check(f.has(p.name), path + ": tensor '" + p.name + "' is missing: the checkpoint does not match config.json (" +
                             cfg_.layout() + ", d " + std::to_string(cfg_.dim) + ")");
    f.read_f32(p.name, p.shape, param_data() + p.offset);
  }
  for (const auto& name : f.names()) {
    bool known = std::any_of(params_.begin(), params_.end(), [&](const ParamInfo& p) { return p.name == name; });
    check(known, path + ": tensor '" + name + "' has no place in this model: the checkpoint does not match config.json");
  }
}

void Model::save(const std::string& path) const {
  std::vector<SafetensorsOut> out;
  for (const auto& p : params_) out.push_back({p.name, DType::F32, p.shape, params_buf_.f32() + p.offset});
  write_safetensors(path, out, {{"format", "pt"}});
}

void Model::zero_grad() { grads_buf_.zero(); }

ModelActivations& Model::plan(int B, int T) {
  if (acts_ && acts_->B == B && acts_->T == T) return *acts_;
  Arena measure = Arena::measuring();
  ModelActivations probe;
  probe.arena = measure;
  plan_into(probe, cfg_, B, T);
  acts_ = std::make_unique<ModelActivations>();
  acts_->arena.reserve(probe.arena.used());
  plan_into(*acts_, cfg_, B, T);
  ModelActivations& a = *acts_;
  a.rope.head_dim = cfg_.head_dim();
  a.rope.max_pos = cfg_.context;
  a.rope.cos = a.rope_cos.f32();
  a.rope.sin = a.rope_sin.f32();
  kernels::rope_table_fill(a.rope, cfg_.rope_base);
  int32_t* pos = a.pos.i32();
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) pos[(int64_t)b * T + t] = t;
  return a;
}

size_t Model::activation_bytes(int B, int T) {
  Arena measure = Arena::measuring();
  ModelActivations probe;
  probe.arena = measure;
  plan_into(probe, cfg_, B, T);
  return probe.arena.used();
}

double Model::train_flops_per_token(int T) const {
  const double C = cfg_.dim, F = cfg_.ffn_dim, L = cfg_.n_layers, V = cfg_.vocab_size;
  const double mat = L * (4 * C * C + 3 * C * F) + V * C;
  return 6 * mat + 6 * L * T * C;
}

void Model::check_tokens(const int32_t* tokens, const int32_t* targets, int64_t n) const {
  for (int64_t i = 0; i < n; ++i) {
    check(tokens[i] >= 0 && tokens[i] < cfg_.vocab_size,
          "token id " + std::to_string(tokens[i]) + " at position " + std::to_string(i) + " is outside the vocabulary [0, " +
              std::to_string(cfg_.vocab_size) + "): the data was tokenized with a different tokenizer");
    if (targets)
      check(targets[i] < cfg_.vocab_size, "target id " + std::to_string(targets[i]) + " at position " +
                                              std::to_string(i) + " is outside the vocabulary [0, " +
                                              std::to_string(cfg_.vocab_size) + ")");
  }
}

float Model::forward_backward(const int32_t* tokens, const int32_t* targets, int B, int T, float grad_multiplier) {
  int64_t count = 0;
  double loss = run(tokens, targets, B, T, true, grad_multiplier, nullptr, &count);
  return count ? (float)(loss / count) : 0.f;
}

float Model::forward(const int32_t* tokens, const int32_t* targets, int B, int T, float* logits) {
  int64_t count = 0;
  double loss = run(tokens, targets, B, T, false, 1.0f, logits, &count);
  return count ? (float)(loss / count) : 0.f;
}

double Model::run(const int32_t* tokens, const int32_t* targets, int B, int T, bool backward, float grad_multiplier,
                  float* logits, int64_t* count) {
  namespace k = kernels;
  check(B > 0 && T > 0, "batch and length must be positive");
  check(T <= cfg_.context, "sequence length " + std::to_string(T) + " exceeds the model's context (tokens_per_sample = " +
                               std::to_string(cfg_.context) + "): shorten the input or raise tokens_per_sample");
  check(!backward || targets, "training needs targets");
  const int N = B * T, C = cfg_.dim, F = cfg_.ffn_dim, H = cfg_.n_heads, hd = cfg_.head_dim(), V = cfg_.vocab_size;
  const int L = cfg_.n_layers;
  check_tokens(tokens, targets, N);
  ModelActivations& a = plan(B, T);

  auto block_ptrs = [&](float* base, int i) {
    const BlockOffsets& o = blocks_[i];
    return BlockPtrs{base + o.attn_norm, base + o.wqkv, base + o.wo, base + o.ffn_norm, base + o.w12, base + o.w3};
  };
  float* P = param_data();
  float* G = grad_data();
  float* embed = P + param_info("decoder.embed_tokens.weight").offset;
  float* final_norm = P + param_info("decoder.layer_norm.weight").offset;
  const std::string head_name = cfg_.tie_weights ? "decoder.embed_tokens.weight" : "decoder.output_projection.weight";
  float* head = P + param_info(head_name).offset;
  const int32_t* pos = a.pos.i32();

  // ---- forward ----
  k::embedding_forward(tokens, embed, a.resid[0].f32(), N, C);
  for (int i = 0; i < L; ++i) {
    BlockPtrs w = block_ptrs(P, i);
    float* x = a.resid[i].f32();
    float* n1 = a.tmp_c.f32();
    float* qkv = a.qkv[i].f32();
    float* att = a.att[i].f32();
    float* h = a.h[i].f32();
    float* gu = a.gu[i].f32();
    float* y = a.resid[i + 1].f32();
    k::rmsnorm_forward(x, w.attn_norm, n1, a.rstd1[i].f32(), N, C, cfg_.norm_eps);
    // q, k, v weights are adjacent, so one GEMM against the (3C, C) block makes all three.
    k::linear_forward(n1, w.wqkv, qkv, N, C, 3 * C);
    k::rope_apply(qkv, 3 * C, N, H, pos, a.rope, false);
    k::rope_apply(qkv + C, 3 * C, N, H, pos, a.rope, false);
    k::attention_forward(qkv, qkv + C, qkv + 2 * C, 3 * C, att, C, a.lse[i].f32(), B, T, H, hd);
    std::memcpy(h, x, sizeof(float) * N * C);
    k::linear_forward(att, w.wo, h, N, C, C, true);
    k::rmsnorm_forward(h, w.ffn_norm, n1, a.rstd2[i].f32(), N, C, cfg_.norm_eps);
    k::linear_forward(n1, w.w12, gu, N, C, 2 * F);
    k::swiglu_forward(gu, a.tmp_f.f32(), N, F);
    std::memcpy(y, h, sizeof(float) * N * C);
    k::linear_forward(a.tmp_f.f32(), w.w3, y, N, F, C, true);
  }
  k::rmsnorm_forward(a.resid[L].f32(), final_norm, a.norm_out.f32(), a.rstd_f.f32(), N, C, cfg_.norm_eps);

  // Counting first lets the head produce gradients of the mean loss directly.
  int64_t n_counted = 0;
  if (targets)
    for (int i = 0; i < N; ++i) n_counted += targets[i] >= 0;
  float* head_grad = G + param_info(head_name).offset;
  const float gscale = n_counted ? grad_multiplier / (float)n_counted : 0.f;
  std::vector<int32_t> no_targets;
  if (!targets) no_targets.assign(N, -1);
  const int32_t* tg = targets ? targets : no_targets.data();
  double loss = k::lm_head_xent(a.norm_out.f32(), head, tg, N, C, V, gscale, backward ? a.d_tmp_c.f32() : nullptr,
                                backward ? head_grad : nullptr, logits, a.logits_scratch.f32(), a.chunk_rows, count);
  if (!backward) return loss;

  // ---- backward ----
  float* dres = a.d_resid.f32();
  k::rmsnorm_backward(a.resid[L].f32(), final_norm, a.rstd_f.f32(), a.d_tmp_c.f32(), dres,
                      G + param_info("decoder.layer_norm.weight").offset, N, C, false);
  for (int i = L - 1; i >= 0; --i) {
    BlockPtrs w = block_ptrs(P, i);
    BlockPtrs gw = block_ptrs(G, i);
    float* x = a.resid[i].f32();
    float* qkv = a.qkv[i].f32();
    float* att = a.att[i].f32();
    float* h = a.h[i].f32();
    float* gu = a.gu[i].f32();
    float* tmp_c = a.tmp_c.f32();
    float* dtmp_c = a.d_tmp_c.f32();
    // y = h + w3 · swiglu(gu); dres holds dy
    k::swiglu_forward(gu, a.tmp_f.f32(), N, F);
    k::linear_backward(a.tmp_f.f32(), w.w3, dres, a.d_f.f32(), gw.w3, N, F, C);
    k::swiglu_backward(gu, a.d_f.f32(), a.d_gu.f32(), N, F);
    k::rmsnorm_forward(h, w.ffn_norm, tmp_c, a.rstd2[i].f32(), N, C, cfg_.norm_eps);
    k::linear_backward(tmp_c, w.w12, a.d_gu.f32(), dtmp_c, gw.w12, N, C, 2 * F);
    k::rmsnorm_backward(h, w.ffn_norm, a.rstd2[i].f32(), dtmp_c, dres, gw.ffn_norm, N, C, true);
    // h = x + wo · att; dres now holds dh
    k::linear_backward(att, w.wo, dres, a.d_att.f32(), gw.wo, N, C, C);
    float* dqkv = a.d_qkv.f32();
    k::attention_backward(qkv, qkv + C, qkv + 2 * C, 3 * C, att, C, a.d_att.f32(), a.lse[i].f32(), dqkv, dqkv + C,
                          dqkv + 2 * C, 3 * C, B, T, H, hd);
    k::rope_apply(dqkv, 3 * C, N, H, pos, a.rope, true);
    k::rope_apply(dqkv + C, 3 * C, N, H, pos, a.rope, true);
    k::rmsnorm_forward(x, w.attn_norm, tmp_c, a.rstd1[i].f32(), N, C, cfg_.norm_eps);
    k::linear_backward(tmp_c, w.wqkv, dqkv, dtmp_c, gw.wqkv, N, C, 3 * C);
    k::rmsnorm_backward(x, w.attn_norm, a.rstd1[i].f32(), dtmp_c, dres, gw.attn_norm, N, C, true);
  }
  k::embedding_backward(tokens, dres, G + param_info("decoder.embed_tokens.weight").offset, N, C, V);
  return loss;
}

}  // namespace subllm
