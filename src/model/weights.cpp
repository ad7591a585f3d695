// The parameters: their layout in one flat buffer, initialisation and checkpoint I/O.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/backend.h"
#include "subllm/error.h"
#include "subllm/model.h"
#include "subllm/rng.h"
#include "subllm/safetensors.h"

namespace subllm {

namespace {
std::string layer_prefix(int i) { return "decoder.layers." + std::to_string(i) + "."; }
std::string bypass_name(int k) { return "decoder.bypasses." + std::to_string(k) + ".bypass_scale"; }

bool ends_with(const std::string& n, const std::string& tail) {
  return n.size() >= tail.size() && n.compare(n.size() - tail.size(), tail.size(), tail) == 0;
}

// The bypass numbering of a weights file: its own metadata (what subllm writes since format 2)
// or else what its config.json said.
int file_bypass_numbering(const SafetensorsFile& f, int from_config) {
  auto it = f.metadata().find("subllm_format");
  if (it == f.metadata().end()) return from_config;
  return it->second == "1" ? 1 : 2;
}

// The authors' state dicts carry each block's RoPE inverse frequencies; they are not weights,
// but a different base would mean the model was trained with other positions.
void check_inv_freq(const SafetensorsFile& f, const std::string& name, const ModelConfig& c) {
  const int64_t half = c.head_dim() / 2;
  std::vector<float> got((size_t)half);
  f.read_f32(name, {half}, got.data());
  for (int64_t i = 0; i < half; ++i) {
    const double want = std::pow((double)c.rope_base, -2.0 * (double)i / (double)c.head_dim());
    // bf16 copies of the buffer round to 3 digits; another base differs by far more.
    if (!(std::fabs(got[(size_t)i] - want) <= 1e-2 * want)) {
      throw Error(f.path() + ": RoPE buffer '" + name + "' does not match rope_base " +
                  std::to_string((long long)c.rope_base) + " of config.json (element " + std::to_string(i) + " is " +
                  std::to_string(got[(size_t)i]) + ", expected " + std::to_string(want) +
                  "): set rope_base to the base the model was trained with");
    }
  }
}

// Index of the first NaN or infinity in x[0, n), or -1. A branch-free pass over the exponent
// bits (all ones only for those) runs at memory speed; only a hit is then located.
int64_t first_non_finite(const float* x, int64_t n) {
  uint32_t exponent = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    exponent = std::max(exponent, bits & 0x7f800000u);
  }
  if (exponent != 0x7f800000u) return -1;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return i;
  return -1;
}

// A config.json without qk_bias means true (the authors' default), which a checkpoint
// without biases then contradicts: say so.
bool is_qk_bias(const std::string& name) {
  const std::string suffix = "_proj.bias";
  return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}
std::string bias_hint(const std::string& name) {
  if (!is_qk_bias(name)) return "";
  return "; config.json has qk_bias true (also the meaning of a missing key): write \"qk_bias\": false for a "
         "checkpoint without q/k biases";
}
}  // namespace

Weights::Weights(ModelConfig cfg, Backend& backend) : Weights(std::move(cfg), backend, Buffer::allocate) {}

Weights::Weights(ModelConfig cfg, Backend& backend, Buffer buffer) : cfg_(std::move(cfg)), backend_(&backend) {
  cfg_.validate();
  structure_ = cfg_.parse();
  const int64_t C = cfg_.dim, F = cfg_.ffn_dim, V = cfg_.vocab_size, KV = cfg_.kv_dim();
  // Tensors start on 64-byte boundaries, except that q, k and v stay back to back so one
  // GEMM against their (3C, C) block computes all three projections.
  auto add = [&](const std::string& name, Shape shape, bool decay, bool pad_after = true, float lr_scale = 1.0f) {
    ParamInfo p;
    p.name = name;
    p.shape = std::move(shape);
    p.numel = shape_numel(p.shape);
    p.offset = num_params_;
    p.decay = decay;
    p.lr_scale = lr_scale;
    num_params_ += pad_after ? (p.numel + 15) / 16 * 16 : p.numel;
    params_.push_back(std::move(p));
    return params_.back().offset;
  };
  embed_offset_ = add("decoder.embed_tokens.weight", {V, C}, true);
  embed_span_ = {embed_offset_, num_params_};
  for (int i = 0; i < cfg_.n_layers; ++i) {
    const std::string pre = layer_prefix(i);
    const int64_t first = num_params_;
    BlockOffsets b;
    b.attn_norm = add(pre + "self_attn_layer_norm.weight", {C}, false);
    // k and v have KV = kv_heads * head_dim rows (C without grouped-query attention).
    b.wqkv = add(pre + "self_attn.q_proj.weight", {C, C}, true, false);
    add(pre + "self_attn.k_proj.weight", {KV, C}, true, false);
    add(pre + "self_attn.v_proj.weight", {KV, C}, true);
    // Adjacent too, so one (C + KV) vector adds to the q|k columns of the fused projection.
    if (cfg_.qk_bias) {
      b.qk_bias = add(pre + "self_attn.q_proj.bias", {C}, false, false);
      add(pre + "self_attn.k_proj.bias", {KV}, false);
    }
    b.wo = add(pre + "self_attn.out_proj.weight", {C, C}, true);
    b.ffn_norm = add(pre + "final_layer_norm.weight", {C}, false);
    b.w12 = add(pre + "feedforward.swiglu.w12.weight", {2 * F, C}, true);
    b.w3 = add(pre + "feedforward.swiglu.w3.weight", {C, F}, true);
    blocks_.push_back(b);
    block_span_.push_back({first, num_params_});
  }
  // The score layers learn at half the rate (SUBLLM.md §4); neither they nor the bypass
  // scales are decayed, as both are control values rather than features.
  for (int j = 0; j < structure_.num_subsamplers; ++j) {
    score_offset_.push_back(
        add("decoder.downsamplers." + std::to_string(j) + ".to_scores.weight", {1, C}, false, true, 0.5f));
    score_span_.push_back({score_offset_.back(), num_params_});
  }
  // Named by the authors' numbering (the k-th `)`), but laid out by subsampler, so optimizer
  // states written before the renumbering still line up.
  for (int j = 0; j < structure_.num_subsamplers; ++j) {
    const int k = structure_.segments[static_cast<size_t>(j) + 1].bypass;
    bypass_offset_.push_back(add(bypass_name(k), {C}, false));
    if (k != j) params_.back().legacy_name = bypass_name(j);
    bypass_span_.push_back({bypass_offset_.back(), num_params_});
  }
  final_norm_offset_ = add("decoder.layer_norm.weight", {C}, false);
  final_norm_span_ = {final_norm_offset_, num_params_};
  head_offset_ = cfg_.tie_weights ? 0 : add("decoder.output_projection.weight", {V, C}, true);
  head_span_ = cfg_.tie_weights ? Span{num_params_, num_params_} : Span{head_offset_, num_params_};
  compute_dtype_ = backend_->compute_dtype();
  if (buffer == Buffer::allocate) {  // mapped weights (weights_mapped.cpp) point into their file instead
    buf_ = backend_->zeros({num_params_});
    if (compute_dtype_ != DType::F32) compute_buf_ = backend_->empty({num_params_}, compute_dtype_);
    params_changed();
  }
  const int64_t half = cfg_.head_dim() / 2;
  rope_cos_ = backend_->zeros({(int64_t)cfg_.context, half});
  rope_sin_ = backend_->zeros({(int64_t)cfg_.context, half});
  backend_->rope_table(view_of(rope_cos_), view_of(rope_sin_), cfg_.head_dim(), cfg_.rope_base);
}

Weights::~Weights() = default;

void Weights::params_changed() {
  if (!compute_buf_.raw()) return;
  backend_->convert(vec(data(), num_params_), View{compute_buf_.raw(), compute_dtype_, num_params_, 1, 1});
}

const ParamInfo& Weights::param_info(const std::string& name) const {
  for (const auto& p : params_)
    if (p.name == name) return p;
  throw Error("model has no parameter named '" + name + "'");
}

void Weights::init(uint64_t seed) {
  check(!mapped(), "weights mapped from a file are read-only: initialise a model made with Model(config)");
  // Drawn on the host in parameter order, so every backend starts from the same weights.
  std::vector<float> host((size_t)num_params_, 0.f);
  Rng rng(seed);
  const double C = cfg_.dim;
  for (const auto& p : params_) {
    float* w = host.data() + p.offset;
    const std::string& n = p.name;
    if (n == "decoder.embed_tokens.weight") {
      const double sd = 1.0 / std::sqrt(C);
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)(rng.normal() * sd);
      std::fill(w + (int64_t)cfg_.padding_idx * cfg_.dim, w + (int64_t)(cfg_.padding_idx + 1) * cfg_.dim, 0.f);
    } else if (ends_with(n, ".bias")) {
      std::fill(w, w + p.numel, 0.f);  // the authors start q/k biases at zero
    } else if (ends_with(n, "bypass_scale")) {
      std::fill(w, w + p.numel, 0.5f);
    } else if (p.shape.size() == 1) {
      std::fill(w, w + p.numel, 1.0f);
    } else if (ends_with(n, "out_proj.weight") || ends_with(n, "w3.weight")) {
      const int layer = std::stoi(n.substr(std::strlen("decoder.layers.")));
      const double sd = 0.006 / std::sqrt(2.0 * (layer + 1));
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)rng.truncated_normal(sd);
    } else if (n == "decoder.output_projection.weight" || ends_with(n, "to_scores.weight")) {
      // PyTorch's default Linear init: uniform in ±1/sqrt(fan_in).
      const double bound = 1.0 / std::sqrt(C);
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)((2.0 * rng.uniform() - 1.0) * bound);
    } else {  // q, k, v, w12
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)rng.truncated_normal(0.006);
    }
  }
  upload(host);
}

void Weights::load(const std::string& path) {
  check(!mapped(), "weights mapped from a file are read-only: load into a model made with Model(config)");
  SafetensorsFile f(path);
  if (load_typed(f)) return;
  const int numbering = file_bypass_numbering(f, cfg_.bypass_numbering);
  const bool renumbered = std::any_of(params_.begin(), params_.end(), [](const ParamInfo& p) { return !p.legacy_name.empty(); });
  if (numbering == 0 && renumbered) {
    throw Error(path + ": cannot tell how its decoder.bypasses.k are numbered (structure " + cfg_.layout() +
                " nests subsamplers, and the two numberings differ): add \"subllm_format\": 2 to config.json if the "
                "model comes from the authors' code, or \"subllm_format\": 1 if an older subllm wrote it");
  }
  auto file_name = [&](const ParamInfo& p) -> const std::string& {
    return numbering == 1 && !p.legacy_name.empty() ? p.legacy_name : p.name;
  };
  const std::string head = "decoder.output_projection.weight";
  for (const auto& name : f.names()) {
    if (ends_with(name, ".inv_freq")) {
      check_inv_freq(f, name, cfg_);
      continue;
    }
    bool known = std::any_of(params_.begin(), params_.end(), [&](const ParamInfo& p) { return file_name(p) == name; });
    known = known || (cfg_.tie_weights && name == head);
    check(known, path + ": tensor '" + name + "' has no place in this model: the checkpoint does not match config.json" +
                     (is_qk_bias(name) ? " (it says qk_bias false: write \"qk_bias\": true for a checkpoint with q/k biases)"
                                       : ""));
  }
  // Read and check everything before the live weights change.
  std::vector<float> host((size_t)num_params_, 0.f);
  for (const auto& p : params_) {
    const std::string& name = file_name(p);
    check(f.has(name), path + ": tensor '" + name + "' is missing: the checkpoint does not match config.json (" +
                           cfg_.layout() + ", d " + std::to_string(cfg_.dim) + ")" + bias_hint(name));
    f.read_f32(name, p.shape, host.data() + p.offset);
    // Weights that diverged would only give garbage text and a nan perplexity later.
    const int64_t bad = first_non_finite(host.data() + p.offset, p.numel);
    if (bad >= 0) {
      throw Error(path + ": tensor '" + name + "' holds " + (std::isnan(host[p.offset + bad]) ? "NaN" : "infinity") +
                  " (element " + std::to_string(bad) +
                  "): the checkpoint is damaged (did training diverge?); use an earlier checkpoint of the run");
    }
  }
  if (cfg_.tie_weights && f.has(head)) {
    // A tied state dict names the shared tensor twice; a different second copy is not tied.
    const ParamInfo& embed = params_.front();
    std::vector<float> copy((size_t)embed.numel);
    f.read_f32(head, embed.shape, copy.data());
    check(std::memcmp(copy.data(), host.data() + embed.offset, sizeof(float) * copy.size()) == 0,
          path + ": tensor '" + head + "' differs from decoder.embed_tokens.weight, but config.json says tie_weights true: "
                 "set tie_weights to false if the model has its own output projection");
  }
  upload(host);
}

void Weights::save(const std::string& path) const {
  if (weight_dtype_ != DType::F32) return save_typed(path);
  std::vector<float> host((size_t)num_params_);
  backend_->to_host(host.data(), data(), sizeof(float) * host.size());
  std::vector<SafetensorsOut> out;
  for (const auto& p : params_) out.push_back({p.name, DType::F32, p.shape, host.data() + p.offset});
  // In layout order, so that inference can map the file (weights_mapped.cpp).
  write_safetensors(path, out, {{"format", "pt"}, {"subllm_format", "2"}}, true);
}

}  // namespace subllm
