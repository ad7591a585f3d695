// Full passes of a Session: the model's structure walk in training and inference mode, each
// step a backend kernel on planned buffers. Cached inference is in session_cached.cpp.
#include <algorithm>
#include <cmath>

#include "model/passes.h"
#include "subllm/error.h"
#include "subllm/rng.h"

namespace subllm {

namespace {

// Training keeps ceil(T * r) tokens; the small margin keeps a float r such as 0.8f from
// rounding T * r = 8.0000001 up to 9.
int kept_length(int T, float r) { return std::max(1, (int)std::ceil((double)T * r - 1e-6)); }

// Mixes the step, seed and a per-site salt into one generator seed.
uint64_t mix_seed(uint64_t seed, long step, uint64_t salt) {
  uint64_t z = seed * 0x9e3779b97f4a7c15ull + (uint64_t)step * 0xbf58476d1ce4e5b9ull + salt * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return z;
}

// The plans a session keeps (training, validation and a few more shapes).
constexpr size_t kMaxPlans = 4;

}  // namespace

std::vector<int> plan_lengths(const Structure& st, int T, Mode mode) {
  std::vector<int> len(st.segments.size(), T);
  for (size_t s = 1; s < st.segments.size(); ++s) {
    const Segment& g = st.segments[s];
    // Parents precede children in the segment list, so the parent's length is known.
    len[s] = mode == Mode::Train ? kept_length(len[g.parent], g.retention) : len[g.parent];
  }
  return len;
}

namespace {

// Kernel working memory of a full pass: the largest any one kernel call needs.
size_t scratch_bytes(Backend& be, const ModelConfig& c, const Structure& st, int B, const std::vector<int>& len,
                     bool train) {
  size_t bytes = std::max(be.rmsnorm_scratch_bytes(c.dim), be.upsample_bypass_scratch_bytes(c.dim));
  for (size_t s = 0; s < st.segments.size(); ++s)
    for (bool backward : {false, true})
      if (backward <= train) bytes = std::max(bytes, be.attention_scratch_bytes(B, len[s], c.n_heads, c.head_dim(), backward));
  for (size_t s = 1; s < st.segments.size(); ++s) {
    const int Tp = len[st.segments[s].parent];
    if (train) bytes = std::max(bytes, be.select_top_scratch_bytes(Tp));
    bytes = std::max(bytes, be.balancer_scratch_bytes((int64_t)B * Tp));
  }
  return bytes;
}

void plan_into(ModelActivations& a, Backend& be, const ModelConfig& c, const Structure& st, int B, int T, Mode mode) {
  const int64_t N = (int64_t)B * T, C = c.dim, F = c.ffn_dim;
  // Activations in the backend's compute dtype; statistics F32 (backend.h's role table).
  const DType ad = be.compute_dtype();
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
    g.tok = ar.alloc({rows}, DType::I32);
    for (size_t k = 0; k <= st.segments[s].items.size(); ++k) g.stream.push_back(ar.alloc({rows, C}, ad));
    g.d_stream = ar.alloc({rows, C}, ad);
    if (s > 0) {
      const int64_t parent_rows = (int64_t)B * len[st.segments[s].parent];
      g.scores = ar.alloc({parent_rows});
      g.d_scores = ar.alloc({parent_rows});
      g.kept = ar.alloc({rows}, DType::I32);
      g.partner = ar.alloc({rows}, DType::I32);
      g.w_scale = ar.alloc({rows});
      g.d_w_scale = ar.alloc({rows});
      g.d_bypass = ar.alloc({C});
      g.count = ar.alloc({1}, DType::I32);
      if (c.rope_parent_positions) g.parent_index = ar.alloc({parent_rows}, DType::I32);
    }
    for (const SegmentItem& it : st.segments[s].items) {
      if (!it.is_block) continue;
      BlockActs& b = a.blk[it.index];
      b.rstd1 = ar.alloc({rows});
      b.rstd2 = ar.alloc({rows});
      b.qkv = ar.alloc({rows, (int64_t)c.qkv_dim()}, ad);
      b.att = ar.alloc({rows, C}, ad);
      b.lse = ar.alloc({(int64_t)B, (int64_t)c.n_heads, (int64_t)len[s]});
      b.h = ar.alloc({rows, C}, ad);
      b.gu = ar.alloc({rows, 2 * F}, ad);
    }
  }
  a.targets = ar.alloc({N}, DType::I32);
  a.norm_out = ar.alloc({N, C}, ad);
  a.rstd_f = ar.alloc({N});
  a.tmp_c = ar.alloc({N, C}, ad);
  a.tmp_f = ar.alloc({N, F}, ad);
  a.d_tmp_c = ar.alloc({N, C}, ad);
  a.d_att = ar.alloc({N, C}, ad);
  a.d_qkv = ar.alloc({N, (int64_t)c.qkv_dim()}, ad);
  a.d_f = ar.alloc({N, F}, ad);
  a.d_gu = ar.alloc({N, 2 * F}, ad);
  // Chunks of at most ~32 MB of logits.
  const int64_t chunk_rows = std::max<int64_t>(1, std::min<int64_t>(N, (8 << 20) / c.vocab_size));
  a.logits_chunk = ar.alloc({chunk_rows, (int64_t)c.vocab_size}, ad);
  a.loss = ar.alloc({2}, DType::F64);
  a.stats = ar.alloc({3}, DType::F64);
  a.scratch = ar.alloc({(int64_t)(scratch_bytes(be, c, st, B, len, mode == Mode::Train) + 3) / 4}, DType::I32);
  if (c.qk_bias) a.ones = ar.alloc({N}, ad);
}

}  // namespace

// One pass of a Session over its Weights: the structure walk, each step one backend kernel.
struct Pass {
  Pass(Session& session, ModelActivations& acts, float* grads)
      : s(session), w(session.w_), be(w.backend()), cfg(w.config()), st(w.structure()), a(acts), G(grads) {}

  Session& s;
  const Weights& w;
  Backend& be;
  const ModelConfig& cfg;
  const Structure& st;
  ModelActivations& a;
  float* G;  // gradients (backend memory), or null in a forward-only pass

  // A span of the gradients is final for this pass.
  void ready(Weights::Span sp) const {
    if (s.grad_ready_ && sp.last > sp.first) s.grad_ready_(sp.first, sp.last);
  }

  // Master weights (F32) and the compute copy kernels read.
  const float* P() const { return w.data(); }
  View param(int64_t offset, int64_t rows, int64_t cols) const { return subllm::param(w, offset, rows, cols); }
  View param_vec(int64_t offset, int64_t n) const { return subllm::param_vec(w, offset, n); }
  View grad(int64_t offset, int64_t rows, int64_t cols) const { return mat(G + offset, rows, cols); }
  View rope_cos() const { return view_of(w.rope_cos()); }
  View rope_sin() const { return view_of(w.rope_sin()); }

  void segment_forward(int seg);
  void segment_backward(int seg);
  void block_forward(int blk, int seg, View x, View y);
  void block_backward(int blk, int seg, View x, View dres);
  void subsample_forward(int child, View x);
  void upsample_backward_pre(int child, View x);
  void subsample_backward_post(int child, View x);
  double run(const int32_t* tokens, const int32_t* targets, bool backward, float grad_multiplier, float* logits,
             int64_t* count);
};

// ---- transformer block -----------------------------------------------------------------

void Pass::block_forward(int blk, int seg, View x, View y) {
  const SegmentActs& g = a.seg[seg];
  BlockActs& ba = a.blk[blk];
  const int B = a.B, T = g.T, C = cfg.dim, KV = cfg.kv_dim(), rows = B * T;
  const BlockIO io{rows_of(a.tmp_c, rows), rows_of(ba.qkv, rows),   rows_of(ba.att, rows),
                   rows_of(ba.h, rows),    rows_of(ba.gu, rows),    rows_of(a.tmp_f, rows),
                   rows_of(ba.rstd1, rows), rows_of(ba.rstd2, rows), view_of(ba.lse),
                   cfg.qk_bias ? rows_of(a.ones, rows) : View{}, scratch_of(a.scratch)};
  block_core(be, w, blk, x, y, rows_of(g.pos, rows), io, [&] {
    be.attention_forward(io.qkv.cols_at(0, C), io.qkv.cols_at(C, KV), io.qkv.cols_at(C + KV, KV), io.att, io.lse, B,
                         T, cfg.n_heads, io.scratch);
  });
}

// dres holds dy on entry and dx on return. Norm outputs and the SwiGLU product are
// recomputed rather than stored: a cheap pass instead of two more saved tensors per block.
void Pass::block_backward(int blk, int seg, View x, View dres) {
  const SegmentActs& g = a.seg[seg];
  BlockActs& ba = a.blk[blk];
  const int B = a.B, T = g.T, N = B * T, C = cfg.dim, F = cfg.ffn_dim, H = cfg.n_heads, hd = cfg.head_dim(), KV = cfg.kv_dim();
  const BlockOffsets& o = w.block(blk);
  const Scratch scratch = scratch_of(a.scratch);
  const View pos = rows_of(g.pos, N), qkv = rows_of(ba.qkv, N), att = rows_of(ba.att, N), h = rows_of(ba.h, N);
  const View gu = rows_of(ba.gu, N), rstd1 = rows_of(ba.rstd1, N), rstd2 = rows_of(ba.rstd2, N);
  const View tmp_c = rows_of(a.tmp_c, N), tmp_f = rows_of(a.tmp_f, N), dtmp_c = rows_of(a.d_tmp_c, N);
  const View dqkv = rows_of(a.d_qkv, N), d_att = rows_of(a.d_att, N), d_f = rows_of(a.d_f, N), d_gu = rows_of(a.d_gu, N);
  // y = h + w3 · swiglu(gu)
  be.swiglu_forward(gu, tmp_f);
  be.linear_backward(tmp_f, param(o.w3, C, F), dres, d_f, grad(o.w3, C, F));
  be.swiglu_backward(gu, d_f, d_gu);
  // gu = w12 · norm(h)
  be.rmsnorm_forward(h, param_vec(o.ffn_norm, C), tmp_c, rstd2, cfg.norm_eps);
  be.linear_backward(tmp_c, param(o.w12, 2 * F, C), d_gu, dtmp_c, grad(o.w12, 2 * F, C));
  be.rmsnorm_backward(h, param_vec(o.ffn_norm, C), rstd2, dtmp_c, dres, vec(G + o.ffn_norm, C), true, scratch);
  // h = x + wo · att; dres now holds dh
  be.linear_backward(att, param(o.wo, C, C), dres, d_att, grad(o.wo, C, C));
  be.attention_backward(qkv.cols_at(0, C), qkv.cols_at(C, KV), qkv.cols_at(C + KV, KV), att, d_att, view_of(ba.lse),
                        dqkv.cols_at(0, C), dqkv.cols_at(C, KV), dqkv.cols_at(C + KV, KV), B, T, H, scratch);
  be.rope_apply(dqkv.cols_at(0, C), pos, rope_cos(), rope_sin(), hd, true);
  be.rope_apply(dqkv.cols_at(C, KV), pos, rope_cos(), rope_sin(), hd, true);
  // The q/k biases were added before RoPE: their gradient is the column sums of d(q|k) there.
  if (cfg.qk_bias)
    be.linear_backward(rows_of(a.ones, N), param(o.qk_bias, C + KV, 1), dqkv.cols_at(0, C + KV), View{},
                       grad(o.qk_bias, C + KV, 1));
  // qkv = wqkv · norm(x)
  be.rmsnorm_forward(x, param_vec(o.attn_norm, C), tmp_c, rstd1, cfg.norm_eps);
  be.linear_backward(tmp_c, param(o.wqkv, C + 2 * KV, C), dqkv, dtmp_c, grad(o.wqkv, C + 2 * KV, C));
  be.rmsnorm_backward(x, param_vec(o.attn_norm, C), rstd1, dtmp_c, dres, vec(G + o.attn_norm, C), true, scratch);
}

// ---- subsampler, upsampler and bypass --------------------------------------------------

// x: (B * parent T, C), the subsampler's input. Fills the child's kept rows, weights,
// positions and first stream buffer.
void Pass::subsample_forward(int child, View x) {
  const Segment& sg = st.segments[child];
  SegmentActs& g = a.seg[child];
  const SegmentActs& parent = a.seg[sg.parent];
  const int j = sg.subsampler, B = a.B, Tp = parent.T, C = cfg.dim;
  const int64_t Np = (int64_t)B * Tp;
  const View scores = rows_of(g.scores, Np);
  be.score_forward(x, param_vec(w.score_offset(j), C), scores);
  if (a.mode == Mode::Train) {
    Rng rng(mix_seed(s.train_seed_, s.train_step_, 1000 + j));
    g.balancer_on = rng.uniform() < s.knobs_.balancer_prob.at((double)s.train_step_);
    g.limit_on = rng.uniform() < s.knobs_.bypass_limit_prob;
    g.flipped = rng.uniform() < 0.5;
    g.T = g.T_cap;
    const int64_t rows = (int64_t)B * g.T;
    be.select_top(scores, B, g.T, g.flipped, rows_of(g.kept, rows), rows_of(g.partner, rows), rows_of(g.w_scale, rows),
                  scratch_of(a.scratch));
  } else {
    // One sequence per pass: keep every non-padding token scoring above the threshold.
    check(B == 1, "inference-mode subsampling runs one sequence at a time");
    be.select_threshold(scores, rows_of(parent.tok, Np), s.keep_threshold(j), cfg.padding_idx, view_of(g.kept),
                        view_of(g.w_scale), view_of(g.count));
    int32_t n = 0;
    be.to_host(&n, g.count.raw(), sizeof n);  // the kept length shapes everything after
    g.T = n;
    s.seen_[j] += Tp;
    s.kept_[j] += n;
    g.balancer_on = g.limit_on = g.flipped = false;
  }
  const int64_t rows = (int64_t)B * g.T;
  const View kept = rows_of(g.kept, rows);
  be.gather_rows(x, kept, rows_of(g.stream[0], rows));
  if (cfg.rope_parent_positions) {
    // The authors' rule: a kept token's position is its row within the parent's sequence.
    be.fill_positions(rows_of(g.parent_index, Np), B, Tp, 0);
    be.gather_rows(rows_of(g.parent_index, Np), kept, rows_of(g.pos, rows));
  } else {
    be.gather_rows(rows_of(parent.pos, Np), kept, rows_of(g.pos, rows));
  }
  if (a.mode == Mode::Inference) be.gather_rows(rows_of(parent.tok, Np), kept, rows_of(g.tok, rows));
}

// Upsample + bypass, first half of the backward: the parent's d_stream holds d(out) and
// becomes d(x) of the direct paths; the child's d_stream receives d(y').
void Pass::upsample_backward_pre(int child, View x) {
  const Segment& sg = st.segments[child];
  SegmentActs& g = a.seg[child];
  SegmentActs& parent = a.seg[sg.parent];
  const int64_t rows = (int64_t)a.B * g.T, Np = (int64_t)a.B * parent.T;
  be.upsample_bypass_backward(x, rows_of(g.stream.back(), rows), rows_of(g.kept, rows), rows_of(g.w_scale, rows),
                              param_vec(w.bypass_offset(sg.subsampler), cfg.dim), rows_of(parent.d_stream, Np),
                              rows_of(g.d_stream, rows), rows_of(g.d_w_scale, rows), view_of(g.d_bypass),
                              scratch_of(a.scratch));
}

// Second half, after the child segment's backward: gather, score, balancer and bypass-limit
// gradients. The child's d_stream holds d(x') (its input).
void Pass::subsample_backward_post(int child, View x) {
  const Segment& sg = st.segments[child];
  SegmentActs& g = a.seg[child];
  SegmentActs& parent = a.seg[sg.parent];
  const int j = sg.subsampler, C = cfg.dim;
  const int64_t rows = (int64_t)a.B * g.T, Np = (int64_t)a.B * parent.T;
  const View kept = rows_of(g.kept, rows), dout = rows_of(parent.d_stream, Np);
  const View scores = rows_of(g.scores, Np), dscores = rows_of(g.d_scores, Np);
  // The gather's backward.
  be.scatter_add_rows(rows_of(g.d_stream, rows), kept, dout);
  // d(w_scale) -> d(weights of kept and partner rows) -> d(scores) through the clamp.
  be.selection_backward(rows_of(g.d_w_scale, rows), kept, rows_of(g.partner, rows), scores, dscores);
  if (g.balancer_on) {
    const SubllmKnobs& kn = s.knobs_;
    const double r = sg.retention, win = kn.balancer_window;
    be.balancer_backward(scores, dscores, balancer_mean_bound(r - win),
                         balancer_mean_bound(r + win), 1.25331413732 * kn.balancer_min_abs,
                         1.25331413732 * kn.balancer_max_abs, kn.balancer_grad_scale,
                         kn.balancer_counted ? r : -1.0, win, scratch_of(a.scratch));
  }
  // scores = x · w_score: d(w_score) += dscores^T x, d(x) += dscores ⊗ w_score
  be.score_backward(x, param_vec(w.score_offset(j), C), dscores, dout, vec(G + w.score_offset(j), C), true);
  // The bypass-scale limit: where c (the master value) is outside [c_min, c_max], a gradient
  // that would push it further out is reversed.
  const float lo = (float)s.knobs_.bypass_min.at((double)s.train_step_), hi = s.knobs_.bypass_max;
  be.bypass_limit_accumulate(view_of(g.d_bypass), vec(P() + w.bypass_offset(j), C), lo, hi, g.limit_on,
                             vec(G + w.bypass_offset(j), C));
}

// ---- segments ----------------------------------------------------------------------------

void Pass::segment_forward(int seg) {
  SegmentActs& g = a.seg[seg];
  const auto& items = st.segments[seg].items;
  for (size_t k = 0; k < items.size(); ++k) {
    const int64_t rows = (int64_t)a.B * g.T;
    if (rows == 0) continue;
    const View x = rows_of(g.stream[k], rows), y = rows_of(g.stream[k + 1], rows);
    if (items[k].is_block) {
      block_forward(items[k].index, seg, x, y);
      continue;
    }
    const int child = items[k].index;
    SegmentActs& cg = a.seg[child];
    subsample_forward(child, x);
    be.copy_rows(x, y);
    if (cg.T == 0) continue;  // nothing kept: the segment is skipped for every token
    segment_forward(child);
    // Upsample + bypass: out = x + c * w * (y' - x) on kept rows, x elsewhere.
    const int64_t crows = (int64_t)a.B * cg.T;
    be.upsample_bypass_forward(x, rows_of(cg.stream.back(), crows), rows_of(cg.kept, crows),
                               rows_of(cg.w_scale, crows), param_vec(w.bypass_offset(st.segments[child].subsampler), cfg.dim),
                               y);
  }
}

// d_stream holds d(last stream) on entry and d(first stream) on return.
void Pass::segment_backward(int seg) {
  SegmentActs& g = a.seg[seg];
  const auto& items = st.segments[seg].items;
  const int64_t rows = (int64_t)a.B * g.T;
  for (size_t k = items.size(); k-- > 0;) {
    const View x = rows_of(g.stream[k], rows);
    if (items[k].is_block) {
      block_backward(items[k].index, seg, x, rows_of(g.d_stream, rows));
      ready(w.block_span(items[k].index));
      continue;
    }
    const int child = items[k].index;
    upsample_backward_pre(child, x);
    segment_backward(child);
    subsample_backward_post(child, x);
    ready(w.score_span(st.segments[child].subsampler));
    ready(w.bypass_span(st.segments[child].subsampler));
  }
}

double Pass::run(const int32_t* tokens, const int32_t* targets, bool backward, float grad_multiplier, float* logits,
                 int64_t* count) {
  const int B = a.B, T = a.T, N = B * T, C = cfg.dim, V = cfg.vocab_size;
  SegmentActs& root = a.seg[0];
  const View tok = rows_of(root.tok, N), tgt = targets ? rows_of(a.targets, N) : View{};
  be.to_device(root.tok.raw(), tokens, sizeof(int32_t) * N);
  be.fill_positions(rows_of(root.pos, N), B, T, 0);
  // Counting first lets the head produce gradients of the mean loss directly.
  int64_t n_counted = 0;
  if (targets) {
    for (int i = 0; i < N; ++i) n_counted += targets[i] >= 0;
    be.to_device(a.targets.raw(), targets, sizeof(int32_t) * N);
  }
  const float gscale = n_counted ? grad_multiplier / (float)n_counted : 0.f;
  const int64_t head = w.head_offset();
  const View x0 = rows_of(root.stream[0], N), last = rows_of(root.stream.back(), N);
  const View norm_out = rows_of(a.norm_out, N), rstd_f = rows_of(a.rstd_f, N), dlast = rows_of(a.d_tmp_c, N);

  be.embedding_forward(tok, param(w.embed_offset(), V, C), x0);
  segment_forward(0);
  be.rmsnorm_forward(last, param_vec(w.final_norm_offset(), C), norm_out, rstd_f, cfg.norm_eps);
  Tensor logits_dev;  // only evaluation asks for every logit
  if (logits) logits_dev = be.empty({(int64_t)N, (int64_t)V});
  be.lm_head_xent(norm_out, param(head, V, C), tgt, gscale, backward ? dlast : View{}, backward ? grad(head, V, C) : View{},
                  logits ? view_of(logits_dev) : View{}, view_of(a.logits_chunk), view_of(a.loss));
  double loss[2];
  be.to_host(loss, a.loss.raw(), sizeof loss);  // the one read of a step
  if (logits) be.to_host(logits, logits_dev.raw(), logits_dev.nbytes());
  *count = (int64_t)loss[1];
  if (!backward) return loss[0];

  ready(w.head_span());
  be.rmsnorm_backward(last, param_vec(w.final_norm_offset(), C), rstd_f, dlast, rows_of(root.d_stream, N),
                      vec(G + w.final_norm_offset(), C), false, scratch_of(a.scratch));
  ready(w.final_norm_span());
  segment_backward(0);
  be.embedding_backward(tok, rows_of(root.d_stream, N), grad(w.embed_offset(), V, C));
  ready(w.embed_span());
  return loss[0];
}

// ---- Session -------------------------------------------------------------------------------

Session::Session(const Weights& weights) : w_(weights), st_(std::make_unique<SessionState>()) {
  reset_retention_stats();
}

Session::~Session() = default;

void Session::set_train_context(long step, uint64_t seed) {
  train_step_ = step;
  train_seed_ = seed;
}

float Session::keep_threshold(int j) const {
  return j < (int)knobs_.keep_thresholds.size() ? knobs_.keep_thresholds[j] : knobs_.keep_threshold;
}

void Session::reset_retention_stats() {
  seen_.assign(w_.structure().num_subsamplers, 0);
  kept_.assign(w_.structure().num_subsamplers, 0);
}

std::vector<double> Session::retention() const {
  std::vector<double> r;
  for (size_t j = 0; j < seen_.size(); ++j) r.push_back(seen_[j] ? (double)kept_[j] / seen_[j] : 0.0);
  return r;
}

size_t Session::activation_bytes(int B, int T) const {
  ModelActivations probe;
  probe.arena = Arena::measuring();
  plan_into(probe, w_.backend(), w_.config(), w_.structure(), B, T, Mode::Train);
  return probe.arena.used();
}

namespace {

ModelActivations& plan(SessionState& st, const Weights& w, int B, int T, Mode mode) {
  auto& plans = st.plans;
  for (size_t i = 0; i < plans.size(); ++i) {
    ModelActivations& a = *plans[i];
    if (a.B == B && a.T == T && a.mode == mode) {
      std::rotate(plans.begin(), plans.begin() + i, plans.begin() + i + 1);  // most recent first
      return *plans.front();
    }
  }
  if (plans.size() >= kMaxPlans) {
    if (st.last == plans.back().get()) st.last = nullptr;
    plans.pop_back();  // release the least recently used plan before allocating
  }
  ModelActivations probe;
  probe.arena = Arena::measuring();
  plan_into(probe, w.backend(), w.config(), w.structure(), B, T, mode);
  auto a = std::make_unique<ModelActivations>();
  a->arena.reserve(probe.arena.used(), w.backend());
  plan_into(*a, w.backend(), w.config(), w.structure(), B, T, mode);
  if (a->ones.raw()) fill_ones(w.backend(), view_of(a->ones));
  plans.insert(plans.begin(), std::move(a));
  return *plans.front();
}

void check_run(const ModelConfig& c, const int32_t* tokens, const int32_t* targets, int B, int T) {
  check(B > 0 && T > 0, "batch and length must be positive");
  if (T > c.context)
    throw Error("sequence length " + std::to_string(T) + " exceeds the model's context (tokens_per_sample = " +
                std::to_string(c.context) + "): shorten the input or raise tokens_per_sample");
  check_token_ids(c, tokens, targets, (int64_t)B * T);
}

}  // namespace

void fill_ones(Backend& be, View dst) {
  const std::vector<float> host((size_t)dst.rows, 1.0f);
  Tensor f32 = be.empty({dst.rows});
  be.to_device(f32.raw(), host.data(), sizeof(float) * host.size());
  be.convert(view_of(f32), dst);
}

void check_token_ids(const ModelConfig& c, const int32_t* tokens, const int32_t* targets, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size)
      throw Error("token id " + std::to_string(tokens[i]) + " at position " + std::to_string(i) +
                  " is outside the vocabulary [0, " + std::to_string(c.vocab_size) +
                  "): the data was tokenized with a different tokenizer");
    if (targets && targets[i] >= c.vocab_size)
      throw Error("target id " + std::to_string(targets[i]) + " at position " + std::to_string(i) +
                  " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
  }
}

float Session::forward_backward(float* grads, const int32_t* tokens, const int32_t* targets, int B, int T,
                                float grad_multiplier) {
  check(targets, "training needs targets");
  check(grads != nullptr && !w_.mapped(),
        "this model was loaded for inference (no gradients, weights mapped read-only): training loads its weights "
        "with Model(config) and load()");
  check_run(w_.config(), tokens, targets, B, T);
  ModelActivations& a = plan(*st_, w_, B, T, Mode::Train);
  Pass p(*this, a, grads);
  int64_t count = 0;
  const double loss = p.run(tokens, targets, true, grad_multiplier, nullptr, &count);
  st_->last = &a;
  return count ? (float)(loss / count) : 0.f;
}

float Session::forward(const int32_t* tokens, const int32_t* targets, int B, int T, float* logits, Mode mode) {
  check_run(w_.config(), tokens, targets, B, T);
  int64_t count = 0;
  double loss = 0;
  // In inference mode kept lengths differ per sequence, so each sequence is its own pass.
  const bool per_sequence = mode == Mode::Inference && !w_.structure().is_plain();
  const int64_t V = w_.config().vocab_size;
  for (int b = 0; b < (per_sequence ? B : 1); ++b) {
    const int Bp = per_sequence ? 1 : B;
    const int64_t off = (int64_t)b * T;
    ModelActivations& a = plan(*st_, w_, Bp, T, mode);
    Pass p(*this, a, nullptr);
    int64_t c = 0;
    loss += p.run(tokens + off, targets ? targets + off : nullptr, false, 1.0f, logits ? logits + off * V : nullptr, &c);
    count += c;
    st_->last = &a;
  }
  return count ? (float)(loss / count) : 0.f;
}

std::vector<SubsamplerTrace> Session::last_traces() const {
  const Structure& st = w_.structure();
  std::vector<SubsamplerTrace> out(st.num_subsamplers);
  const ModelActivations* a = st_->last;
  if (!a) return out;
  Backend& be = w_.backend();
  for (size_t s = 1; s < st.segments.size(); ++s) {
    const SegmentActs& g = a->seg[s];
    const int Tp = a->seg[st.segments[s].parent].T;
    SubsamplerTrace& tr = out[st.segments[s].subsampler];
    tr.flipped = g.flipped;
    tr.balancer_on = g.balancer_on;
    tr.limit_on = g.limit_on;
    tr.kept_per_seq = g.T;
    tr.scores.resize((size_t)a->B * Tp);
    tr.kept.resize((size_t)a->B * g.T);
    be.to_host(tr.scores.data(), g.scores.raw(), sizeof(float) * tr.scores.size());
    be.to_host(tr.kept.data(), g.kept.raw(), sizeof(int32_t) * tr.kept.size());
    for (int32_t& k : tr.kept) k %= Tp;  // parent rows -> positions within the parent sequence
  }
  return out;
}

std::vector<ScoreStats> Session::score_stats() const {
  const Structure& st = w_.structure();
  std::vector<ScoreStats> out(st.num_subsamplers);
  ModelActivations* a = st_->last;
  if (!a) return out;
  Backend& be = w_.backend();
  for (size_t s = 1; s < st.segments.size(); ++s) {
    const SegmentActs& g = a->seg[s];
    const int j = st.segments[s].subsampler;
    const int64_t Np = (int64_t)a->B * a->seg[st.segments[s].parent].T;
    be.score_stats(rows_of(g.scores, Np), rows_of(g.kept, (int64_t)a->B * g.T), keep_threshold(j), view_of(a->stats));
    double v[3];
    be.to_host(v, a->stats.raw(), sizeof v);
    out[j] = ScoreStats{v[0], v[1], v[2]};
  }
  return out;
}

}  // namespace subllm
