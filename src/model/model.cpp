#include "subllm/model.h"

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstring>
#include <omp.h>

#include "kernels/kernels.h"
#include "model/block_io.h"
#include "subllm/error.h"
#include "subllm/rng.h"
#include "subllm/safetensors.h"

namespace subllm {

namespace {

std::string layer_prefix(int i) { return "decoder.layers." + std::to_string(i) + "."; }

}  // namespace

// Activations of one transformer block, sized for the rows of its segment.
struct BlockActs {
  Tensor rstd1, rstd2;  // (rows)
  Tensor qkv;           // (rows, 3C), q and k after RoPE
  Tensor att;           // (rows, C) attention output before out_proj
  Tensor lse;           // (B, H, T_seg)
  Tensor h;             // (rows, C) after the attention residual
  Tensor gu;            // (rows, 2F)
};

// One level of the layout: the whole sequence (segment 0) or the tokens a subsampler kept.
struct SegmentActs {
  int T = 0;                   // tokens per sequence now (inference: this pass's count)
  int T_cap = 0;               // tokens per sequence the memory was planned for
  Tensor pos;                  // (B*T) original positions, for RoPE
  std::vector<Tensor> stream;  // items+1 of (B*T, C): the residual stream between items
  Tensor d_stream;             // (B*T, C)
  // Subsampler side (segments other than the root); parent rows are (B * parent T).
  Tensor scores, d_weights;    // (parent rows)
  Tensor kept;                 // (B*T) parent row of each kept token, ascending per sequence
  Tensor partner;              // (B*T) parent row whose weight is subtracted from w_scale, or -1
  Tensor w_scale;              // (B*T)
  Tensor d_bypass;             // (C) this pass's bypass-scale gradient, before the limit
  bool balancer_on = false, limit_on = false;
};

// Activations saved for backward, planned once per (B, T, mode) and reused every step.
struct ModelActivations {
  int B = 0, T = 0;
  Mode mode = Mode::Train;
  Arena arena;
  std::vector<SegmentActs> seg;
  std::vector<BlockActs> blk;
  Tensor norm_out, rstd_f;           // (N, C), (N) final norm
  Tensor tmp_c, tmp_f;               // (N, C), (N, F): recomputed norm / swiglu outputs
  Tensor d_tmp_c, d_att;             // (N, C)
  Tensor d_qkv;                      // (N, 3C)
  Tensor d_f, d_gu;                  // (N, F), (N, 2F)
  Tensor logits_scratch;             // (chunk, V)
  int chunk_rows = 0;
};

namespace {

// Training keeps ceil(T * r) tokens; the small margin keeps a float r such as 0.8f from
// rounding T * r = 8.0000001 up to 9.
int kept_length(int T, float r) { return std::max(1, (int)std::ceil((double)T * r - 1e-6)); }

std::vector<int> plan_lengths(const Structure& st, int T, Mode mode) {
  std::vector<int> len(st.segments.size(), T);
  for (size_t s = 1; s < st.segments.size(); ++s) {
    const Segment& g = st.segments[s];
    // Parents precede children in the segment list, so the parent's length is known.
    len[s] = mode == Mode::Train ? kept_length(len[g.parent], g.retention) : len[g.parent];
  }
  return len;
}

void plan_into(ModelActivations& a, const ModelConfig& c, const Structure& st, int B, int T, Mode mode) {
  const int64_t N = (int64_t)B * T, C = c.dim, F = c.ffn_dim;
  Arena& ar = a.arena;
  a.B = B;
  a.T = T;
  a.mode = mode;
  const std::vector<int> len = plan_lengths(st, T, mode);
  a.seg.assign(st.segments.size(), SegmentActs{});
  a.blk.assign(st.num_blocks, BlockActs{});
  for (size_t s = 0; s < st.segments.size(); ++s) {
    SegmentActs& g = a.seg[s];
    const int64_t rows = (int64_t)B * len[s];
    g.T = g.T_cap = len[s];
    g.pos = ar.alloc({rows}, DType::I32);
    for (size_t k = 0; k <= st.segments[s].items.size(); ++k) g.stream.push_back(ar.alloc({rows, C}));
    g.d_stream = ar.alloc({rows, C});
    if (s > 0) {
      const int64_t parent_rows = (int64_t)B * len[st.segments[s].parent];
      g.scores = ar.alloc({parent_rows});
      g.d_weights = ar.alloc({parent_rows});
      g.kept = ar.alloc({rows}, DType::I32);
      g.partner = ar.alloc({rows}, DType::I32);
      g.w_scale = ar.alloc({rows});
      g.d_bypass = ar.alloc({C});
    }
    for (const SegmentItem& it : st.segments[s].items) {
      if (!it.is_block) continue;
      BlockActs& b = a.blk[it.index];
      b.rstd1 = ar.alloc({rows});
      b.rstd2 = ar.alloc({rows});
      b.qkv = ar.alloc({rows, 3 * C});
      b.att = ar.alloc({rows, C});
      b.lse = ar.alloc({(int64_t)B, (int64_t)c.n_heads, (int64_t)len[s]});
      b.h = ar.alloc({rows, C});
      b.gu = ar.alloc({rows, 2 * F});
    }
  }
  a.norm_out = ar.alloc({N, C});
  a.rstd_f = ar.alloc({N});
  a.tmp_c = ar.alloc({N, C});
  a.tmp_f = ar.alloc({N, F});
  a.d_tmp_c = ar.alloc({N, C});
  a.d_att = ar.alloc({N, C});
  a.d_qkv = ar.alloc({N, 3 * C});
  a.d_f = ar.alloc({N, F});
  a.d_gu = ar.alloc({N, 2 * F});
  // Chunks of at most ~32 MB of logits.
  a.chunk_rows = (int)std::max<int64_t>(1, std::min<int64_t>(N, (8 << 20) / c.vocab_size));
  a.logits_scratch = ar.alloc({(int64_t)a.chunk_rows, (int64_t)c.vocab_size});
}

// Mixes the step, seed and a per-site salt into one generator seed.
uint64_t mix_seed(uint64_t seed, long step, uint64_t salt) {
  uint64_t z = seed * 0x9e3779b97f4a7c15ull + (uint64_t)step * 0xbf58476d1ce4e5b9ull + salt * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return z;
}

}  // namespace

Model::Model(ModelConfig cfg) : cfg_(std::move(cfg)) {
  cfg_.validate();
  structure_ = cfg_.parse();
  const int64_t C = cfg_.dim, F = cfg_.ffn_dim, V = cfg_.vocab_size;
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
  for (int i = 0; i < cfg_.n_layers; ++i) {
    const std::string pre = layer_prefix(i);
    BlockOffsets b;
    b.attn_norm = add(pre + "self_attn_layer_norm.weight", {C}, false);
    b.wqkv = add(pre + "self_attn.q_proj.weight", {C, C}, true, false);
    add(pre + "self_attn.k_proj.weight", {C, C}, true, false);
    add(pre + "self_attn.v_proj.weight", {C, C}, true);
    b.wo = add(pre + "self_attn.out_proj.weight", {C, C}, true);
    b.ffn_norm = add(pre + "final_layer_norm.weight", {C}, false);
    b.w12 = add(pre + "feedforward.swiglu.w12.weight", {2 * F, C}, true);
    b.w3 = add(pre + "feedforward.swiglu.w3.weight", {C, F}, true);
    blocks_.push_back(b);
  }
  // The score layers learn at half the rate (SUBLLM.md §4); neither they nor the bypass
  // scales are decayed, as both are control values rather than features.
  for (int j = 0; j < structure_.num_subsamplers; ++j)
    score_offset_.push_back(
        add("decoder.downsamplers." + std::to_string(j) + ".to_scores.weight", {1, C}, false, true, 0.5f));
  for (int j = 0; j < structure_.num_subsamplers; ++j)
    bypass_offset_.push_back(add("decoder.bypasses." + std::to_string(j) + ".bypass_scale", {C}, false));
  final_norm_offset_ = add("decoder.layer_norm.weight", {C}, false);
  head_offset_ = cfg_.tie_weights ? 0 : add("decoder.output_projection.weight", {V, C}, true);
  params_buf_ = Tensor::zeros({num_params_});
  grads_buf_ = Tensor::zeros({num_params_});
  traces_.assign(structure_.num_subsamplers, SubsamplerTrace{});
  reset_retention_stats();
  const size_t half = (size_t)cfg_.head_dim() / 2;
  rope_cos_.resize((size_t)cfg_.context * half);
  rope_sin_.resize((size_t)cfg_.context * half);
  rope_ = std::make_unique<kernels::RopeTable>(
      kernels::RopeTable{cfg_.head_dim(), cfg_.context, rope_cos_.data(), rope_sin_.data()});
  kernels::rope_table_fill(*rope_, cfg_.rope_base);
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
  auto ends_with = [](const std::string& n, const char* s) {
    const size_t k = std::strlen(s);
    return n.size() >= k && n.compare(n.size() - k, k, s) == 0;
  };
  for (const auto& p : params_) {
    float* w = param_data() + p.offset;
    const std::string& n = p.name;
    if (n == "decoder.embed_tokens.weight") {
      const double sd = 1.0 / std::sqrt(C);
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)(rng.normal() * sd);
      std::fill(w + (int64_t)cfg_.padding_idx * cfg_.dim, w + (int64_t)(cfg_.padding_idx + 1) * cfg_.dim, 0.f);
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

void Model::set_train_context(long step, uint64_t seed) {
  train_step_ = step;
  train_seed_ = seed;
}

void Model::reset_retention_stats() {
  seen_.assign(structure_.num_subsamplers, 0);
  kept_.assign(structure_.num_subsamplers, 0);
}

std::vector<double> Model::retention() const {
  std::vector<double> r;
  for (int j = 0; j < structure_.num_subsamplers; ++j) r.push_back(seen_[j] ? (double)kept_[j] / seen_[j] : 0.0);
  return r;
}

std::vector<ScoreStats> Model::score_stats() const {
  std::vector<ScoreStats> out;
  for (int j = 0; j < (int)traces_.size(); ++j) {
    const SubsamplerTrace& tr = traces_[j];
    ScoreStats st;
    const size_t n = tr.scores.size();
    if (n == 0) {
      out.push_back(st);
      continue;
    }
    const float v = keep_threshold(j);
    double sq = 0;
    int64_t above = 0;
    for (float s : tr.scores) {
      sq += (double)s * s;
      above += s > v;
    }
    st.above = (double)above / n;
    st.rms = std::sqrt(sq / n);
    // kept holds positions within each parent sequence of length n / B.
    const size_t per_seq = tr.kept_per_seq, B = per_seq ? tr.kept.size() / per_seq : 0;
    double w = 0;
    if (B > 0) {
      const size_t Tp = n / B;
      for (size_t i = 0; i < tr.kept.size(); ++i)
        w += std::clamp(tr.scores[(i / per_seq) * Tp + (size_t)tr.kept[i]], 0.0f, 1.0f);
      st.kept_weight = w / tr.kept.size();
    }
    out.push_back(st);
  }
  return out;
}

ModelActivations& Model::plan(int B, int T, Mode mode) {
  if (acts_ && acts_->B == B && acts_->T == T && acts_->mode == mode) return *acts_;
  acts_.reset();  // release the old plan before allocating the new one
  ModelActivations probe;
  probe.arena = Arena::measuring();
  plan_into(probe, cfg_, structure_, B, T, mode);
  acts_ = std::make_unique<ModelActivations>();
  acts_->arena.reserve(probe.arena.used());
  plan_into(*acts_, cfg_, structure_, B, T, mode);
  ModelActivations& a = *acts_;
  int32_t* pos = a.seg[0].pos.i32();
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) pos[(int64_t)b * T + t] = t;
  return a;
}

size_t Model::activation_bytes(int B, int T) {
  ModelActivations probe;
  probe.arena = Arena::measuring();
  plan_into(probe, cfg_, structure_, B, T, Mode::Train);
  return probe.arena.used();
}

std::vector<int> Model::segment_lengths(int T) const { return plan_lengths(structure_, T, Mode::Train); }

double Model::train_flops_per_token(int T) const {
  const double C = cfg_.dim, F = cfg_.ffn_dim, V = cfg_.vocab_size;
  const std::vector<int> len = segment_lengths(T);
  double flops = 6 * V * C;
  for (size_t s = 0; s < structure_.segments.size(); ++s) {
    const double frac = (double)len[s] / T;
    for (const SegmentItem& it : structure_.segments[s].items)
      if (it.is_block) flops += frac * (6 * (4 * C * C + 3 * C * F) + 6.0 * len[s] * C);
  }
  return flops;
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
  double loss = run(tokens, targets, B, T, Mode::Train, true, grad_multiplier, nullptr, &count);
  return count ? (float)(loss / count) : 0.f;
}

float Model::forward(const int32_t* tokens, const int32_t* targets, int B, int T, float* logits, Mode mode) {
  int64_t count = 0;
  double loss = 0;
  if (mode == Mode::Inference && !structure_.is_plain()) {
    // Kept lengths differ per sequence, so each sequence is its own pass.
    const int64_t V = cfg_.vocab_size;
    for (int b = 0; b < B; ++b) {
      int64_t c = 0;
      loss += run(tokens + (int64_t)b * T, targets ? targets + (int64_t)b * T : nullptr, 1, T, mode, false, 1.0f,
                  logits ? logits + (int64_t)b * T * V : nullptr, &c);
      count += c;
    }
  } else {
    loss = run(tokens, targets, B, T, mode, false, 1.0f, logits, &count);
  }
  return count ? (float)(loss / count) : 0.f;
}

// ---- transformer block -----------------------------------------------------------------

void Model::block_core(int blk, const float* x, float* y, int rows, const int32_t* pos, const BlockIO& io,
                       const std::function<void()>& attend) {
  namespace k = kernels;
  const int N = rows, C = cfg_.dim, F = cfg_.ffn_dim, H = cfg_.n_heads;
  const BlockOffsets& o = blocks_[blk];
  const float* P = param_data();
  k::rmsnorm_forward(x, P + o.attn_norm, io.n1, io.rstd1, N, C, cfg_.norm_eps);
  // q, k, v weights are adjacent, so one GEMM against the (3C, C) block makes all three.
  k::linear_forward(io.n1, P + o.wqkv, io.qkv, N, C, 3 * C);
  k::rope_apply(io.qkv, 3 * C, N, H, pos, *rope_, false);
  k::rope_apply(io.qkv + C, 3 * C, N, H, pos, *rope_, false);
  attend();
  std::memcpy(io.h, x, sizeof(float) * N * C);
  k::linear_forward(io.att, P + o.wo, io.h, N, C, C, true);
  k::rmsnorm_forward(io.h, P + o.ffn_norm, io.n1, io.rstd2, N, C, cfg_.norm_eps);
  k::linear_forward(io.n1, P + o.w12, io.gu, N, C, 2 * F);
  k::swiglu_forward(io.gu, io.a, N, F);
  std::memcpy(y, io.h, sizeof(float) * N * C);
  k::linear_forward(io.a, P + o.w3, y, N, F, C, true);
}

void Model::block_forward(ModelActivations& a, int blk, int seg, const float* x, float* y) {
  const SegmentActs& g = a.seg[seg];
  BlockActs& ba = a.blk[blk];
  const int B = a.B, T = g.T, C = cfg_.dim;
  BlockIO io{a.tmp_c.f32(), ba.qkv.f32(), ba.att.f32(), ba.h.f32(), ba.gu.f32(), a.tmp_f.f32(), ba.rstd1.f32(),
             ba.rstd2.f32()};
  block_core(blk, x, y, B * T, g.pos.i32(), io, [&] {
    kernels::attention_forward(io.qkv, io.qkv + C, io.qkv + 2 * C, 3 * C, io.att, C, ba.lse.f32(), B, T,
                               cfg_.n_heads, cfg_.head_dim());
  });
}

// dres holds dy on entry and dx on return. Norm outputs and the SwiGLU product are
// recomputed rather than stored: a cheap pass instead of two more saved tensors per block.
void Model::block_backward(ModelActivations& a, int blk, int seg, const float* x, float* dres) {
  namespace k = kernels;
  const SegmentActs& g = a.seg[seg];
  BlockActs& ba = a.blk[blk];
  const int B = a.B, T = g.T, N = B * T, C = cfg_.dim, F = cfg_.ffn_dim, H = cfg_.n_heads;
  const BlockOffsets& o = blocks_[blk];
  const float* P = param_data();
  float* G = grad_data();
  const int32_t* pos = g.pos.i32();
  float* qkv = ba.qkv.f32();
  float* tmp_c = a.tmp_c.f32();
  float* dtmp_c = a.d_tmp_c.f32();
  float* dqkv = a.d_qkv.f32();
  // y = h + w3 · swiglu(gu)
  k::swiglu_forward(ba.gu.f32(), a.tmp_f.f32(), N, F);
  k::linear_backward(a.tmp_f.f32(), P + o.w3, dres, a.d_f.f32(), G + o.w3, N, F, C);
  k::swiglu_backward(ba.gu.f32(), a.d_f.f32(), a.d_gu.f32(), N, F);
  k::rmsnorm_forward(ba.h.f32(), P + o.ffn_norm, tmp_c, ba.rstd2.f32(), N, C, cfg_.norm_eps);
  k::linear_backward(tmp_c, P + o.w12, a.d_gu.f32(), dtmp_c, G + o.w12, N, C, 2 * F);
  k::rmsnorm_backward(ba.h.f32(), P + o.ffn_norm, ba.rstd2.f32(), dtmp_c, dres, G + o.ffn_norm, N, C, true);
  // h = x + wo · att; dres now holds dh
  k::linear_backward(ba.att.f32(), P + o.wo, dres, a.d_att.f32(), G + o.wo, N, C, C);
  k::attention_backward(qkv, qkv + C, qkv + 2 * C, 3 * C, ba.att.f32(), C, a.d_att.f32(), ba.lse.f32(), dqkv,
                        dqkv + C, dqkv + 2 * C, 3 * C, B, T, H, cfg_.head_dim());
  k::rope_apply(dqkv, 3 * C, N, H, pos, *rope_, true);
  k::rope_apply(dqkv + C, 3 * C, N, H, pos, *rope_, true);
  k::rmsnorm_forward(x, P + o.attn_norm, tmp_c, ba.rstd1.f32(), N, C, cfg_.norm_eps);
  k::linear_backward(tmp_c, P + o.wqkv, dqkv, dtmp_c, G + o.wqkv, N, C, 3 * C);
  k::rmsnorm_backward(x, P + o.attn_norm, ba.rstd1.f32(), dtmp_c, dres, G + o.attn_norm, N, C, true);
}

// ---- subsampler, upsampler and bypass --------------------------------------------------

// x: (B * parent T, C), the subsampler's input. Fills the child's kept rows, weights,
// positions and first stream buffer.
void Model::subsample_forward(ModelActivations& a, int child, const float* x, const int32_t* tokens, Mode mode) {
  const Segment& sg = structure_.segments[child];
  SegmentActs& g = a.seg[child];
  const SegmentActs& parent = a.seg[sg.parent];
  const int j = sg.subsampler, B = a.B, Tp = parent.T, C = cfg_.dim;
  const int64_t Np = (int64_t)B * Tp;
  float* scores = g.scores.f32();
  kernels::linear_forward(x, param_data() + score_offset_[j], scores, (int)Np, C, 1);
  int32_t* kept = g.kept.i32();
  int32_t* partner = g.partner.i32();
  float* w = g.w_scale.f32();
  const int32_t* ppos = parent.pos.i32();
  auto weight = [&](int64_t row) { return std::clamp(scores[row], 0.0f, 1.0f); };
  SubsamplerTrace& tr = traces_[j];
  if (mode == Mode::Train) {
    Rng rng(mix_seed(train_seed_, train_step_, 1000 + j));
    g.balancer_on = rng.uniform() < knobs_.balancer_prob.at((double)train_step_);
    g.limit_on = rng.uniform() < knobs_.bypass_limit_prob;
    const bool flip = rng.uniform() < 0.5;
    const int Tc = g.T;
    std::vector<int32_t> order(Tp), rank_of(Tp);
    for (int b = 0; b < B; ++b) {
      const float* s = scores + (int64_t)b * Tp;
      for (int t = 0; t < Tp; ++t) order[t] = t;
      // Highest scores first; equal scores keep sequence order.
      std::stable_sort(order.begin(), order.end(), [&](int32_t u, int32_t v) { return s[u] > s[v]; });
      for (int r = 0; r < Tp; ++r) rank_of[order[r]] = r;
      std::vector<int32_t> chosen(order.begin(), order.begin() + Tc);
      std::sort(chosen.begin(), chosen.end());
      for (int i = 0; i < Tc; ++i) {
        const int t = chosen[i], r = rank_of[t];
        // Kept rank r is paired with discarded rank Tc + r, or Tc + (Tc-1-r) when flipped.
        const int dr = Tc + (flip ? Tc - 1 - r : r);
        const int64_t row = (int64_t)b * Tp + t;
        kept[(int64_t)b * Tc + i] = (int32_t)row;
        partner[(int64_t)b * Tc + i] = dr < Tp ? (int32_t)((int64_t)b * Tp + order[dr]) : -1;
        w[(int64_t)b * Tc + i] = weight(row) - (dr < Tp ? weight((int64_t)b * Tp + order[dr]) : 0.0f);
      }
    }
    tr.flipped = flip;
    tr.balancer_on = g.balancer_on;
    tr.limit_on = g.limit_on;
  } else {
    // One sequence per pass: keep every non-padding token scoring above the threshold.
    check(B == 1, "inference-mode subsampling runs one sequence at a time");
    int n = 0;
    for (int t = 0; t < Tp; ++t) {
      if (scores[t] > keep_threshold(j) && tokens[ppos[t]] != cfg_.padding_idx) {
        kept[n] = t;
        partner[n] = -1;
        w[n] = weight(t);
        ++n;
      }
    }
    g.T = n;
    seen_[j] += Tp;
    kept_[j] += n;
    tr.flipped = tr.balancer_on = tr.limit_on = false;
  }
  tr.kept_per_seq = g.T;
  tr.kept.resize((size_t)B * g.T);
  for (int64_t i = 0; i < (int64_t)B * g.T; ++i) tr.kept[i] = (int32_t)(kept[i] % Tp);
  tr.scores.assign(scores, scores + Np);
  const int64_t rows = (int64_t)B * g.T;
  float* x0 = g.stream[0].f32();
  int32_t* pos = g.pos.i32();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(x0 + i * C, x + (int64_t)kept[i] * C, sizeof(float) * C);
    pos[i] = ppos[kept[i]];
  }
}

// Upsample + bypass, first half of the backward: the parent's d_stream holds d(out) and
// becomes d(x_orig) for the direct paths; the child's d_stream receives d(y').
// out = x + scatter(c * w * (y' - x[kept]))
void Model::upsample_backward_pre(ModelActivations& a, int child, const float* x) {
  const Segment& sg = structure_.segments[child];
  SegmentActs& g = a.seg[child];
  SegmentActs& parent = a.seg[sg.parent];
  const int j = sg.subsampler, C = cfg_.dim;
  const int64_t rows = (int64_t)a.B * g.T;
  const float* c = param_data() + bypass_offset_[j];
  const float* y = g.stream.back().f32();
  const int32_t* kept = g.kept.i32();
  const float* w = g.w_scale.f32();
  float* dout = parent.d_stream.f32();
  float* dy = g.d_stream.f32();
  float* dw = g.d_weights.f32();  // reused: first holds d(w_scale) per kept row
  std::fill(dw, dw + (int64_t)a.B * parent.T, 0.f);
  std::vector<float> dc_part;
  int nthreads = 1;
#pragma omp parallel
  {
#pragma omp single
    {
      nthreads = omp_get_num_threads();
      dc_part.assign((size_t)nthreads * C, 0.f);
    }
    float* dcp = dc_part.data() + (size_t)omp_get_thread_num() * C;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      float* d = dout + (int64_t)kept[i] * C;
      const float* xi = x + (int64_t)kept[i] * C;
      const float* yi = y + i * C;
      float* dyi = dy + i * C;
      const float wi = w[i];
      float dwi = 0.f;
      for (int ch = 0; ch < C; ++ch) {
        const float diff = yi[ch] - xi[ch];
        dyi[ch] = d[ch] * c[ch] * wi;
        dwi += d[ch] * c[ch] * diff;
        dcp[ch] += d[ch] * wi * diff;
        d[ch] *= 1.0f - c[ch] * wi;
      }
      dw[i] = dwi;
    }
  }
  float* dc = g.d_bypass.f32();
  std::fill(dc, dc + C, 0.f);
  for (int t = 0; t < nthreads; ++t)
    for (int ch = 0; ch < C; ++ch) dc[ch] += dc_part[(size_t)t * C + ch];
}

// Second half, after the child segment's backward: gather, score, balancer and bypass-limit
// gradients. The child's d_stream holds d(x') (its input).
void Model::subsample_backward_post(ModelActivations& a, int child, const float* x) {
  const Segment& sg = structure_.segments[child];
  SegmentActs& g = a.seg[child];
  SegmentActs& parent = a.seg[sg.parent];
  const int j = sg.subsampler, C = cfg_.dim;
  const int64_t rows = (int64_t)a.B * g.T, Np = (int64_t)a.B * parent.T;
  const int32_t* kept = g.kept.i32();
  const int32_t* partner = g.partner.i32();
  float* dout = parent.d_stream.f32();
  const float* dx0 = g.d_stream.f32();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    float* d = dout + (int64_t)kept[i] * C;
    const float* s = dx0 + i * C;
    for (int ch = 0; ch < C; ++ch) d[ch] += s[ch];
  }
  // d(w_scale) -> d(weights of kept and partner rows) -> d(scores) through the clamp.
  float* dwt = g.d_weights.f32();
  std::vector<float> dweights(Np, 0.f);
  for (int64_t i = 0; i < rows; ++i) {
    dweights[kept[i]] += dwt[i];
    if (partner[i] >= 0) dweights[partner[i]] -= dwt[i];
  }
  const float* scores = g.scores.f32();
  for (int64_t n = 0; n < Np; ++n) dwt[n] = (scores[n] >= 0.f && scores[n] <= 1.f) ? dweights[n] : 0.f;
  if (g.balancer_on) {
    const double r = sg.retention, win = knobs_.balancer_window;
    kernels::balancer_backward(scores, dwt, Np, kernels::proportion_positive_to_mean(r - win),
                               kernels::proportion_positive_to_mean(r + win), 1.25331413732 * knobs_.balancer_min_abs,
                               1.25331413732 * knobs_.balancer_max_abs, knobs_.balancer_grad_scale,
                               knobs_.balancer_counted ? r : -1.0, win);
  }
  // scores = x · w_score: d(w_score) += dscores^T x, d(x) += dscores ⊗ w_score
  kernels::linear_backward(x, param_data() + score_offset_[j], dwt, dout, grad_data() + score_offset_[j], (int)Np, C,
                           1, true);
  // The bypass-scale limit: where c is outside [c_min, c_max], a gradient that would push it
  // further out is reversed.
  const float* c = param_data() + bypass_offset_[j];
  float* dc = g.d_bypass.f32();
  if (g.limit_on) {
    const float lo = (float)knobs_.bypass_min.at((double)train_step_), hi = knobs_.bypass_max;
    for (int ch = 0; ch < C; ++ch) {
      if (dc[ch] > 0 && c[ch] < lo) dc[ch] = -dc[ch];
      if (dc[ch] < 0 && c[ch] > hi) dc[ch] = -dc[ch];
    }
  }
  float* gc = grad_data() + bypass_offset_[j];
  for (int ch = 0; ch < C; ++ch) gc[ch] += dc[ch];
}

// ---- segments ----------------------------------------------------------------------------

void Model::segment_forward(ModelActivations& a, int seg, const int32_t* tokens, Mode mode) {
  SegmentActs& g = a.seg[seg];
  const int C = cfg_.dim;
  const auto& items = structure_.segments[seg].items;
  for (size_t k = 0; k < items.size(); ++k) {
    const float* x = g.stream[k].f32();
    float* y = g.stream[k + 1].f32();
    const int64_t rows = (int64_t)a.B * g.T;
    if (rows == 0) continue;
    if (items[k].is_block) {
      block_forward(a, items[k].index, seg, x, y);
      continue;
    }
    const int child = items[k].index;
    SegmentActs& cg = a.seg[child];
    if (mode == Mode::Train) cg.T = cg.T_cap;
    subsample_forward(a, child, x, tokens, mode);
    std::memcpy(y, x, sizeof(float) * rows * C);
    if (cg.T == 0) continue;  // nothing kept: the segment is skipped for every token
    segment_forward(a, child, tokens, mode);
    // Upsample + bypass: out = x + c * w * (y' - x) on kept rows, x elsewhere.
    const float* c = param_data() + bypass_offset_[structure_.segments[child].subsampler];
    const float* yc = cg.stream.back().f32();
    const int32_t* kept = cg.kept.i32();
    const float* w = cg.w_scale.f32();
    const int64_t crows = (int64_t)a.B * cg.T;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < crows; ++i) {
      float* o = y + (int64_t)kept[i] * C;
      const float* xi = x + (int64_t)kept[i] * C;
      const float* yi = yc + i * C;
      for (int ch = 0; ch < C; ++ch) o[ch] = xi[ch] + c[ch] * w[i] * (yi[ch] - xi[ch]);
    }
  }
}

// d_stream holds d(last stream) on entry and d(first stream) on return.
void Model::segment_backward(ModelActivations& a, int seg) {
  SegmentActs& g = a.seg[seg];
  const auto& items = structure_.segments[seg].items;
  for (size_t k = items.size(); k-- > 0;) {
    const float* x = g.stream[k].f32();
    if (items[k].is_block) {
      block_backward(a, items[k].index, seg, x, g.d_stream.f32());
      continue;
    }
    const int child = items[k].index;
    upsample_backward_pre(a, child, x);
    segment_backward(a, child);
    subsample_backward_post(a, child, x);
  }
}

double Model::run(const int32_t* tokens, const int32_t* targets, int B, int T, Mode mode, bool backward,
                  float grad_multiplier, float* logits, int64_t* count) {
  namespace k = kernels;
  check(B > 0 && T > 0, "batch and length must be positive");
  check(T <= cfg_.context, "sequence length " + std::to_string(T) + " exceeds the model's context (tokens_per_sample = " +
                               std::to_string(cfg_.context) + "): shorten the input or raise tokens_per_sample");
  check(!backward || targets, "training needs targets");
  check(!backward || mode == Mode::Train, "gradients need training mode");
  const int N = B * T, C = cfg_.dim, V = cfg_.vocab_size;
  check_tokens(tokens, targets, N);
  ModelActivations& a = plan(B, T, mode);
  float* P = param_data();
  float* G = grad_data();
  const int64_t head_off = cfg_.tie_weights ? embed_offset_ : head_offset_;
  SegmentActs& root = a.seg[0];

  k::embedding_forward(tokens, P + embed_offset_, root.stream[0].f32(), N, C);
  segment_forward(a, 0, tokens, mode);
  float* last = root.stream.back().f32();
  k::rmsnorm_forward(last, P + final_norm_offset_, a.norm_out.f32(), a.rstd_f.f32(), N, C, cfg_.norm_eps);

  // Counting first lets the head produce gradients of the mean loss directly.
  int64_t n_counted = 0;
  if (targets)
    for (int i = 0; i < N; ++i) n_counted += targets[i] >= 0;
  const float gscale = n_counted ? grad_multiplier / (float)n_counted : 0.f;
  std::vector<int32_t> no_targets;
  if (!targets) no_targets.assign(N, -1);
  const int32_t* tg = targets ? targets : no_targets.data();
  double loss = k::lm_head_xent(a.norm_out.f32(), P + head_off, tg, N, C, V, gscale, backward ? a.d_tmp_c.f32() : nullptr,
                                backward ? G + head_off : nullptr, logits, a.logits_scratch.f32(), a.chunk_rows, count);
  if (!backward) return loss;

  k::rmsnorm_backward(last, P + final_norm_offset_, a.rstd_f.f32(), a.d_tmp_c.f32(), root.d_stream.f32(), G + final_norm_offset_, N, C, false);
  segment_backward(a, 0);
  k::embedding_backward(tokens, root.d_stream.f32(), G + embed_offset_, N, C, V);
  return loss;
}

}  // namespace subllm
