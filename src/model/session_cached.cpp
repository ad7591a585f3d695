// Inference with a key/value cache: incremental decoding and (chunked) prefill of one
// sequence, in inference mode. Blocks inside subsamplers cache only the tokens that every
// enclosing subsampler kept; a token scoring at or below the threshold skips the segment.
#include <algorithm>

#include "model/passes.h"
#include "subllm/error.h"

namespace subllm {

size_t SequenceCache::bytes() const {
  size_t total = 0;
  for (size_t b = 0; b < k.size(); ++b) total += 2 * element_bytes * (size_t)rows[b] * width;
  return total;
}

KVRows& KVRows::operator=(const KVRows& o) {
  if (this == &o) return *this;
  backend_ = o.backend_;
  dtype_ = o.dtype_;
  const size_t es = dtype_size(dtype_);
  buf_ = o.cap_ ? backend_->alloc_shared(es * o.cap_) : nullptr;
  cap_ = o.cap_;
  used_ = o.used_;
  if (used_) backend_->copy(buf_.get(), o.buf_.get(), es * used_);
  return *this;
}

void KVRows::reserve(size_t elements) {
  if (elements <= cap_) return;
  check(backend_ != nullptr, "key/value rows without a backend: make caches with Session::new_cache");
  const size_t cap = std::max(elements, cap_ * 2), es = dtype_size(dtype_);
  std::shared_ptr<void> grown = backend_->alloc_shared(es * cap);
  if (used_) backend_->copy(grown.get(), buf_.get(), es * used_);
  buf_ = std::move(grown);
  cap_ = cap;
}

void Session::set_kv_dtype(DType dt) {
  const char* name = dt == DType::BF16 ? "bf16" : dt == DType::F32 ? "f32" : dtype_name(dt);
  check(w_.backend().takes_kv_dtype(dt), std::string("--kv-dtype ") + name + ": the " + w_.backend().name() +
                                             " backend keeps its key/value cache in its compute dtype (" +
                                             (w_.compute_dtype() == DType::BF16 ? "bf16" : "f32") +
                                             "): leave --kv-dtype out");
  kv_dtype_ = dt;
  kv_dtype_set_ = true;
}

SequenceCache Session::new_cache(int reserve_tokens) const {
  const ModelConfig& c = w_.config();
  SequenceCache cache;
  const DType dt = kv_dtype();
  cache.k.assign(c.n_layers, KVRows(&w_.backend(), dt));
  cache.v.assign(c.n_layers, KVRows(&w_.backend(), dt));
  for (int b = 0; b < c.n_layers && reserve_tokens > 0; ++b) {
    cache.k[b].reserve((size_t)reserve_tokens * c.dim);
    cache.v[b].reserve((size_t)reserve_tokens * c.dim);
  }
  cache.rows.assign(c.n_layers, 0);
  cache.width = c.dim;
  cache.element_bytes = dtype_size(dt);
  cache.seen.assign(w_.structure().num_subsamplers, 0);
  cache.kept.assign(w_.structure().num_subsamplers, 0);
  return cache;
}

void CachedSegment::reserve(Backend& be, int rows, int C, DType act) {
  if (rows <= cap) return;
  cap = std::max(rows, 2 * cap);
  scores = be.empty({cap});
  w = be.empty({cap});
  kept = be.empty({cap}, DType::I32);
  count = be.empty({1}, DType::I32);
  x = be.empty({cap, (int64_t)C}, act);
  pos = be.empty({cap}, DType::I32);
  parent_index = be.empty({cap}, DType::I32);
  tok = be.empty({cap}, DType::I32);
}

namespace {

// Makes `t` hold at least `numel` elements, uninitialised (doubling, so growth is amortised).
void ensure(Backend& be, Tensor& t, int64_t numel, DType dt = DType::F32) {
  const int64_t have = t.raw() ? t.numel() : 0;  // an unallocated tensor holds nothing
  if (have >= numel) return;
  t = be.empty({std::max(numel, 2 * have)}, dt);
}

// The cached walk of one segment: x (rows, C) in and out; pos, tok (rows); `before`: the
// segment's tokens of the earlier chunks (its cached length).
struct CachedPass {
  CachedPass(Session& session, SessionState& state, SequenceCache& c)
      : s(session), w(session.weights()), be(w.backend()), cfg(w.config()), st(state), cache(c) {}

  Session& s;
  const Weights& w;
  Backend& be;
  const ModelConfig& cfg;
  SessionState& st;
  SequenceCache& cache;

  void block(int blk, View x, int rows, View pos);
  void segment(int seg, View x, int rows, View pos, View tok, int64_t before);
};

void CachedPass::block(int blk, View x, int rows, View pos) {
  const int64_t C = cfg.dim, F = cfg.ffn_dim, H = cfg.n_heads, hd = cfg.head_dim();
  const DType ad = w.compute_dtype();
  // One workspace serves every block: blocks never run nested inside one another.
  // Activations in the compute dtype, per-row statistics in F32.
  ensure(be, st.block_ws, rows * (7 * C + 3 * F), ad);
  ensure(be, st.block_stats, rows * (2 + H));
  char* ws = static_cast<char*>(st.block_ws.raw());
  float* stats = st.block_stats.f32();
  auto take = [&](int64_t cols) {
    View v{ws, ad, rows, cols, cols};
    ws += rows * cols * (int64_t)dtype_size(ad);
    return v;
  };
  auto take_f32 = [&](int64_t cols) {
    View v = mat(stats, rows, cols);
    stats += rows * cols;
    return v;
  };
  BlockIO io;
  io.n1 = take(C);
  io.qkv = take(3 * C);
  io.att = take(C);
  io.h = take(C);
  io.gu = take(2 * F);
  io.a = take(F);
  io.rstd1 = take_f32(1);
  io.rstd2 = take_f32(1);
  io.lse = take_f32(H);
  const View y = take(C);
  KVRows& K = cache.k[blk];
  KVRows& V = cache.v[blk];
  const int L0 = cache.rows[blk], L = L0 + rows;
  ensure(be, st.scratch,
         (int64_t)std::max(be.attention_scratch_bytes(1, rows, (int)H, (int)hd, false),
                           be.attention_cached_scratch_bytes(rows, L, (int)H, (int)hd)),
         DType::U8);
  io.scratch = scratch_of(st.scratch);
  if (cfg.qk_bias) {
    if (st.ones_rows < rows) {
      st.ones_rows = std::max<int64_t>(rows, 2 * st.ones_rows);
      st.ones = be.empty({st.ones_rows}, ad);
      fill_ones(be, view_of(st.ones));
    }
    io.ones = rows_of(st.ones, rows);
  }
  block_core(be, w, blk, x, y, pos, io, [&] {
    // Append this chunk's keys and values, then attend over the whole cache.
    K.reserve((size_t)L * C);
    V.reserve((size_t)L * C);
    const View k_rows{K.data(), K.dtype(), L, C, C}, v_rows{V.data(), V.dtype(), L, C, C};
    if (K.dtype() == ad) {
      be.copy_rows(io.qkv.cols_at(C, C), k_rows.rows_at(L0, rows));
      be.copy_rows(io.qkv.cols_at(2 * C, C), v_rows.rows_at(L0, rows));
    } else {  // a cache in another dtype than the activations (bf16 under f32)
      be.convert(io.qkv.cols_at(C, C), k_rows.rows_at(L0, rows));
      be.convert(io.qkv.cols_at(2 * C, C), v_rows.rows_at(L0, rows));
    }
    K.set_used((size_t)L * C);
    V.set_used((size_t)L * C);
    cache.rows[blk] = L;
    if (L0 == 0)
      be.attention_forward(io.qkv.cols_at(0, C), io.qkv.cols_at(C, C), io.qkv.cols_at(2 * C, C), io.att, io.lse, 1,
                           rows, (int)H, io.scratch);
    else
      be.attention_cached(io.qkv.cols_at(0, C), k_rows, v_rows, io.att, (int)H, io.scratch);
  });
  be.copy_rows(y, x);
}

void CachedPass::segment(int seg, View x, int rows, View pos, View tok, int64_t before) {
  const int C = cfg.dim;
  for (const SegmentItem& it : w.structure().segments[seg].items) {
    if (it.is_block) {
      block(it.index, x, rows, pos);
      continue;
    }
    const int child = it.index;
    const int j = w.structure().segments[child].subsampler;
    CachedSegment& b = st.cseg[child];
    b.reserve(be, rows, C, w.compute_dtype());
    const View scores = rows_of(b.scores, rows);
    be.score_forward(x, param_vec(w, w.score_offset(j), C), scores);
    be.select_threshold(scores, tok, s.keep_threshold(j), cfg.padding_idx, rows_of(b.kept, rows), rows_of(b.w, rows),
                        view_of(b.count));
    int32_t nk = 0;
    be.to_host(&nk, b.count.raw(), sizeof nk);  // the kept length shapes everything after
    const int64_t child_before = cache.kept[j];
    cache.seen[j] += rows;
    cache.kept[j] += nk;
    if (nk == 0) continue;
    const View kept = rows_of(b.kept, nk), xk = rows_of(b.x, nk);
    be.gather_rows(x, kept, xk);
    if (cfg.rope_parent_positions) {
      // The authors' rule: the position is the token's index in the parent segment's
      // sequence, whose earlier chunks hold `before` tokens.
      be.fill_positions(rows_of(b.parent_index, rows), 1, rows, (int)before);
      be.gather_rows(rows_of(b.parent_index, rows), kept, rows_of(b.pos, nk));
    } else {
      be.gather_rows(pos, kept, rows_of(b.pos, nk));
    }
    be.gather_rows(tok, kept, rows_of(b.tok, nk));
    segment(child, xk, nk, rows_of(b.pos, nk), rows_of(b.tok, nk), child_before);
    // Upsample + bypass in place: x[kept] += c * w * (y' - x[kept]).
    be.upsample_bypass_forward(x, xk, kept, rows_of(b.w, nk), param_vec(w, w.bypass_offset(j), C), x);
  }
}

}  // namespace

void Session::forward_cached(SequenceCache& cache, const int32_t* tokens, int n, float* logits, bool all_rows) {
  const ModelConfig& c = w_.config();
  check(n > 0, "nothing to run: no new tokens");
  if (cache.length + n > c.context)
    throw Error("the context is full: " + std::to_string(cache.length) + " + " + std::to_string(n) + " tokens exceed " +
                std::to_string(c.context) + " (tokens_per_sample); shorten the prompt or the generation");
  check_token_ids(c, tokens, nullptr, n);
  Backend& be = w_.backend();
  const int C = c.dim, V = c.vocab_size;
  SessionState& st = *st_;
  st.cseg.resize(w_.structure().segments.size());
  CachedSegment& root = st.cseg[0];
  root.reserve(be, n, C, w_.compute_dtype());
  const View x = rows_of(root.x, n), pos = rows_of(root.pos, n), tok = rows_of(root.tok, n);
  be.to_device(root.tok.raw(), tokens, sizeof(int32_t) * n);
  be.fill_positions(pos, 1, n, cache.length);
  be.embedding_forward(tok, param(w_, w_.embed_offset(), V, C), x);
  CachedPass(*this, st, cache).segment(0, x, n, pos, tok, cache.length);
  cache.length += n;
  const int first = all_rows ? 0 : n - 1, count = all_rows ? n : 1;
  ensure(be, st.normed, (int64_t)count * C, w_.compute_dtype());
  ensure(be, st.rstd, count);
  ensure(be, st.logits, (int64_t)count * V);
  const View normed = View{st.normed.raw(), w_.compute_dtype(), count, C, C}, out = mat(st.logits.f32(), count, V);
  be.rmsnorm_forward(x.rows_at(first, count), param_vec(w_, w_.final_norm_offset(), C), normed,
                     vec(st.rstd.f32(), count), c.norm_eps);
  // Logits in F32 from compute-dtype operands.
  be.linear_forward(normed, param(w_, w_.head_offset(), V, C), out);
  be.to_host(logits, out.data, sizeof(float) * count * V);
}

void Session::forward_cached_batch(const std::vector<CachedStep>& steps, float* logits) {
  const int V = w_.config().vocab_size;
  for (size_t i = 0; i < steps.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      check(steps[i].cache != steps[j].cache, "forward_cached_batch: one cache appears in two steps");
  for (const CachedStep& s : steps) {
    check(s.cache != nullptr && s.tokens != nullptr, "forward_cached_batch: a step without its cache or tokens");
    check(s.keep_thresholds == nullptr && s.depth == nullptr,
          "forward_cached_batch: per-step keep thresholds and token depths need the batched pass");
    forward_cached(*s.cache, s.tokens, s.n, logits, s.all_rows);
    logits += (size_t)(s.all_rows ? s.n : 1) * V;
  }
}

}  // namespace subllm
